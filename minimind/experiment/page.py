"""The experiment page: ``STORAGE/NAME/index.html`` (and ``index.md``), one self-contained file.

Built from the provenance record (``experiment.json``) and what the steps left in their outputs
(``metrics.jsonl``, ``eval.json``, ``wandb.json``), so it can be rebuilt from storage alone. It shows the
graph with each step's status, what each step sets (a train step: how it differs from its recipe), the
training curves, links to the W&B runs of the steps that logged there, the evaluations with their samples,
and the compute: tokens, model FLOPs (6N plus attention per token, the tied embedding counted once:
``train/compute.py``), MFU where a GPU logged it, GPU-hours, and their cost at ``--gpu-hour-usd``.
"""

from __future__ import annotations

import io
import json
import time

from minimind import storage
from minimind.experiment.record import gpu_hours
from minimind.pages import to_html, to_markdown
from minimind.tune.records import read_rows

KEY_EVAL_METRICS = ("val_perplexity", "val_bits_per_byte", "continuation_accuracy", "chat_adherence")


def write_page(root: str, record: dict, gpu_hour_usd: float | None = None) -> str:
    """Write ``index.html`` and ``index.md`` into ``root`` (the experiment's directory); return the HTML's path."""
    steps = record["steps"]
    curves = {name: read_rows(storage.join(step["output"], "metrics.jsonl"))
              for name, step in steps.items() if step["kind"] == "train"}  # fmt: skip
    evals = {name: _eval_result(step["output"]) for name, step in steps.items() if step["kind"] == "eval"}
    blocks: list[tuple] = [("h1", f"Experiment {record['name']}")]
    counts = ", ".join(f"{count} {status}" for status, count in _counts(steps).items())
    blocks.append(("p", f"`{record['file']}` at commit `{record.get('git_commit') or 'unknown'}`; last invocation "
                        f"{_when(record['started_at'])} to {_when(record['finished_at'])}: {counts}."))  # fmt: skip
    blocks += _graph_blocks(steps)
    blocks += _compute_blocks(steps, curves, gpu_hour_usd)
    blocks += _settings_blocks(steps)
    blocks += _curve_blocks(curves)
    blocks += _wandb_blocks(steps)
    blocks += _eval_blocks(evals)
    storage.write_text(storage.join(root, "index.md"), to_markdown(blocks))
    page = storage.join(root, "index.html")
    storage.write_text(page, to_html(blocks, f"Experiment {record['name']}", root))
    return page


def _graph_blocks(steps: dict) -> list[tuple]:
    rows = []
    for name, step in steps.items():
        uses = ", ".join(f"{parent} ({field})" for field, parents in step["parents"].items() for parent in parents)
        rows.append([name, step["kind"], step["status"] + (f": {step['error']}" if step.get("error") else ""),
                     uses or "-", step["output"].rsplit("/", 1)[-1], _duration(step["seconds"])])  # fmt: skip
    depth: dict[str, int] = {}
    for name, step in steps.items():  # the record lists steps in dependency order
        parents = [p for names in step["parents"].values() for p in names]
        depth[name] = 1 + max((depth[p] for p in parents), default=-1)
    drawing = "\n".join("    " * depth[name] + f"{name} [{step['kind']}, {step['status']}]"
                        + (f"  <- {', '.join(dict.fromkeys(p for ps in step['parents'].values() for p in ps))}"
                           if step["parents"] else "")
                        for name, step in steps.items())  # fmt: skip
    return [
        ("h2", "Steps"),
        (
            "p",
            "Status is this invocation's: `ran`, `cached` (its output was complete), `failed`, or `skipped` (a "
            "step it needs did not finish, or it was not asked for); wall time is this invocation's.",
        ),  # fmt: skip
        ("table", ["step", "kind", "status", "uses", "output", "wall"], rows),
        ("pre", drawing),
    ]


def hardware_flops(step: dict, rows: list[dict]) -> tuple[float, float] | None:
    """(hardware FLOPs, MFU) of a train step from its logged windows, or None where no MFU was logged (CPU, or a
    GPU whose peak is unknown). Each window's MFU gives the device's peak (its tokens/s per device x FLOPs per
    token / MFU); the hardware FLOPs are that peak x the devices x the training time (the tokens at the windows'
    mean tokens/s: step times, without start-up), and the MFU their ratio to the model FLOPs."""
    summary = step.get("summary") or {}
    flops, tokens = float(summary.get("model_flops") or 0.0), float(summary.get("tokens") or 0.0)
    logged = [row for row in rows if row.get("mfu") and row.get("tokens_per_second")]
    if not (logged and flops and tokens):
        return None
    devices = int(step["config"].get("distributed", {}).get("num_workers", 1))
    per_token = flops / tokens
    peak = sum(row["tokens_per_second"] / devices * per_token / row["mfu"] for row in logged) / len(logged)
    seconds = tokens / (sum(row["tokens_per_second"] for row in logged) / len(logged))
    hardware = peak * devices * seconds
    return hardware, flops / hardware


def _compute_blocks(steps: dict, curves: dict, gpu_hour_usd: float | None) -> list[tuple]:
    rows, total_flops, total_gpu_hours = [], 0.0, 0.0
    for name, step in steps.items():
        if step["kind"] != "train":
            continue
        summary, used = step.get("summary") or {}, gpu_hours(step)
        flops = float(summary.get("model_flops") or 0.0)
        total_flops += flops
        total_gpu_hours += used
        measured = hardware_flops(step, curves[name])
        hardware, mfu = (f"{measured[0]:.3g}", f"{measured[1]:.1%}") if measured else ("-", "-")
        cost = f"${used * gpu_hour_usd:,.2f}" if gpu_hour_usd is not None and used else "-"
        rows.append([name, f"{int(summary.get('tokens', 0)):,}", f"{flops:.3g}", hardware, mfu,
                     f"{used:.2f}" if used else "CPU", cost])  # fmt: skip
    if not rows:
        return []
    total_cost = f"${total_gpu_hours * gpu_hour_usd:,.2f}" if gpu_hour_usd is not None else "-"
    rows.append(["all", "", f"{total_flops:.3g}", "", "", f"{total_gpu_hours:.2f}", total_cost])
    price = f"at ${gpu_hour_usd}/GPU-hour" if gpu_hour_usd is not None else "(give --gpu-hour-usd for a cost)"
    return [
        ("h2", "Compute"),
        (
            "p",
            "Model FLOPs: training FLOPs per token (6N plus attention, the tied embedding counted once) times the "
            "tokens trained, cooldown branches included. Hardware FLOPs: the device's peak (from the MFU the run "
            "logged on a GPU) x its devices x its step times; MFU: model over hardware FLOPs. GPU-hours: workers x "
            f"GPUs per worker x the step's time when it last ran (start-up included); cost {price}.",
        ),  # fmt: skip
        ("table", ["train step", "tokens", "model FLOPs", "hardware FLOPs", "MFU", "GPU-hours", "cost"], rows),
    ]


def _settings_blocks(steps: dict) -> list[tuple]:
    items = []
    for name, step in steps.items():
        changes = step.get("changes") or []
        what = "differs from its recipe in" if step["kind"] == "train" else "sets"
        items.append(f"`{name}` {what}: " + ("; ".join(f"`{c}`" for c in changes) if changes else "nothing"))
    return [("h2", "What each step sets"), ("ul", items)]


def _curve_blocks(curves: dict) -> list[tuple]:
    drawn = {name: rows for name, rows in curves.items() if any("loss" in row for row in rows)}
    if not drawn:
        return []
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.2))
    loss_ax, val_ax = figure.subplots(1, 2)
    for name, rows in drawn.items():
        trained = [(row["tokens"], row["loss"]) for row in rows if "loss" in row and "tokens" in row]
        evaluated = [(row["tokens"], row["val_loss"]) for row in rows if "val_loss" in row and "tokens" in row]
        if trained:
            loss_ax.plot(*zip(*trained), label=name, marker="." if len(trained) < 3 else None)
        if evaluated:
            val_ax.plot(*zip(*evaluated), label=name, marker="o")
    for ax, title in ((loss_ax, "training loss"), (val_ax, "validation loss")):
        ax.set_xlabel("tokens trained")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=8)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    return [("h2", "Training curves"), ("img", "Training and validation loss by step", png.getvalue())]


def _wandb_blocks(steps: dict) -> list[tuple]:
    """Where each train step logged to Weights & Biases (``logging.wandb``): its run's page, or the offline
    directory to upload with ``wandb sync``."""
    from minimind.train.reporting import WANDB_RECORD

    items = []
    for name, step in steps.items():
        path = storage.join(step["output"], WANDB_RECORD)
        if step["kind"] != "train" or not storage.is_file(path):
            continue
        run = json.loads(storage.read_text(path))
        if run.get("url"):
            items.append(f"`{name}`: [{run['project']}/{run['id']}]({run['url']})")
        else:
            items.append(f"`{name}`: logged offline; `wandb sync {run['offline_dir']}` uploads it")
    return [("h2", "Weights & Biases"), ("ul", items)] if items else []


def _eval_blocks(evals: dict) -> list[tuple]:
    blocks: list[tuple] = []
    for name, result in evals.items():
        if result is None:
            continue
        metrics = result.get("metrics", {})
        shown = [key for key in KEY_EVAL_METRICS if key in metrics] + sorted(
            key for key, value in metrics.items() if key not in KEY_EVAL_METRICS and isinstance(value, (int, float))
        )
        blocks += [("h2", f"Evaluation: {name}"),
                   ("table", ["metric", "value"], [[key, f"{metrics[key]:.4g}"] for key in shown])]  # fmt: skip
        subjects = metrics.get("choice_subjects") or {}
        if subjects:  # multiple choice by subject, with the questions found in the training corpora
            header = ["subject", "questions", "accuracy", "per byte", "chance", "contaminated"]
            rows = [[subject, str(block["questions"]), f"{block['accuracy']:.1%}",
                     f"{block['accuracy_per_byte']:.1%}", f"{block['chance']:.1%}",
                     str(block["contaminated"]) if "contaminated" in block else "-"]
                    for subject, block in subjects.items()]  # fmt: skip
            blocks.append(("table", header, rows))
        samples = result.get("samples") or []
        if samples:
            blocks.append(("table", ["prompt", "output"], [[s["prompt"], s["output"]] for s in samples]))
    return blocks


def _eval_result(output: str) -> dict | None:
    path = storage.join(output, "eval.json")
    return json.loads(storage.read_text(path)) if storage.is_file(path) else None


def _counts(steps: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step in steps.values():
        counts[step["status"]] = counts.get(step["status"], 0) + 1
    return counts


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))
