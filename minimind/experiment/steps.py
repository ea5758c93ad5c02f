"""What each kind of step does, given its resolved config (output directories filled in).

Each function runs inside the Ray task the runner starts for the step and returns a small summary for the
provenance record. The work itself asks Ray for its resources: Ray Data's tasks and actors for ``prepare``
and ``eval``, Ray Train's workers for ``train``.
"""

from __future__ import annotations

from minimind import storage


def run_prepare(config: dict) -> dict:
    from minimind.config import from_dict
    from minimind.data.pipeline.prepare import PrepareOptions, prepare

    manifest = prepare(from_dict(PrepareOptions, config))
    return {
        "format": manifest.format,
        "tokens": sum(split["tokens"] for split in manifest.splits.values()),
        "rows": {name: split.get("rows") for name, split in manifest.splits.items()},
    }


def run_train(config: dict) -> dict:
    from minimind.config import build_config
    from minimind.train.compute import model_flops_per_token
    from minimind.train.distributed import fit
    from minimind.tune.records import read_rows

    if "recipe_from" in config:  # a sweep's best configuration, with the step's own fields on top
        from minimind.config import load_yaml

        train_config = build_config(load_yaml(config["recipe_from"]), config["recipe_overrides"])
    else:
        train_config = build_config(config)
    fit(train_config)
    rows = [row for row in read_rows(storage.join(train_config.checkpoint.dir, "metrics.jsonl")) if "tokens" in row]
    last = rows[-1] if rows else {}
    tokens = int(last.get("tokens", 0)) + int(last.get("cooldown_tokens", 0) or 0)
    evaluated = [row for row in rows if "val_loss" in row]
    summary = {"tokens": tokens, "model_flops": model_flops_per_token(train_config) * tokens}
    summary.update({key: evaluated[-1][key] for key in ("val_loss", "val_perplexity") if evaluated})
    return summary


def run_sweep(config: dict) -> dict:
    """``ray_jobs/tune.py`` for the step's space, its sweep directory the step's output (run again: resumed)."""
    import json

    from minimind.tune.launch import main
    from minimind.tune.records import TrialFile, trial_ids

    parent, name = config["out"].rstrip("/").rsplit("/", 1)
    argv = ["--space", config["space_file"], "--num-samples", str(config["num_samples"]), "--storage-path", parent,
            "--name", name, "--sampler", config["sampler"], "--seed", str(config["seed"])]  # fmt: skip
    if config["max_concurrent"] is not None:
        argv += ["--max-concurrent", str(config["max_concurrent"])]
    if not config["early_stopping"]:
        argv.append("--no-early-stopping")
    for field, value in config["overrides"].items():
        argv += [f"--{field}", json.dumps(value)]  # JSON is YAML, as the command line parses its values
    try:
        main(argv)
    except SystemExit as stopped:  # the command's exit status: 2 a bad space, 130 interrupted
        if stopped.code not in (0, None):
            raise RuntimeError(f"the sweep ended with exit status {stopped.code} (see its output)") from None
    trials = [TrialFile(storage.join(config["out"], "trials", tid)).read() for tid in trial_ids(config["out"])]
    statuses = [trial.get("status") for trial in trials]
    if not storage.is_file(storage.join(config["out"], "best.yaml")):
        raise RuntimeError(f"the sweep in {config['out']} wrote no best.yaml: no trial finished ({statuses})")
    return {"trials": len(trials), "finished": statuses.count("finished"), "pruned": statuses.count("pruned")}


def run_eval(config: dict) -> dict:
    from minimind.config import from_dict
    from minimind.eval.job import EvalOptions, run_eval

    _, _, result = run_eval(from_dict(EvalOptions, config))
    return {key: value for key, value in result["metrics"].items() if isinstance(value, (int, float))}


def run_export(config: dict) -> dict:
    from minimind.model.checkpoint import load_model

    model = load_model(config["checkpoint"], merge=True)
    if storage.is_uri(config["out"]):
        raise ValueError("export: write exports to a local or shared path (object storage is not supported yet)")
    if config["format"] == "hf":
        from minimind.model.hf import checkpoint_tokenizer, export_hf
        from minimind.tokenizer import load_tokenizer

        written = export_hf(model, load_tokenizer(checkpoint_tokenizer(config["checkpoint"])), config["out"])
    else:
        from pathlib import Path

        from minimind.model.minimind_format import export_minimind_pth

        Path(config["out"]).mkdir(parents=True, exist_ok=True)
        written = export_minimind_pth(model, f"{config['out']}/model.pth", config["dtype"])
    return {"written": str(written)}


RUNNERS = {"prepare": run_prepare, "train": run_train, "sweep": run_sweep, "eval": run_eval, "export": run_export}
