"""Experiments side by side: ``ray_jobs/compare.py STORAGE/NAME1 STORAGE/NAME2 ... [--out DIR]``.

Reads each experiment's provenance record (``experiment.json``) and writes ``compare.md`` and a self-contained
``compare.html``: the final scores of each (its last eval step's, by default), the compute it took (model
FLOPs and GPU-hours of its train steps), how the configs of its train steps differ from the others', and
quality against compute with the Pareto front marked (no other experiment is at least as good on both with
less of one), as Marin's speedrun leaderboard plots it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass

from minimind import storage
from minimind.experiment.record import RECORD_FILE, gpu_hours
from minimind.experiment.spec import dotted_changes
from minimind.pages import to_html, to_markdown

SCORES = (
    "val_bits_per_byte",
    "val_perplexity",
    "continuation_accuracy",
    "chat_adherence",
    "choice_accuracy",
    "choice_accuracy_per_byte",
)
HIGHER_IS_BETTER = {"continuation_accuracy", "chat_adherence", "choice_accuracy", "choice_accuracy_per_byte"}


@dataclass
class Entry:
    name: str
    root: str
    record: dict
    scores: dict[str, float]
    """The chosen eval step's numeric scores."""
    flops: float
    """Model FLOPs of every train step."""
    gpu_hours: float


def load_entry(root: str, eval_step: str | None = None) -> Entry:
    path = storage.join(root, RECORD_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{root}: no {RECORD_FILE} (run the experiment first)")
    record = json.loads(storage.read_text(path))
    steps = record["steps"]
    evals = [name for name, step in steps.items() if step["kind"] == "eval"]
    if eval_step is not None and eval_step not in evals:
        raise ValueError(f"{root}: no eval step {eval_step!r} (eval steps: {', '.join(evals) or 'none'})")
    chosen = eval_step or (evals[-1] if evals else None)
    scores = dict((steps[chosen].get("summary") or {}) if chosen else {})
    trained = [step for step in steps.values() if step["kind"] == "train"]
    flops = sum(float((step.get("summary") or {}).get("model_flops") or 0.0) for step in trained)
    return Entry(record["name"], root, record, scores, flops, sum(gpu_hours(step) for step in trained))


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = False) -> list[int]:
    """Indices of the points no other point dominates: as little compute (x) and as good a score (y), one of
    them strictly better."""
    sign = -1.0 if higher_is_better else 1.0
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox <= x and sign * oy <= sign * y) and (ox < x or sign * oy < sign * y)
            for j, (ox, oy) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def write_comparison(entries: list[Entry], out: str, metric: str = "val_bits_per_byte") -> str:
    blocks: list[tuple] = [("h1", "Experiments compared: " + ", ".join(e.name for e in entries))]
    header = ["experiment", "model FLOPs", "GPU-hours", *SCORES]
    rows = [[e.name, f"{e.flops:.3g}", f"{e.gpu_hours:.2f}" if e.gpu_hours else "CPU",
             *(f"{e.scores[k]:.4g}" if k in e.scores else "-" for k in SCORES)] for e in entries]  # fmt: skip
    blocks += [("h2", "Scores and compute"),
               ("p", "Scores of each experiment's last eval step; compute of all its train steps."),
               ("table", header, rows)]  # fmt: skip
    blocks += _difference_blocks(entries)
    blocks += _plot_blocks(entries, metric)
    storage.write_text(storage.join(out, "compare.md"), to_markdown(blocks))
    page = storage.join(out, "compare.html")
    storage.write_text(page, to_html(blocks, "Experiments compared", out))
    return page


def _difference_blocks(entries: list[Entry]) -> list[tuple]:
    """For each train step name the experiments share, the config fields where any differs from the first."""
    first = entries[0]
    items = []
    for name, step in first.record["steps"].items():
        if step["kind"] != "train":
            continue
        for other in entries[1:]:
            theirs = other.record["steps"].get(name)
            if theirs is None or theirs["kind"] != "train":
                items.append(f"`{name}`: only in {first.name}, not in {other.name}")
                continue
            changes = [c for c in dotted_changes(step["config"], theirs["config"]) if not _is_path_change(c)]
            shown = "; ".join(f"`{c}`" for c in changes) if changes else "the same config"
            items.append(f"`{name}`, {first.name} -> {other.name}: {shown}")
    return [("h2", "How the train steps differ"), ("ul", items or ["no train steps"])]


def _is_path_change(change: str) -> bool:
    """Output and input paths differ between experiments by construction."""
    field = change.split(":", 1)[0]
    return field in ("checkpoint.dir", "checkpoint.init_from", "objective.teacher", "data.train_files",
                     "eval.val_files")  # fmt: skip


def _plot_blocks(entries: list[Entry], metric: str) -> list[tuple]:
    points = [(e.flops, e.scores[metric]) for e in entries if metric in e.scores and e.flops > 0]
    named = [e.name for e in entries if metric in e.scores and e.flops > 0]
    if not points:
        return [("h2", "Quality against compute"), ("p", f"Not drawn: no experiment has both FLOPs and {metric}.")]
    higher = metric in HIGHER_IS_BETTER
    front = pareto_front(points, higher)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    ax = figure.add_subplot()
    ax.scatter(*zip(*points), color="tab:gray")
    best = sorted((points[i] for i in front), key=lambda p: p[0])
    ax.plot(*zip(*best), color="tab:red", marker="o", label="Pareto front")
    for (x, y), name in zip(points, named):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log" if max(p[0] for p in points) > 10 * min(p[0] for p in points) else "linear")
    ax.set_xlabel("model FLOPs (all train steps)")
    ax.set_ylabel(metric + (" (higher is better)" if higher else " (lower is better)"))
    ax.legend()
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    front_names = ", ".join(named[i] for i in front)
    return [("h2", "Quality against compute"), ("img", f"{metric} against model FLOPs", png.getvalue()),
            ("p", f"On the Pareto front ({metric}, model FLOPs): {front_names}.")]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ray_jobs/compare.py", description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", help="experiment directories (STORAGE/NAME), local or s3://")
    parser.add_argument("--out", default=".", help="where compare.html and compare.md go (default: here)")
    parser.add_argument("--metric", default="val_bits_per_byte", choices=SCORES, help="the quality axis")
    parser.add_argument("--eval-step", help="the eval step whose scores count (default: each one's last)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        entries = [load_entry(root, args.eval_step) for root in args.experiments]
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    page = write_comparison(entries, args.out, args.metric)
    for entry in entries:
        score = entry.scores.get(args.metric, math.nan)
        print(f"{entry.name}: {args.metric} {score:.4g}, model FLOPs {entry.flops:.3g}")
    print(f"wrote {page}")
