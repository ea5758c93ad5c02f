"""The best-config report of a sweep: report.md, a self-contained report.html and plots/*.png.

It renders plain records (``TrialRecord``, ``SweepSummary``) that the sweep driver collects, so it
needs no Ray and can be re-run on a finished or interrupted sweep. The report is built once as a
list of blocks (heading, paragraph, list, table, image) and written twice: as Markdown that links
the PNGs, and as HTML that inlines them, so the two never drift apart.

A trial's objective counts only when it is a finite number: a trial that failed, was never
evaluated, or reported NaN/inf has none, never wins, and sorts last.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure  # a bare Figure renders with Agg and needs no pyplot backend
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from minimind.pages import to_html, to_markdown
from minimind.tune.fidelity import fidelity_verdict, rank_fidelity, value_at

STATUSES = ("finished", "pruned", "failed", "running", "waiting", "pending")
STATUS_COLORS = {
    "finished": "tab:blue",
    "pruned": "tab:orange",
    "failed": "tab:red",
    "running": "tab:green",
    "waiting": "tab:olive",
    "pending": "tab:gray",
}
KEY_METRICS = ("val_perplexity", "continuation_accuracy")
LOSS_CURVE_TRIALS = 3
IMPORTANCE_MIN_TRIALS = 5
"""Fewer finished trials than this say nothing about importance (2 gave "warmup_steps 0.87")."""


@dataclass
class TrialRecord:
    """One trial of the sweep, as the driver last saw it."""

    trial_id: str
    params: dict[str, Any]
    """Searched dotted fields -> values, e.g. ``{"optim.lr": 3e-4, "optim.batch_size": 16}``."""
    status: str
    """One of ``STATUSES``."""
    objective: float | None
    """The sweep objective's last value; None when never evaluated."""
    metrics: dict[str, float]
    """Last reported metrics (val_perplexity, continuation_accuracy, loss, tokens, ...)."""
    tokens: int
    wall_seconds: float
    curve: list[dict] = field(default_factory=list)
    """Training metric rows, each with ``tokens`` and ``loss`` (maybe ``val_perplexity``)."""
    reason: str | None = None
    """Why it failed (or was pruned), one line."""
    is_baseline: bool = False
    evaluations: list[tuple[float, float]] = field(default_factory=list)
    """(tokens trained, objective) of each evaluation, in order: what it reported to Tune."""
    durations: list[tuple[float, float]] = field(default_factory=list)
    """(tokens, objective) of the run as if it had ended there: cooldown branches' and a finished run's end."""


@dataclass
class SweepSummary:
    """What the sweep asked for."""

    name: str
    objective: str
    """e.g. ``val_perplexity`` or ``continuation_accuracy=1,val_loss=-0.5``."""
    mode: str
    """``min`` or ``max``."""
    num_samples: int
    distributions: dict[str, optuna.distributions.BaseDistribution]
    best_configs: list[tuple[str, str]] = field(default_factory=list)
    """(file in the sweep directory, entry point ``ray_jobs/<it>.py`` that runs it), in run order:
    ``best.yaml``, and for a pipeline ``best-<stage>.yaml`` per later stage."""
    rungs: list[float] = field(default_factory=list)
    """ASHA's rungs, in trained tokens (for the rank-fidelity section)."""
    durations: list[float] = field(default_factory=list)
    """A duration sweep's candidate lengths in tokens (``budget.durations_tokens``)."""
    duration_epochs: list[int] = field(default_factory=list)
    """The same lengths in epochs, when the space gave them so (``optim.epochs`` under WSD)."""
    transfer: list[str] = field(default_factory=list)
    """A proxy sweep's account of its target: how ``best-target.yaml`` was made and what the sweep cost
    against one target run (``minimind/tune/transfer.py``); empty without a target."""


def best_reading(record: TrialRecord, durations: list[float], mode: str) -> tuple[float, int] | None:
    """A duration sweep's trial: its best reading at the sweep's ``durations`` and that duration's index
    (ties to the shorter), or None when it has none."""
    values = [(value, index) for index, duration in enumerate(durations)
              if (value := reading_at(record.durations, duration)) is not None]  # fmt: skip
    return min(values, key=lambda pair: (_directed(pair[0], mode), pair[1])) if values else None


def best_trial(records: list[TrialRecord], mode: str, durations: list[float] | None = None) -> TrialRecord | None:
    """The finished trial with the best objective; if none finished, the best pruned one; else None.

    A pruned trial's objective is an early reading at fewer tokens, so it only stands in when no
    trial ran to the end. Ties go to the earlier trial. In a duration sweep (``durations``) every reading
    at a duration is the end of a run of that length, so the trial with the best of them wins (ties to the
    shorter length), whatever its status.
    """
    if durations:
        scored = [(reading, order, record) for order, record in enumerate(records)
                  if (reading := best_reading(record, durations, mode)) is not None]  # fmt: skip
        if scored:
            return min(scored, key=lambda s: (_directed(s[0][0], mode), s[0][1], s[1]))[2]
    for status in ("finished", "pruned"):
        scored = [record for record in records if record.status == status and _objective(record) is not None]
        if scored:
            return min(scored, key=lambda record: _directed(_objective(record), mode))
    return None


def write_report(
    sweep_dir: Path, summary: SweepSummary, records: list[TrialRecord], location: str | None = None
) -> Path:
    """Writes sweep_dir/report.md, sweep_dir/report.html and sweep_dir/plots/*.png; returns report.md's path.
    ``location``: where the sweep lives, if not there (a report written locally for a sweep in object storage)."""
    if summary.mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {summary.mode!r}")
    sweep_dir = Path(sweep_dir)
    plots_dir = sweep_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    best = best_trial(records, summary.mode, summary.durations)
    blocks = _summary_blocks(summary, records) + _best_blocks(location or str(sweep_dir), summary, records, best)
    blocks += _transfer_blocks(summary)
    blocks += _duration_blocks(summary, records)
    blocks += _fidelity_blocks(summary, records)
    blocks += _plot_blocks(plots_dir, summary, records, best)
    blocks += [("h2", "Trials"), _trial_table(summary, records, best)]

    md_path = sweep_dir / "report.md"
    md_path.write_text(to_markdown(blocks), encoding="utf-8")
    html_page = to_html(blocks, f"Sweep report: {summary.name}", sweep_dir)
    (sweep_dir / "report.html").write_text(html_page, encoding="utf-8")
    return md_path


# ---- objectives and ordering ---------------------------------------------------------------------


def _objective(record: TrialRecord) -> float | None:
    """The record's objective, or None when it has no usable one (never evaluated, NaN or infinite)."""
    if record.objective is None:
        return None
    value = float(record.objective)
    return value if math.isfinite(value) else None


def _directed(value: float, mode: str) -> float:
    """Lower is better, whatever the mode: the sort key for objectives."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    return value if mode == "min" else -value


def _ranked(records: list[TrialRecord], mode: str) -> list[TrialRecord]:
    """Best first: trials with an objective, finished before pruned before the rest (their readings
    are earlier), each group by objective; trials without an objective last, in launch order."""
    order = ("finished", "pruned", "running", "waiting", "pending", "failed")
    status_rank = {status: rank for rank, status in enumerate(order)}

    def key(record: TrialRecord):
        value = _objective(record)
        if value is None:
            return (1, 0, 0.0)
        return (0, status_rank.get(record.status, len(status_rank)), _directed(value, mode))

    return sorted(records, key=key)  # stable: ties keep launch order, as in best_trial


def _baseline(records: list[TrialRecord]) -> TrialRecord | None:
    return next((record for record in records if record.is_baseline), None)


# ---- formatting ----------------------------------------------------------------------------------


def _fmt_value(value: Any) -> str:
    """Compact cell text: floats to 4 significant digits, the rest as is."""
    if value is None:
        return "—"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{float(value):.4g}"
    return str(value)


def _fmt_tokens(count: float) -> str:
    """1234567 -> 1.2M."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.1f}".removesuffix(".0") + suffix
    return f"{count:.0f}"


def _fmt_duration(seconds: float) -> str:
    """65 -> 1m 05s; 3725 -> 1h 02m 05s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _param_names(summary: SweepSummary, records: list[TrialRecord]) -> list[str]:
    """The searched fields: the space's order first, then any others the records carry."""
    names = list(summary.distributions)
    for record in records:
        names += [name for name in record.params if name not in names]
    return names


# ---- report sections -----------------------------------------------------------------------------


def _summary_blocks(summary: SweepSummary, records: list[TrialRecord]) -> list[tuple]:
    counts = {status: sum(record.status == status for record in records) for status in STATUSES}
    others = len(records) - sum(counts.values())
    by_status = ", ".join(f"{status} {count}" for status, count in counts.items())
    if others:
        by_status += f", other {others}"
    direction = "lower is better" if summary.mode == "min" else "higher is better"
    return [
        ("h1", f"Sweep report: {summary.name}"),
        (
            "ul",
            [
                f"Objective: `{summary.objective}` ({summary.mode}: {direction})",
                f"Trials asked for: {summary.num_samples}; recorded: {len(records)} ({by_status})",
                f"Tokens trained over all trials: {_fmt_tokens(sum(record.tokens for record in records))}"
                f" in {_fmt_duration(sum(record.wall_seconds for record in records))} of trial time",
            ],
        ),
    ]


def _best_blocks(
    location: str, summary: SweepSummary, records: list[TrialRecord], best: TrialRecord | None
) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Best trial")]
    if best is None:
        return blocks + [("p", "No trial finished, and no pruned trial has an objective: there is no best trial.")]
    reading = best_reading(best, summary.durations, summary.mode) if summary.durations else None
    if reading is not None:
        value, index = reading
        at = f"{_fmt_value(value)} at {length_labels(summary)[index]} (the best length of the best trial)"
        blocks.append(("p", f"Best trial: `{best.trial_id}` ({best.status}), `{summary.objective}` = {at}."))
    else:
        if best.status != "finished":
            note = "No trial finished: the best pruned trial stands in; its objective is an early reading."
            blocks.append(("p", note))
        value = _fmt_value(best.objective)
        blocks.append(("p", f"Best trial: `{best.trial_id}` ({best.status}), `{summary.objective}` = {value}."))
    if best.params:
        blocks.append(("ul", [f"`{name}` = {_fmt_value(value)}" for name, value in best.params.items()]))
    blocks.append(("p", _gain_sentence(summary, best, _baseline(records))))
    for order, (file_name, entry_point) in enumerate(summary.best_configs):
        command = f"`python ray_jobs/{entry_point}.py --config {location}/{file_name}`"
        lead = "Best config" if order == 0 else "then"
        if file_name == "best-target.yaml":  # not a next stage: the same stage at the target's size
            lead = "The target's recipe"
        blocks.append(("p", f"{lead}: `{file_name}` — run it with {command}"))
    return blocks


def _gain_sentence(summary: SweepSummary, best: TrialRecord, baseline: TrialRecord | None) -> str:
    """The best trial's objective against the baseline's, in absolute and relative terms."""
    if baseline is None:
        return "No baseline trial in this sweep, so there is no gain to report."
    if baseline is best:
        return f"The baseline `{baseline.trial_id}` is the best trial: no searched config beat it."
    reading = best_reading(best, summary.durations, summary.mode) if summary.durations else None
    if reading is not None:  # like with like: both runs' values at the best length
        best_value, index = reading
        base_value = reading_at(baseline.durations, summary.durations[index])
        label = length_labels(summary)[index]
        if base_value is None:
            return f"The baseline `{baseline.trial_id}` has no reading at {label}, so there is no gain to report."
        return _gain_words(summary, baseline, best_value, base_value) + f" Both are read at {label}."
    base_value = _objective(baseline)
    if base_value is None:
        why = f"failed ({baseline.reason or 'no reason recorded'})" if baseline.status == "failed" else baseline.status
        return f"The baseline `{baseline.trial_id}` has no objective ({why}), so there is no gain to report."
    best_value = _objective(best)
    at_baseline_end = ""
    if baseline.status != "finished" and baseline.evaluations and best.evaluations:
        # Like with like: the best trial's reading where the baseline's last one was (the baseline was stopped).
        tokens = baseline.evaluations[-1][0]
        earlier = value_at(best.evaluations, tokens)
        if earlier is not None and math.isfinite(earlier):
            at_baseline_end = (
                f" Both are read at the baseline's last evaluation ({_fmt_tokens(tokens)} tokens; it was "
                f"{baseline.status} there); at its end the best trial reached {_fmt_value(best_value)}."
            )
            best_value = earlier
    sentence = _gain_words(summary, baseline, best_value, base_value)
    if at_baseline_end:
        sentence += at_baseline_end
    elif baseline.status != "finished":
        sentence += f" The baseline was {baseline.status}: its objective is an early reading."
    return sentence


def _gain_words(summary: SweepSummary, baseline: TrialRecord, best_value: float, base_value: float) -> str:
    difference = best_value - base_value
    absolute = f"{_fmt_value(abs(difference))} {'lower' if difference < 0 else 'higher'}"
    comparison = f"`{summary.objective}` {_fmt_value(best_value)} vs baseline {_fmt_value(base_value)}"
    if base_value == 0:
        return f"Gain over the baseline `{baseline.trial_id}`: {comparison}: {absolute} (no relative gain over 0)."
    improvement = -difference if summary.mode == "min" else difference
    percent = improvement / abs(base_value) * 100
    relative = f"{abs(percent):.1f}% {'better' if improvement >= 0 else 'worse'}"
    return f"Gain over the baseline `{baseline.trial_id}`: {comparison}: {relative} ({absolute})."


DURATION_TOLERANCE = 0.1
"""A reading stands for a duration within this share of it (a branch ends on a step boundary)."""
NEAR_BEST = 0.01
"""A reading this close to the best one (relative) counts as reaching it, for the cheapest length."""


def reading_at(durations: list[tuple[float, float]], duration: float) -> float | None:
    """The reading (objective) nearest ``duration`` tokens, if one is within ``DURATION_TOLERANCE``."""
    near = [(abs(tokens - duration), value) for tokens, value in durations if math.isfinite(value)]
    near = [(gap, value) for gap, value in near if gap <= DURATION_TOLERANCE * duration]
    return min(near)[1] if near else None


def _transfer_blocks(summary: SweepSummary) -> list[tuple]:
    """A proxy sweep's target: how its recipe was made and the sweep's cost against one target run."""
    if not summary.transfer:
        return []
    text = "The trials trained a μP proxy; `best-target.yaml` is the target recipe with the best trial's values:"
    return [("h2", "Transfer to the target"), ("p", text), ("ul", summary.transfer)]


def length_labels(summary: SweepSummary) -> list[str]:
    """Each candidate duration as the report names it: its tokens, and its epochs when given so."""
    labels = [f"{_fmt_tokens(duration)} tokens" for duration in summary.durations]
    if len(summary.duration_epochs) == len(labels):
        return [f"{e} epoch{'s' if e > 1 else ''} ({label})" for e, label in zip(summary.duration_epochs, labels)]
    return labels


def _duration_blocks(summary: SweepSummary, records: list[TrialRecord]) -> list[tuple]:
    """Each trial's objective at each candidate duration (cooldown branches, and a finished run's end)."""
    if not summary.durations:
        return []
    header = ["trial", "status", *length_labels(summary)]
    rows, readings = [], []
    for record in _ranked(records, summary.mode):
        values = [reading_at(record.durations, duration) for duration in summary.durations]
        if any(value is not None for value in values):
            rows.append([record.trial_id, record.status, *(_fmt_value(value) for value in values)])
        readings += [(value, index, record.trial_id) for index, value in enumerate(values) if value is not None]
    text = (
        f"`{summary.objective}` of each trial had it ended at each length: a shorter length is a cooldown branch "
        "of the trial's one run (the decay a run of that length would have), the longest its end."
    )
    blocks = [("h2", "Objective against duration"), ("p", text), ("table", header, rows)]
    if readings:
        blocks.append(("p", _cheapest_near_best(summary, header[2:], readings)))
    return blocks


def _cheapest_near_best(summary: SweepSummary, lengths: list[str], readings: list[tuple[float, int, str]]) -> str:
    """The best reading, and the shortest length with a reading within ``NEAR_BEST`` of it: what a run that only
    has to come close to the best needs to train."""
    mode = summary.mode
    best, best_index, best_trial = min(readings, key=lambda r: (_directed(r[0], mode), r[1]))
    near = [r for r in readings if _directed(r[0], mode) - _directed(best, mode) <= NEAR_BEST * abs(best)]
    value, index, trial_id = min(near, key=lambda r: (r[1], _directed(r[0], mode)))
    share = summary.durations[index] / summary.durations[-1]
    return (
        f"Best reading: {_fmt_value(best)} (trial {best_trial}, {lengths[best_index]}). The shortest length within "
        f"{NEAR_BEST:.0%} of it: {lengths[index]}, {_fmt_value(value)} (trial {trial_id}), {share:.0%} of the longest "
        "length's tokens."
    )


def _fidelity_blocks(summary: SweepSummary, records: list[TrialRecord]) -> list[tuple]:
    """Spearman's rho per rung between the values there and the final ones, and what it says."""
    finals = {r.trial_id: _objective(r) for r in records if r.status == "finished" and _objective(r) is not None}
    evaluations = {record.trial_id: record.evaluations for record in records}
    fidelities = rank_fidelity(evaluations, finals, summary.rungs)
    blocks: list[tuple] = [("h2", "Rank fidelity"), ("p", fidelity_verdict(fidelities, len(finals)))]
    if fidelities:
        rows = [
            [_fmt_tokens(f.milestone), str(f.trials), "n/a" if f.rho is None else f"{f.rho:.2f}"] for f in fidelities
        ]
        blocks.append(("table", ["rung (tokens)", "trials that reached the end", "Spearman rho vs final"], rows))
    return blocks


def _trial_table(summary: SweepSummary, records: list[TrialRecord], best: TrialRecord | None) -> tuple:
    params = _param_names(summary, records)
    metrics = [name for name in KEY_METRICS if any(name in record.metrics for record in records)]
    header = ["trial", "status", "objective", *params, *metrics, "tokens", "wall", "reason"]
    rows = []
    for record in _ranked(records, summary.mode):
        marks = [mark for mark, applies in (("baseline", record.is_baseline), ("best", record is best)) if applies]
        trial = record.trial_id + (f" ({', '.join(marks)})" if marks else "")
        rows.append(
            [
                trial,
                record.status,
                _fmt_value(_objective(record)),
                *(_fmt_value(record.params.get(name)) for name in params),
                *(_fmt_value(record.metrics.get(name)) for name in metrics),
                _fmt_tokens(record.tokens),
                _fmt_duration(record.wall_seconds),
                record.reason or "",
            ]
        )
    return ("table", header, rows)


# ---- plots ---------------------------------------------------------------------------------------


class _CannotPlot(Exception):
    """A plot the records cannot support (too few trials, no curves); its message goes in the report."""


def _plot_blocks(
    plots_dir: Path, summary: SweepSummary, records: list[TrialRecord], best: TrialRecord | None
) -> list[tuple]:
    """Draws each plot and returns its report section: the image and its caption, or why it is missing."""
    plots = [
        ("objective_per_trial.png", "Objective per trial", _draw_objective_per_trial),
        ("loss_curves.png", "Loss curves", _draw_loss_curves),
        ("parallel_coordinates.png", "Parallel coordinates", _draw_parallel_coordinates),
        ("param_importance.png", "Parameter importance", _draw_param_importance),
    ]
    blocks: list[tuple] = [("h2", "Plots")]
    for filename, title, draw in plots:
        path = plots_dir / filename
        blocks.append(("h3", title))
        try:
            caption = draw(path, summary, records, best)
        except _CannotPlot as missing:
            path.unlink(missing_ok=True)  # a stale plot from an earlier report would contradict this one
            blocks.append(("p", f"Not drawn: {missing}."))
            continue
        except Exception as error:  # a plotting bug must not cost the whole report of a long sweep
            path.unlink(missing_ok=True)
            blocks.append(("p", f"Not drawn: plotting failed ({type(error).__name__}: {error})."))
            continue
        blocks += [("img", title, f"plots/{filename}"), ("p", caption)]
    return blocks


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _draw_objective_per_trial(path: Path, summary: SweepSummary, records: list[TrialRecord], best) -> str:
    if not any(_objective(record) is not None for record in records):
        raise _CannotPlot("no trial has an objective")
    figure = Figure(figsize=(8, 4.5))
    ax = figure.add_subplot()
    positions = range(1, len(records) + 1)
    for status in STATUSES + tuple(sorted({record.status for record in records} - set(STATUSES))):
        points = [
            (x, _objective(r)) for x, r in zip(positions, records) if r.status == status and _objective(r) is not None
        ]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, color=STATUS_COLORS.get(status, "black"), label=status, zorder=3)
    # Trials without an objective sit on the bottom edge, so a crash is visible rather than silently absent.
    missing = [x for x, record in zip(positions, records) if _objective(record) is None]
    if missing:
        ax.scatter(
            missing,
            [0.03] * len(missing),
            transform=ax.get_xaxis_transform(),
            marker="x",
            color="tab:red",
            label="no objective",
            zorder=3,
        )
    # The running best is best_trial over each prefix, so the line ends exactly at the reported best.
    running = [(x, best_trial(records[:x], summary.mode)) for x in positions]
    running = [(x, _objective(record)) for x, record in running if record is not None]
    if running:
        xs, ys = zip(*running)
        ax.step(xs, ys, where="post", color="black", linewidth=1, label="best so far")
    if best is not None:
        best_position = next(x for x, record in zip(positions, records) if record is best)
        ax.scatter(
            [best_position],
            [_objective(best)],
            marker="*",
            s=300,
            color="gold",
            edgecolor="black",
            label=f"best ({best.trial_id})",
            zorder=4,
        )
    baseline = _baseline(records)
    if baseline is not None and _objective(baseline) is not None:
        ax.axhline(_objective(baseline), color="gray", linestyle=":", label=f"baseline ({baseline.trial_id})")
    if len(records) <= 30:
        ax.set_xticks(list(positions), [record.trial_id for record in records], rotation=60, fontsize=7)
    ax.set_xlabel("trial (launch order)")
    ax.set_ylabel(summary.objective)
    ax.set_title(f"{summary.name}: objective per trial ({summary.mode})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(figure, path)
    return "Each trial's objective in launch order, colored by status; the line is the best so far, the star the best."


def _draw_loss_curves(path: Path, summary: SweepSummary, records: list[TrialRecord], best) -> str:
    top = [record for record in _ranked(records, summary.mode) if _objective(record) is not None][:LOSS_CURVE_TRIALS]
    baseline = _baseline(records)
    shown = top + ([baseline] if baseline is not None and all(record is not baseline for record in top) else [])
    figure = Figure(figsize=(8, 4.5))
    ax = figure.add_subplot()
    drawn = []
    for record in shown:
        points = [
            (row["tokens"], row["loss"])
            for row in record.curve
            if _is_finite(row.get("tokens")) and _is_finite(row.get("loss"))
        ]
        if not points:
            continue
        xs, ys = zip(*sorted(points))
        label = record.trial_id + (" (baseline)" if record.is_baseline else "") + (" (best)" if record is best else "")
        # A trial stopped at its first rung has one point, which a line alone would not show.
        marker = "o" if len(xs) == 1 else None
        ax.plot(xs, ys, label=label, linestyle="--" if record.is_baseline else "-", marker=marker)
        drawn.append(label)
    if not drawn:
        raise _CannotPlot("none of the best trials or the baseline has a training curve")
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("training loss")
    ax.set_title(f"{summary.name}: training loss of the best {LOSS_CURVE_TRIALS} trials and the baseline")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(figure, path)
    return f"Training loss against tokens trained: {', '.join(drawn)}."


def _is_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def _draw_parallel_coordinates(path: Path, summary: SweepSummary, records: list[TrialRecord], best) -> str:
    scored = [record for record in records if _objective(record) is not None]
    if len(scored) < 2:
        raise _CannotPlot("it needs at least two trials with an objective")
    names = _param_names(summary, scored)
    if not names:
        raise _CannotPlot("the sweep searched no parameters")
    axes = [
        _param_axis([record.params.get(name) for record in scored], summary.distributions.get(name)) for name in names
    ]
    objectives = [_objective(record) for record in scored]
    axes.append(_linear_axis(objectives, min(objectives), max(objectives)))

    figure = Figure(figsize=(max(6, 2.2 * len(axes)), 5))
    ax = figure.add_subplot()
    # Best is bright in either mode: the colormap runs from worst to best objective.
    colormap = "viridis_r" if summary.mode == "min" else "viridis"
    norm = Normalize(min(objectives), max(objectives) if max(objectives) > min(objectives) else min(objectives) + 1)
    mappable = ScalarMappable(norm=norm, cmap=colormap)
    for index, record in enumerate(scored):
        ys = [positions[index] for positions, _ in axes]
        emphasis = {"linewidth": 3, "zorder": 3} if record is best else {"linewidth": 1.2, "alpha": 0.8}
        color = mappable.to_rgba(objectives[index])
        ax.plot(range(len(axes)), ys, color=color, linestyle="--" if record.is_baseline else "-", **emphasis)
    for x, (_, ticks) in enumerate(axes):
        ax.axvline(x, color="black", linewidth=0.8)
        for y, label in ticks:
            ax.text(x + 0.03, y, label, fontsize=7, va="center")
    ax.set_xticks(range(len(axes)), [*names, summary.objective], fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.1, len(axes) - 0.6)
    ax.set_title(f"{summary.name}: parameters and objective (bold: best, dashed: baseline)")
    figure.colorbar(mappable, ax=ax, label=summary.objective)
    _save(figure, path)
    return (
        f"One line per trial with an objective ({len(scored)}). Each parameter axis spans its search range "
        "(log-scaled for log distributions; categorical choices by index); the last axis is the objective."
    )


def _param_axis(values: list[Any], distribution) -> tuple[list[float], list[tuple[float, str]]]:
    """Positions in [0, 1] of each value on one axis (NaN where a trial lacks it) and the tick labels."""
    if isinstance(distribution, CategoricalDistribution):
        return _choice_axis(values, list(distribution.choices))
    if isinstance(distribution, (FloatDistribution, IntDistribution)):
        if distribution.log:
            logs = [math.log(v) if _is_finite(v) and v > 0 else None for v in values]
            positions, _ = _linear_axis(logs, math.log(distribution.low), math.log(distribution.high))
            return positions, [(0.0, _fmt_value(distribution.low)), (1.0, _fmt_value(distribution.high))]
        return _linear_axis(values, distribution.low, distribution.high)
    # A field the space does not describe (e.g. only the baseline has it): scale to what was seen.
    numeric = [v for v in values if _is_finite(v)]
    if numeric and len(numeric) == sum(v is not None for v in values):
        return _linear_axis(values, min(numeric), max(numeric))
    labels = [None if v is None else str(v) for v in values]
    return _choice_axis(labels, sorted({label for label in labels if label is not None}))


def _linear_axis(values: list[Any], low: float, high: float) -> tuple[list[float], list[tuple[float, str]]]:
    span = high - low
    positions = [
        ((v - low) / span if span else 0.5) if _is_finite(v) and not isinstance(v, bool) else math.nan for v in values
    ]
    return positions, [(0.0, _fmt_value(low)), (1.0, _fmt_value(high))]


def _choice_axis(values: list[Any], choices: list[Any]) -> tuple[list[float], list[tuple[float, str]]]:
    """Choices spread evenly over [0, 1] in their listed order (one choice: the middle)."""

    def position(index: int) -> float:
        return index / (len(choices) - 1) if len(choices) > 1 else 0.5

    positions = [position(choices.index(v)) if v is not None and v in choices else math.nan for v in values]
    return positions, [(position(i), _fmt_value(choice)) for i, choice in enumerate(choices)]


def _draw_param_importance(path: Path, summary: SweepSummary, records: list[TrialRecord], best) -> str:
    importances, evaluator, trial_count = _param_importances(summary, records)
    ordered = sorted(importances.items(), key=lambda item: item[1])
    figure = Figure(figsize=(7, 1.5 + 0.5 * len(ordered)))
    ax = figure.add_subplot()
    ax.barh([name for name, _ in ordered], [value for _, value in ordered], color="tab:blue")
    ax.set_xlabel(f"importance ({evaluator})")
    ax.set_title(f"{summary.name}: parameter importance over {trial_count} finished trials")
    ax.grid(axis="x", alpha=0.3)
    _save(figure, path)
    listed = ", ".join(f"`{name}` {value:.2f}" for name, value in reversed(ordered))
    return f"{evaluator} importance of each varied parameter over {trial_count} finished trials: {listed}."


def _param_importances(summary: SweepSummary, records: list[TrialRecord]) -> tuple[dict[str, float], str, int]:
    """Optuna importances of the searched parameters, from an in-memory study of the finished trials.

    Only finished trials count: a pruned trial's objective is read at fewer tokens and would make
    its parameters look worse than they are. A study needs the same parameters in every trial, so
    it analyses those that most finished trials carry within the space; a trial lacking one (a
    conditional parameter not drawn, a baseline or enqueued point outside the range) sits out.
    """
    finished = [
        (record, _in_space(record.params, summary.distributions))
        for record in records
        if record.status == "finished" and _objective(record) is not None
    ]
    names = [
        name for name in summary.distributions if 2 * sum(name in params for _, params in finished) > len(finished)
    ]
    used = [(record, params) for record, params in finished if all(name in params for name in names)]
    names = [name for name in names if len({repr(params[name]) for _, params in used}) > 1]
    if len(used) < IMPORTANCE_MIN_TRIALS:
        raise _CannotPlot(
            f"parameter importance cannot be estimated yet: it needs at least {IMPORTANCE_MIN_TRIALS} finished "
            f"trials with parameters in the space, and there are {len(used)}"
        )
    if not names:
        raise _CannotPlot("parameter importance needs a parameter that varies across the finished trials")

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" on stderr
    try:
        study = optuna.create_study(direction="minimize" if summary.mode == "min" else "maximize")
        for record, params in used:
            kept = {name: params[name] for name in names}
            distributions = {name: summary.distributions[name] for name in names}
            study.add_trial(
                optuna.trial.create_trial(params=kept, distributions=distributions, value=_objective(record))
            )
        evaluator, evaluator_name = _importance_evaluator()
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator, params=names)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return dict(importances), evaluator_name, len(used)


def _importance_evaluator():
    """fANOVA (seeded, so reruns agree) when scikit-learn is installed; else PED-ANOVA, which needs only numpy."""
    try:
        return optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    except ImportError:
        return optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"


def _in_space(params: dict[str, Any], distributions: dict[str, Any]) -> dict[str, Any]:
    """The params that lie in their distribution (range, step or choices), as Optuna itself checks them."""
    kept = {}
    for name, value in params.items():
        if name not in distributions:
            continue
        try:
            optuna.trial.create_trial(params={name: value}, distributions={name: distributions[name]}, value=0.0)
        except (ValueError, TypeError):
            continue
        kept[name] = value
    return kept
