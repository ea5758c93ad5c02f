"""Command lines of ``ray_jobs/tune.py`` (run or resume a sweep) and ``ray_jobs/report.py``.

    python ray_jobs/tune.py --space search_spaces/pretrain.yaml --num-samples 24 --name lr-sweep
    python ray_jobs/tune.py --space search_spaces/pretrain.yaml --num-samples 8 --data.seq_len 256
    python ray_jobs/tune.py --resume runs/lr-sweep        # or the first command again
    python ray_jobs/report.py runs/lr-sweep

Extra ``--dotted.field VALUE`` options apply to every trial (on top of the space's overrides).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import threading
from pathlib import Path

from minimind import storage
from minimind.config import ConfigError, parse_override_args
from minimind.storage import is_uri
from minimind.tune.plan import Objective, SweepPlan
from minimind.tune.settings import SAMPLERS, SETTINGS_FILE, SweepSettings, load_settings, save_settings
from minimind.tune.space import load_space

SPACE_COPY = "space.yaml"
ENDED = ("finished", "pruned", "failed")  # a trial record's statuses once it will not train again


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray_jobs/tune.py",
        description="Ray Tune + Optuna sweep over a search space; extra --dotted.field VALUE options apply to every "
        "trial (to its first stage; --STAGE/dotted.field to a pipeline's later stage, e.g. --sft/data.train_files). "
        "Writes report.md, report.html and best.yaml into the sweep directory.",
    )
    parser.add_argument("--space", help="search space YAML (see search_spaces/)")
    parser.add_argument(
        "--num-samples", type=int, help="trials in all, the baseline included (default: 8; a grid's size for a grid)"
    )
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="tpe",
        help="Optuna's TPE (default), random, or the full grid of a space of choices and integer ranges",
    )
    parser.add_argument(
        "--startup-trials",
        type=int,
        help="tpe: trials drawn at random before TPE models the results (default: a fifth of the sweep, at least 3)",
    )
    parser.add_argument(
        "--no-early-stopping",
        dest="early_stopping",
        action="store_false",
        help="train every trial to its budget (no ASHA), e.g. as a baseline for the search itself",
    )
    parser.add_argument(
        "--objective",
        help="val_perplexity (min), continuation_accuracy, continuation_loglik, reward_accuracy (max), or a weighted "
        "mix that is maximised, e.g. 'continuation_accuracy=1,val_loss=-0.5' (default: the space's)",
    )
    parser.add_argument("--storage-path", default="runs", help="where sweeps live (default: runs)")
    parser.add_argument("--name", help="sweep name (default: sweep-<space file name>)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        help="trials at once (default: what the cluster can scale to, read from its autoscaler's limits, else what its "
        "nodes fit now; required where those limits cannot be read, e.g. KubeRay)",
    )
    parser.add_argument(
        "--optuna-storage", help="persistent Optuna study: sqlite:///sweep.db or a journal file path (optional)"
    )
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="finish an interrupted sweep (its directory)")
    return parser


def plan_from_settings(settings: SweepSettings) -> SweepPlan:
    space_file = storage.join(settings.sweep_dir, SPACE_COPY)
    space = load_space(space_file if storage.is_file(space_file) else settings.space_file, settings.cli_overrides)
    return SweepPlan(settings.name, settings.sweep_dir, space, Objective.parse(settings.objective))


def settings_from_args(argv: list[str]) -> tuple[SweepSettings, bool]:
    args, rest = build_parser().parse_known_args(argv)
    if args.resume:
        if args.space or rest:
            raise ConfigError("--resume: a restored sweep keeps its space and overrides; give only the directory")
        settings = load_settings(args.resume)
        if absolute(args.resume) != absolute(settings.sweep_dir):
            raise ConfigError(f"--resume: a sweep resumes where it ran ({settings.sweep_dir}), not in {args.resume}")
        return settings, True
    if not args.space:
        raise ConfigError("--space: give a search space (search_spaces/*.yaml), or --resume SWEEP_DIR")
    overrides = parse_override_args(rest)
    space = load_space(args.space, overrides)
    num_samples = args.num_samples or 8
    if args.sampler == "grid":
        grid_size = math.prod(len(values) for values in space.grid().values())
        if args.num_samples not in (None, grid_size):
            raise ConfigError(f"--num-samples: the grid of {args.space} has {grid_size} points, not {args.num_samples}")
        num_samples = grid_size
    if num_samples < 1:
        raise ConfigError("--num-samples: must be >= 1")
    if args.startup_trials is not None and args.startup_trials < 1:
        raise ConfigError("--startup-trials: must be >= 1")
    settings = SweepSettings(
        name=args.name or f"sweep-{Path(args.space).stem}",
        storage_path=absolute(args.storage_path),
        space_file=args.space,
        cli_overrides=overrides,
        objective=args.objective or space.objective,
        num_samples=num_samples,
        seed=args.seed,
        sampler=args.sampler,
        startup_trials=args.startup_trials,
        early_stopping=args.early_stopping,
        max_concurrent=args.max_concurrent,
        optuna_storage=args.optuna_storage,
    )
    if storage.is_file(storage.join(settings.sweep_dir, SETTINGS_FILE)):
        return same_sweep(settings), True
    return settings, False


def same_sweep(settings: SweepSettings) -> SweepSettings:
    """The sweep already in ``settings.sweep_dir`` when these settings and space are its own: the same command
    run again resumes it, as a Train run does. Anything else there is refused, naming what differs."""
    saved = load_settings(settings.sweep_dir)
    choices = [field.name for field in dataclasses.fields(SweepSettings) if field.name not in ("name", "storage_path")]
    differs = [
        f"{name}: {getattr(saved, name)!r} there, {getattr(settings, name)!r} now"
        for name in choices
        if getattr(saved, name) != getattr(settings, name)
    ]
    space_copy = storage.join(settings.sweep_dir, SPACE_COPY)
    if storage.is_file(space_copy) and storage.read_text(space_copy) != storage.read_text(settings.space_file):
        differs.append(f"the contents of {settings.space_file} changed since the sweep started")
    if differs:
        raise ConfigError(
            f"--name: {settings.sweep_dir} already holds a different sweep ({'; '.join(differs)}); run the same "
            f"command, or --resume {settings.sweep_dir}, to finish it, or choose another --name"
        )
    return saved


def record_sweep(settings: SweepSettings) -> None:
    """What a restore, a re-run of the same command and the report need: the settings and the space as run."""
    save_settings(settings)
    storage.write_text(storage.join(settings.sweep_dir, SPACE_COPY), storage.read_text(settings.space_file))


def absolute(path: str) -> str:
    """A local path made absolute (a sweep is found by where it lives); a URI as it is."""
    return path.rstrip("/") if is_uri(path) else str(Path(path).resolve())


def main(argv: list[str] | None = None) -> None:
    try:
        settings, resume = settings_from_args(sys.argv[1:] if argv is None else argv)
        plan = plan_from_settings(settings)
        plan.check()
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    import ray

    from minimind.tune.records import TrialFile, trial_ids
    from minimind.tune.results import best_length, write_sweep_report
    from minimind.tune.search import close_lost_optuna_trials
    from minimind.tune.sweep import build_tuner, restore_tuner, sweep_concurrency

    ray.init(ignore_reinit_error=True)
    if resume:
        with StopSignals() as stop:
            results = restore_tuner(settings, plan).fit()
    else:
        try:  # before anything is recorded: a refused sweep leaves no directory that a retry would differ from
            concurrency = sweep_concurrency(settings, plan)
        except ConfigError as error:
            print(f"config error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        record_sweep(settings)
        with StopSignals() as stop:
            results = build_tuner(settings, plan, concurrency).fit()
    interrupted = stop.received is not None or results.num_terminated + results.num_errors < settings.num_samples
    if resume and not interrupted:
        close_lost_optuna_trials(settings)
    report, best = write_sweep_report(settings, plan)
    print(f"[sweep] report: {report} (and report.html)", flush=True)
    # Tune returns normally when stopped: the sweep is then not done, which a script driving it must be able
    # to tell from the exit status. The signal itself says so: Tune's trial states after the stop do not (its
    # clean-up marks the trials it stops as terminated).
    if interrupted:
        ended = sum(TrialFile(storage.join(plan.sweep_dir, "trials", tid)).read().get("status") in ENDED
                    for tid in trial_ids(plan.sweep_dir))  # fmt: skip
        print(f"[sweep] interrupted with {ended} of {settings.num_samples} trials ended; finish it with: "
              f"python ray_jobs/tune.py --resume {plan.sweep_dir}", file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(130)
    if best is not None:
        length = best_length(plan, best)
        value = f"{best.objective:.4g}" if length is None else f"{length[1]:.4g} at {length[0]:,.0f} tokens"
        print(f"[sweep] best trial {best.trial_id}: {plan.objective.spec} {value} with {best.params}; "
              f"run it with: python ray_jobs/{plan.space.stage}.py --config {plan.sweep_dir}/best.yaml",
              flush=True)  # fmt: skip
        if plan.space.target is not None:
            print(f"[sweep] the target's recipe: python ray_jobs/{plan.space.stage}.py --config "
                  f"{plan.sweep_dir}/best-target.yaml", flush=True)  # fmt: skip


class StopSignals:
    """Ctrl-C or SIGTERM while a sweep runs: remembered, and handed to Tune as the SIGUSR1 on which it saves
    the experiment's state and returns from ``fit`` (its own Ctrl-C handler, disabled here, would leave the
    driver no trace of the stop). A second signal stops at once; one before Tune is listening, too."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach only the main thread (a sweep run from an experiment's task may not be)
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._stop)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _stop(self, number, frame) -> None:
        tune_listens = callable(signal.getsignal(signal.SIGUSR1))  # Tune's handler, set when its loop starts
        if self.received is not None or not tune_listens:
            raise KeyboardInterrupt
        self.received = number
        print(f"[sweep] {signal.Signals(number).name}: saving the sweep's state (again to stop at once)",
              file=sys.stderr, flush=True)  # fmt: skip
        os.kill(os.getpid(), signal.SIGUSR1)


def report_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ray_jobs/report.py", description="Write a sweep's report and best.yaml.")
    parser.add_argument("sweep", help="the sweep directory (STORAGE_PATH/NAME)")
    args = parser.parse_args(argv)
    from minimind.tune.results import write_sweep_report

    try:
        settings = load_settings(args.sweep)
        settings.storage_path = absolute(args.sweep).rsplit("/", 1)[0]  # the directory may have moved
        plan = plan_from_settings(settings)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    report, best = write_sweep_report(settings, plan)
    print(f"report: {report}" + (f"; best trial {best.trial_id}: {best.objective:.4g}" if best else ""), flush=True)
