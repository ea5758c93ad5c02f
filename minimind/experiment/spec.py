"""An experiment file: named steps that refer to each other by name, checked whole before anything runs.

    name: sample-zh
    storage_path: runs/experiments            # local, shared, s3:// or gs://
    overrides: {distributed.use_gpu: true}    # optional: every train and sweep step's (theirs win)
    steps:
      pretrain_data: {prepare: {inputs: [data/sample/pretrain.jsonl], seq_len: 128, val_fraction: 0.02}}
      pretrain: {train: {stage: pretrain, recipe: recipes/tiny/pretrain.yaml, data: pretrain_data,
                         overrides: {optim.max_steps: 200}}}
      sft_data: {prepare: {inputs: [data/sample/sft.jsonl], seq_len: 256, val_fraction: 0.02}}
      sft: {train: {stage: sft, recipe: recipes/tiny/sft.yaml, init_from: pretrain, data: sft_data}}
      eval: {eval: {checkpoint: sft, data: sft_data}}

Step kinds and their fields:

- ``prepare``: :class:`~minimind.data.pipeline.prepare.PrepareOptions`' fields (``inputs`` required).
- ``train``: ``stage`` (pretrain, sft, lora, dpo, reasoning, distill), ``recipe``, ``data`` (prepare steps or
  paths), ``val_data`` (default: ``data`` when it names prepare steps, whose val splits are then scored),
  ``init_from`` and ``teacher`` (train steps), ``overrides`` (dotted fields).
- ``sweep``: ``space`` (a search space file), ``num_samples``, ``max_concurrent``, ``sampler``, ``seed``,
  ``early_stopping``, and ``data``, ``val_data``, ``init_from``, ``overrides`` for every trial; for a pipeline
  space, ``then_data`` maps each later stage (its ``then:`` name, e.g. ``sft``) to that stage's data. A train
  step with ``recipe: {best: SWEEP}`` trains the sweep's best configuration of the step's stage: ``best.yaml``
  for the space's stage, ``best-<stage>.yaml`` for a later one (checked now against that stage's base).
- ``eval``: ``checkpoint`` (a train step), ``data``, and :class:`~minimind.eval.job.EvalOptions`' other fields
  (``choices``, ``dev`` and ``shots`` for multiple-choice questions, ``contamination`` the prepare steps or
  files to look for them in);
  ``format`` and ``seq_len`` default to the checkpoint step's.
- ``export``: ``checkpoint`` (a train step), ``format`` (hf or minimind), ``dtype`` (minimind: bfloat16 or
  float32).

The top level's ``overrides`` (dotted config fields) apply to every train step and every sweep trial, under
each step's own ``overrides``; with ``distributed.use_gpu: true`` the eval steps' scoring actors take GPUs too
(``use_gpu``), so one line puts a whole experiment on GPUs. An eval step's own task (continuation score, chat
adherence, samples) runs on its node's CPU: it asks Ray for no GPU, which its scoring actors may need.

Settings from the command line (``--set KEY=VALUE``, the value read as YAML) go over the file's values before
it is checked: ``name``, ``storage_path``, ``overrides.DOTTED.FIELD`` (``overrides.distributed.use_gpu=true``),
``STEP.FIELD`` (``eval.max_new_tokens=16``) or ``STEP.overrides.DOTTED.FIELD``
(``pretrain.overrides.optim.max_steps=24``).

Each step's *resolved config* is what it runs with, where every other step's output appears as
``${step}``: the hash of a step (``graph.py``) covers that config, not where outputs happen to live.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from minimind import storage
from minimind.config import (
    ConfigError,
    build_config,
    config_to_dict,
    from_dict,
    load_yaml,
    load_yaml_document,
    yaml_child,
    yaml_key_lines,
)
from minimind.train.launch import ENTRY_POINTS as STAGES  # a train step's stage is an entry point's

KINDS = ("prepare", "train", "sweep", "eval", "export")
TOP_LEVEL = ("name", "storage_path", "description", "overrides", "steps")
DATA_FORMAT = {"pretrain": "pretrain", "sft": "sft", "lora": "sft", "dpo": "dpo", "reasoning": "r1", "distill": "sft"}
TRAIN_FIELDS = ("stage", "recipe", "data", "val_data", "init_from", "teacher", "overrides")
SWEEP_FIELDS = ("space", "num_samples", "max_concurrent", "sampler", "seed", "early_stopping", "data", "val_data",
                "then_data", "init_from", "overrides")  # fmt: skip
EXPORT_FORMATS = ("hf", "minimind")
SELF = "${self}"


def output_of(step_name: str) -> str:
    """The placeholder for a step's output directory in the resolved configs."""
    return f"${{{step_name}}}"


@dataclass
class Step:
    name: str
    kind: str
    line: int
    """Line of the step's name in the experiment file."""
    parents: dict[str, list[str]]
    """Field -> the steps it names (``data`` may name several)."""
    config: dict
    """The resolved config, other steps' outputs as ``${step}`` and this step's as ``${self}``."""
    inputs: list[str]
    """Files and directories read that no step writes: their content identity is part of the hash."""
    changes: list[str] = dataclasses.field(default_factory=list)
    """What the step sets, for people: a train step's fields that differ from its recipe, else its fields."""

    @property
    def parent_names(self) -> list[str]:
        return list(dict.fromkeys(name for names in self.parents.values() for name in names))


@dataclass
class Experiment:
    path: str
    name: str
    storage_path: str
    steps: dict[str, Step]
    """In the file's order."""
    text: str
    """The file as read (for the provenance record)."""
    settings: list[str] = dataclasses.field(default_factory=list)
    """The command line's ``--set KEY=VALUE`` settings, applied over the file."""

    @property
    def root(self) -> str:
        """Where this experiment's outputs, leases and records live: ``STORAGE_PATH/NAME``."""
        return storage.join(self.storage_path, self.name)

    def order(self) -> list[str]:
        """The steps with every step after the steps it names (file order otherwise)."""
        done: list[str] = []
        pending = list(self.steps)
        while pending:
            ready = next(name for name in pending if all(p in done for p in self.steps[name].parent_names))
            done.append(ready)
            pending.remove(ready)
        return done

    def descendants(self, names: typing.Iterable[str]) -> set[str]:
        """The steps that depend on any of ``names``, directly or not (``names`` themselves excluded)."""
        found: set[str] = set()
        frontier = set(names)
        while frontier:
            children = {s.name for s in self.steps.values() if frontier & set(s.parent_names)} - found
            found |= children
            frontier = children
        return found


def load_experiment(path: str | Path, settings: typing.Sequence[str] = ()) -> Experiment:
    """Parse and check ``path`` whole (unknown keys, kinds and steps, cycles, every train step's config), with
    ``settings`` (``KEY=VALUE``, see the module's docstring) over the file's values.

    Raises :class:`ConfigError` naming ``FILE:LINE: steps.STEP.FIELD: what`` (for a value set on the command
    line, the line of the step or field it replaced)."""
    path = str(path)
    raw, root, text = load_yaml_document(path, "the experiment", " (name, storage_path, steps)")
    raw = apply_settings(raw, settings)
    lines = yaml_key_lines(root)

    def fail(where: str, message: str, line: int | None = None) -> typing.NoReturn:
        raise ConfigError(f"{path}:{line or lines.get(where.split('.')[0], 1)}: {where}: {message}")

    for key in raw:
        if key not in TOP_LEVEL:
            fail(str(key), f"unknown key (valid: {', '.join(TOP_LEVEL)})")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        fail("name", "the experiment's name is required: a non-empty string without '/'")
    storage_path = raw.get("storage_path", "runs/experiments")
    if not isinstance(storage_path, str) or not storage_path:
        fail("storage_path", "must be a path or a URI (s3://, gs://)")
    defaults = raw.get("overrides") or {}
    if not isinstance(defaults, dict) or not all(isinstance(key, str) for key in defaults):
        fail("overrides", "must map dotted config fields to values, for every train and sweep step "
             "(e.g. distributed.use_gpu: true)")  # fmt: skip
    defaults = Defaults(defaults, path, yaml_key_lines(yaml_child(root, "overrides")))
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, dict) or not steps_raw:
        fail("steps", "must map step names to steps (e.g. pretrain: {train: {...}})")
    steps_node = yaml_child(root, "steps")
    step_lines = yaml_key_lines(steps_node)

    kinds: dict[str, str] = {}
    for step_name, body in steps_raw.items():
        where, line = f"steps.{step_name}", step_lines.get(str(step_name), lines.get("steps", 1))
        if not isinstance(step_name, str) or not step_name.replace("_", "").replace("-", "").isalnum():
            fail(where, "a step's name is letters, digits, '_' and '-'", line)
        if step_name == "self":
            fail(where, "'self' is reserved", line)
        if not isinstance(body, dict) or len(body) != 1:
            fail(where, f"must be a mapping with one key, the step's kind ({', '.join(KINDS)})", line)
        [kind] = body
        if kind not in KINDS:
            kind_line = yaml_key_lines(yaml_child(steps_node, step_name)).get(str(kind), line)
            fail(f"{where}.{kind}", f"unknown step kind (valid: {', '.join(KINDS)})", kind_line)
        kinds[step_name] = kind

    steps: dict[str, Step] = {}
    for step_name, body in steps_raw.items():
        kind = kinds[step_name]
        fields = body[kind] if body[kind] is not None else {}
        where, line = f"steps.{step_name}.{kind}", step_lines[step_name]
        kind_node = yaml_child(yaml_child(steps_node, step_name), kind)
        field_lines = yaml_key_lines(kind_node)
        if not isinstance(fields, dict):
            fail(where, "must be a mapping of the step's fields", line)
        parser = _StepParser(path, step_name, kind, fields, where, line, field_lines, kind_node, kinds, steps_raw,
                             defaults)  # fmt: skip
        steps[step_name] = parser.parse()
    experiment = Experiment(path, name, storage_path, steps, text, list(settings))
    _check_acyclic(experiment, fail, step_lines)
    return experiment


def apply_settings(raw: dict, settings: typing.Sequence[str]) -> dict:
    """The experiment's mapping with each ``KEY=VALUE`` of ``settings`` set (a copy; VALUE read as YAML)."""
    raw = copy.deepcopy(raw)
    for setting in settings:
        key, equals, text = setting.partition("=")

        def fail(message: str, setting=setting) -> typing.NoReturn:
            raise ConfigError(f"--set {setting}: {message}")

        if not equals or not key:
            fail("expected KEY=VALUE (name, storage_path, overrides.DOTTED.FIELD, STEP.FIELD or "
                 "STEP.overrides.DOTTED.FIELD)")  # fmt: skip
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            fail(f"the value is not YAML ({str(error).splitlines()[0]})")
        if key in ("name", "storage_path"):
            raw[key] = value
            continue
        step, _, field = key.partition(".")
        if step == "overrides" and field:  # the experiment's, for every train and sweep step
            if not isinstance(raw.setdefault("overrides", {}), dict):
                fail("the file's overrides is not a mapping")
            raw["overrides"][field] = value
            continue
        steps = raw.get("steps") if isinstance(raw.get("steps"), dict) else {}
        if step not in steps:
            fail(f"no step {step!r} (steps: {', '.join(map(str, steps))}; or name, storage_path, overrides.FIELD)")
        body = steps[step]
        if not isinstance(body, dict) or len(body) != 1:
            fail(f"steps.{step} is not a step with one kind")
        [kind] = body
        fields = body[kind] if isinstance(body[kind], dict) else {}
        body[kind] = fields
        head, _, rest = field.partition(".")
        if not head:
            fail("name the field to set: STEP.FIELD")
        if rest and head != "overrides":
            fail(f"{head} is set whole (only overrides take a dotted field: {step}.overrides.optim.lr=...)")
        if rest:
            overrides = fields.setdefault("overrides", {})
            if not isinstance(overrides, dict):
                fail(f"steps.{step}.{kind}.overrides is not a mapping")
            overrides[rest] = value
        else:
            fields[head] = value
    return raw


@dataclass
class Defaults:
    """The experiment's top-level ``overrides``: every train step's and sweep trial's, under the step's own."""

    overrides: dict
    path: str
    lines: dict[str, int]

    def under(self, step_overrides: dict) -> dict:
        return {**self.overrides, **step_overrides}

    @property
    def use_gpu(self) -> bool:
        return self.overrides.get("distributed.use_gpu") is True


class _StepParser:
    """One step's fields checked and resolved; steps it names are looked up in ``kinds``."""

    def __init__(self, path, name, kind, fields, where, line, field_lines, node, kinds, steps_raw, defaults):
        self.path, self.name, self.kind, self.fields = path, name, kind, fields
        self.where, self.line, self.field_lines, self.node = where, line, field_lines, node
        self.kinds, self.steps_raw, self.defaults = kinds, steps_raw, defaults
        self.parents: dict[str, list[str]] = {}
        self.inputs: list[str] = []
        self.recipe_changes: list[str] = []

    def fail(self, field: str | None, message: str, line: int | None = None) -> typing.NoReturn:
        where = f"{self.where}.{field}" if field else self.where
        line = line or (self.field_lines.get(field.split(".")[0]) if field else None) or self.line
        raise ConfigError(f"{self.path}:{line}: {where}: {message}")

    def parse(self) -> Step:
        config = getattr(self, f"_{self.kind}")()
        changes = self.recipe_changes if self.kind == "train" else [f"{k}: {v}" for k, v in self.fields.items()]
        return Step(self.name, self.kind, self.line, self.parents, config, self.inputs, changes)

    # -- references ------------------------------------------------------------------------------

    def step_ref(self, field: str, want: tuple[str, ...], required: bool = False, value=None) -> str | None:
        """The step ``field`` names (one of the kinds ``want``), as its output placeholder."""
        value = self.fields.get(field) if value is None else value
        if value is None:
            if required:
                self.fail(field, f"required: the name of a {' or '.join(want)} step")
            return None
        if not isinstance(value, str) or value not in self.kinds:
            self.fail(field, f"{value!r} is not a step of this experiment (steps: {', '.join(self.kinds)})")
        if self.kinds[value] not in want:
            self.fail(field, f"{value!r} is a {self.kinds[value]} step; this needs a {' or '.join(want)} step")
        if value == self.name:
            self.fail(field, "a step cannot use its own output")
        self.parents.setdefault(field, []).append(value)
        return output_of(value)

    def data_ref(self, field: str, required: bool = False, value=None) -> list[str] | None:
        """``field``'s data (or ``value``, found under ``field``): prepare steps (their outputs) and paths, one or
        a list."""
        value = self.fields.get(field) if value is None else value
        if value is None:
            if required:
                self.fail(field, "required: a prepare step's name, or files (a list of either)")
            return None
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(item, str) and item for item in items):
            self.fail(field, "must be a prepare step's name or a path, or a list of them")
        resolved = []
        for item in items:
            if item in self.kinds:
                if self.kinds[item] != "prepare":
                    self.fail(field, f"{item!r} is a {self.kinds[item]} step; data comes from prepare steps or files")
                self.parents.setdefault(field, []).append(item)
                resolved.append(output_of(item))
            else:
                self.input_path(field, item)
                resolved.append(item)
        return resolved

    def prepared_seq_len(self, field: str) -> int | None:
        """The sequence length the prepare steps named in ``field`` pack to (they must agree), or None."""
        from minimind.data.pipeline.prepare import PrepareOptions

        lengths = set()
        for name in self.parents.get(field, []):
            fields = self.steps_raw[name]["prepare"] or {}
            lengths.add(fields.get("seq_len", PrepareOptions.seq_len) if isinstance(fields, dict) else None)
        if len(lengths) > 1:
            self.fail(field, f"its prepare steps pack to different sequence lengths ({sorted(map(str, lengths))})")
        return lengths.pop() if lengths else None

    def check_prepared_tokenizer(self, field: str, tokenizer: str | None) -> None:
        """A train step reads its prepare steps' token ids with its own tokenizer (``data.tokenizer``): they must
        be the same, or training refuses the shards only once the prepare steps have run."""
        from minimind.tokenizer import load_tokenizer

        for name in self.parents.get(field, []):
            fields = self.steps_raw[name]["prepare"] or {}
            prepared = fields.get("tokenizer") if isinstance(fields, dict) else None
            if prepared == tokenizer:
                continue
            try:
                same = load_tokenizer(prepared).fingerprint == load_tokenizer(tokenizer).fingerprint
            except (OSError, ValueError):
                same = False
            if not same:
                theirs, ours = prepared or "the bundled tokenizer", tokenizer or "the bundled tokenizer"
                self.fail(field, f"prepare step {name} tokenizes with {theirs}, this step with {ours} "
                          "(data.tokenizer): give both the same")  # fmt: skip

    def held_out(self, field: str) -> list[str]:
        """The outputs of the prepare steps ``field`` names that hold a validation split (val_fraction > 0)."""
        from minimind.data.pipeline.prepare import PrepareOptions

        held = []
        for name in self.parents.get(field, []):
            fields = self.steps_raw[name]["prepare"] or {}
            if isinstance(fields, dict) and fields.get("val_fraction", PrepareOptions.val_fraction):
                held.append(output_of(name))
        return held

    def best_of_sweep(self, sweep: str, stage: str) -> tuple[str, dict]:
        """(the file in sweep step ``sweep``'s output holding its best config for ``stage``, that stage's base
        config: its recipe with the space's and the sweep step's overrides)."""
        from minimind.tune.results import BEST_CONFIG
        from minimind.tune.space import load_space

        fields = self.steps_raw[sweep]["sweep"] or {}
        try:
            space = load_space(fields["space"], dict(fields.get("overrides") or {}))
        except (KeyError, TypeError, OSError, ConfigError):
            return BEST_CONFIG, {}  # the sweep step's own checks name what is wrong
        if stage == space.stage:
            return BEST_CONFIG, space.base
        later = [entry for entry in space.then if entry.stage == stage]
        if len(later) != 1:
            tuned = ", ".join([space.stage, *(entry.stage for entry in space.then)])
            self.fail("recipe", f"sweep {sweep!r} tunes the stages {tuned}; a {stage} step "
                      + ("cannot use its best" if not later else "is ambiguous there"))  # fmt: skip
        return f"best-{later[0].name}.yaml", later[0].base

    def input_path(self, field: str, value: str) -> None:
        if not storage.is_uri(value) and not Path(value).exists():
            self.fail(field, f"{value!r} is neither a step of this experiment nor an existing file or directory")
        self.inputs.append(value)

    def outside_checkpoint(self, path: str) -> str:
        """A start the recipe (or the overrides) names outside this experiment: pinned to the exact checkpoint it
        stands for now, which the step's hash then covers (a newer checkpoint of that run is another start)."""
        from minimind.model.checkpoint import checkpoint_location

        try:
            return checkpoint_location(path)
        except (OSError, FileNotFoundError):
            self.fail("init_from", f"the recipe starts from {path!r} (checkpoint.init_from), which is neither a "
                      "step of this experiment nor a checkpoint here: name a train step in init_from, or set "
                      "overrides checkpoint.init_from: null to train from scratch")  # fmt: skip

    def only(self, allowed: typing.Iterable[str]) -> None:
        allowed = list(allowed)
        for key in self.fields:
            if key not in allowed:
                self.fail(str(key), f"unknown field (valid: {', '.join(allowed)})")

    # -- the kinds -------------------------------------------------------------------------------

    def _prepare(self) -> dict:
        from minimind.data.formats import FORMATS
        from minimind.data.pipeline.prepare import PrepareOptions

        names = [f.name for f in dataclasses.fields(PrepareOptions) if f.name != "out"]
        self.only(names)
        inputs = self.fields.get("inputs")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            self.fail("inputs", "required: the jsonl files (or globs of them, data/*.jsonl) to prepare")
        for item in inputs:
            if storage.is_uri(item):
                self.input_path("inputs", item)
                continue
            matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            if not matches:
                self.fail("inputs", f"no file matches {item!r}")
            for match in matches:  # each file's content is part of the hash: a file added to a glob changes it
                if Path(match).is_dir():
                    self.fail("inputs", f"{match!r} is a directory: name its files, or a glob ({match}/*.jsonl)")
                self.input_path("inputs", match)
        try:
            options = from_dict(PrepareOptions, {**self.fields, "inputs": inputs, "out": SELF})
        except ConfigError as error:
            self._fail_config(error)
        if options.format is not None and options.format not in FORMATS:
            self.fail("format", f"unknown format {options.format!r} (valid: {', '.join(FORMATS)}, or leave it out)")
        if options.seq_len <= 1:
            self.fail("seq_len", "must be at least 2")
        if not 0 <= options.val_fraction < 1:
            self.fail("val_fraction", "must be in [0, 1)")
        if options.tokenizer is not None:
            self.input_path("tokenizer", options.tokenizer)
        return dataclasses.asdict(options)

    def _train(self) -> dict:
        self.only(TRAIN_FIELDS)
        stage = self.fields.get("stage")
        if stage not in STAGES:
            self.fail("stage", f"required, one of {', '.join(STAGES)}")
        run_stage, defining = STAGES[stage]
        recipe = self.fields.get("recipe")
        raw: dict = {}
        best_of = None
        if isinstance(recipe, dict):  # {best: SWEEP}: the sweep's best.yaml, once the sweep is done
            if set(recipe) != {"best"}:
                self.fail("recipe", "a recipe's path, or {best: SWEEP_STEP} for a sweep's best configuration")
            best_of = self.step_ref("recipe", ("sweep",), value=recipe["best"])
            best_file, raw = self.best_of_sweep(recipe["best"], stage)  # what it will be, but for searched values
        elif recipe is not None:
            if not isinstance(recipe, str):
                self.fail("recipe", "must be a recipe's path (recipes/...yaml), or {best: SWEEP_STEP}")
            self.input_path("recipe", recipe)
            try:
                raw = load_yaml(recipe)
            except (OSError, ConfigError) as error:
                self.fail("recipe", str(error))
            if raw.get("stage", run_stage) != run_stage:
                self.fail("recipe", f"{recipe} is a {raw['stage']!r} recipe; this step's stage is {stage!r}")
        overrides = self.fields.get("overrides") or {}
        if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
            self.fail("overrides", "must map dotted config fields to values (e.g. optim.lr: 3.0e-4)")
        overrides = self.defaults.under(overrides)
        resolved = {"stage": run_stage, **defining, **overrides, "checkpoint.dir": SELF}
        mixture = "data.mixture" in overrides  # the sources are named there (files only)
        for index, source in enumerate(overrides.get("data.mixture") or []):
            for item in source.get("files", []) if isinstance(source, dict) else []:
                if isinstance(item, str):  # their content is part of the hash, as data's is
                    self.input_path(f"overrides.data.mixture[{index}].files", item)
        data = self.data_ref("data", required=not mixture)
        resolved["data.train_files"] = data or []
        if not mixture:
            resolved["data.mixture"] = []  # not the recipe's: this step's data is what it names
        val_data = self.data_ref("val_data")
        if val_data is None and "val_data" not in self.fields:
            val_data = self.held_out("data") or None
        if val_data is not None:
            resolved["eval.val_files"] = val_data
        prepared = self.prepared_seq_len("data")
        if prepared is not None:  # training reads the blocks as they were packed
            if "data.seq_len" in overrides and overrides["data.seq_len"] != prepared:
                self.fail("overrides", f"data.seq_len {overrides['data.seq_len']} differs from its data's seq_len "
                          f"{prepared} (prepare steps {', '.join(self.parents['data'])})")  # fmt: skip
            resolved["data.seq_len"] = prepared
        data_tokenizer = overrides.get("data.tokenizer", (raw.get("data") or {}).get("tokenizer"))
        self.check_prepared_tokenizer("data", data_tokenizer)
        init_from = self.step_ref("init_from", ("train",))
        if init_from is not None:
            resolved["checkpoint.init_from"] = init_from
        elif run_stage in ("dpo",) or stage == "lora":
            self.fail("init_from", f"a {stage} step starts from a train step's model: name it here")
        elif outside := overrides.get("checkpoint.init_from", (raw.get("checkpoint") or {}).get("init_from")):
            resolved["checkpoint.init_from"] = self.outside_checkpoint(outside)
        if data_tokenizer:
            self.input_path("overrides.data.tokenizer", data_tokenizer)
        teacher = self.step_ref("teacher", ("train",), required=stage == "distill")
        if teacher is not None:
            if stage != "distill":
                self.fail("teacher", "only a distill step has a teacher")
            resolved["objective.teacher"] = teacher
        try:
            config = config_to_dict(build_config(raw, resolved))
            recipe = config_to_dict(build_config(raw, {"stage": run_stage, **defining}))
        except ConfigError as error:
            self._fail_config(error, overrides)
        self.recipe_changes = dotted_changes(recipe, config)
        if best_of is not None:  # built again at run time from the sweep's best.yaml with these overrides
            config = {**config, "recipe_from": f"{best_of}/{best_file}", "recipe_overrides": resolved}
        return config

    def _sweep(self) -> dict:
        from minimind.tune.settings import SAMPLERS
        from minimind.tune.space import load_space

        self.only(SWEEP_FIELDS)
        space = self.fields.get("space")
        if not isinstance(space, str):
            self.fail("space", "required: a search space file (search_spaces/...yaml)")
        self.input_path("space", space)
        overrides = self.fields.get("overrides") or {}
        if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
            self.fail("overrides", "must map dotted config fields to values, applied to every trial")
        trial_overrides = self.defaults.under(overrides)
        data = self.data_ref("data")
        if data is not None:
            trial_overrides.update({"data.train_files": data, "data.mixture": []})
            prepared = self.prepared_seq_len("data")
            if prepared is not None:
                trial_overrides["data.seq_len"] = prepared
        val_data = self.data_ref("val_data")
        if val_data is None and "val_data" not in self.fields:
            val_data = self.held_out("data") or None
        if val_data is not None:
            trial_overrides["eval.val_files"] = val_data
        init_from = self.step_ref("init_from", ("train",))
        if init_from is not None:
            trial_overrides["checkpoint.init_from"] = init_from
        try:
            loaded = load_space(space, trial_overrides)
        except ConfigError as error:
            self.fail("space", str(error))
        later_stages = [later.name for later in loaded.then]
        for later in later_stages:  # the experiment's overrides are every stage's (a pipeline's SFT too)
            for key, value in self.defaults.overrides.items():
                trial_overrides.setdefault(f"{later}/{key}", value)
        then_data = self.fields.get("then_data")
        if then_data is not None and (not isinstance(then_data, dict) or not then_data):
            self.fail("then_data", "must map a later stage of the space (e.g. sft: sft_data) to its data")
        for later, value in (then_data or {}).items():
            if later not in later_stages:
                self.fail("then_data", f"{later!r} is not a later stage of {space} (its then: stages: "
                          f"{', '.join(later_stages) or 'none'})")  # fmt: skip
            field = f"then_data.{later}"
            trial_overrides.update({f"{later}/data.train_files": self.data_ref(field, True, value),
                                    f"{later}/data.mixture": []})  # fmt: skip
            if (prepared := self.prepared_seq_len(field)) is not None:
                trial_overrides[f"{later}/data.seq_len"] = prepared
            if held := self.held_out(field):
                trial_overrides[f"{later}/eval.val_files"] = held
        try:
            loaded = load_space(space, trial_overrides)
        except ConfigError as error:
            self.fail("then_data" if then_data else "space", str(error))
        # The recipes the space names are read at run time: what they hold (with the overrides) is part of
        # the step's config, so an edited recipe is a new sweep, as an edited space is.
        bases = {"trials": loaded.base, **{later.name: later.base for later in loaded.then}}
        if loaded.target is not None:
            bases["target"] = loaded.target.base
        settings = {"num_samples": 8, "max_concurrent": None, "sampler": "tpe", "seed": 0, "early_stopping": True}
        for field, default in settings.items():
            value = self.fields.get(field, default)
            if field == "sampler" and value not in SAMPLERS:
                self.fail(field, f"one of {', '.join(SAMPLERS)}")
            if field == "early_stopping" and not isinstance(value, bool):
                self.fail(field, "true or false")
            if field in ("num_samples", "max_concurrent", "seed") and value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "seed" else 1):
                    self.fail(field, "a positive integer" if field != "seed" else "an integer >= 0")
            settings[field] = value
        return {"space_file": space, "space": load_yaml(space), "bases": bases, **settings,
                "overrides": trial_overrides, "out": SELF}  # fmt: skip

    def _eval(self) -> dict:
        from minimind.data.formats import FORMATS
        from minimind.eval.job import EvalOptions

        names = [f.name for f in dataclasses.fields(EvalOptions) if f.name != "out"]
        self.only(names)
        checkpoint = self.step_ref("checkpoint", ("train",), required=True)
        data = self.data_ref("data", required=True)
        source = self.steps_raw[self.parents["checkpoint"][0]]["train"] or {}
        source_stage = source.get("stage") if isinstance(source, dict) else None
        fields = {**self.fields, "checkpoint": checkpoint, "data": data, "out": SELF}
        fields.setdefault("format", DATA_FORMAT.get(source_stage, "pretrain"))
        if self.defaults.use_gpu:  # an experiment on GPUs scores on them too
            fields.setdefault("use_gpu", True)
        if str(fields.get("device", "auto")).startswith("cuda"):
            self.fail("device", "an eval step's own task runs without a GPU (its scoring actors take GPUs with "
                      "use_gpu: true): leave device auto or cpu")  # fmt: skip
        if fields["format"] not in FORMATS:
            self.fail("format", f"unknown format {fields['format']!r} (valid: {', '.join(FORMATS)})")
        reference = self.step_ref("reference", ("train",))
        if reference is not None:
            fields["reference"] = reference
        elif fields["format"] == "dpo":
            self.fail("reference", "a DPO evaluation compares with a reference model: name its train step")
        if "seq_len" not in fields and self.prepared_seq_len("data") is not None:  # the data's
            fields["seq_len"] = self.prepared_seq_len("data")
        if "seq_len" not in fields:  # the checkpoint's
            try:
                fields["seq_len"] = _train_seq_len(self.steps_raw, self.parents["checkpoint"][0])
            except (OSError, ConfigError, TypeError, AttributeError):
                self.fail("seq_len", f"cannot read it from step {self.parents['checkpoint'][0]!r}: give it here")
        for field in ("adapter", "tokenizer"):
            if fields.get(field) is not None:
                self.input_path(field, fields[field])
        for field in ("choices", "dev"):  # question files: their content is part of the hash
            files = fields.get(field) or []
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                self.fail(field, "a list of question files (C-Eval/CMMLU CSV or jsonl)")
            for path in files:
                self.input_path(field, path)
        contamination = self.data_ref("contamination")  # training corpora: prepare steps or files
        if contamination is not None:
            fields["contamination"] = contamination
        try:
            options = from_dict(EvalOptions, fields)
        except ConfigError as error:
            self._fail_config(error)
        return dataclasses.asdict(options)

    def _export(self) -> dict:
        self.only(("checkpoint", "format", "dtype"))
        checkpoint = self.step_ref("checkpoint", ("train",), required=True)
        fmt = self.fields.get("format", "hf")
        if fmt not in EXPORT_FORMATS:
            self.fail("format", f"one of {', '.join(EXPORT_FORMATS)}")
        dtype = self.fields.get("dtype", "bfloat16")
        if dtype not in ("bfloat16", "float32"):
            self.fail("dtype", "bfloat16 or float32")
        return {"checkpoint": checkpoint, "format": fmt, "dtype": dtype, "out": SELF}

    def _fail_config(self, error: ConfigError, overrides: dict | None = None) -> typing.NoReturn:
        """A config error from the dataclasses, at the line of the field (or override) it names."""
        message = str(error)
        field = message.split(":", 1)[0]
        line = None
        if overrides is not None:
            line_of = yaml_key_lines(yaml_child(self.node, "overrides"))
            key = next((k for k in overrides if field == k or field.startswith(k + ".")), None)
            if key is not None and key not in line_of and key in self.defaults.lines:  # the experiment's own
                raise ConfigError(f"{self.path}:{self.defaults.lines[key]}: overrides.{message} (in step {self.name})")
            if key is not None:
                raise ConfigError(f"{self.path}:{line_of.get(key, self.line)}: {self.where}.overrides.{message}")
            line = self.field_lines.get("recipe")
        raise ConfigError(f"{self.path}:{line or self.field_lines.get(field, self.line)}: {self.where}.{message}")


def dotted_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``field: old -> new`` for every dotted field whose value differs between two nested dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        where = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(dotted_changes(a, b, where + "."))
        elif a != b:
            changes.append(f"{where}: {a!r} -> {b!r}")
    return changes


def _train_seq_len(steps_raw: dict, name: str) -> int:
    """A train step's sequence length as it will run (its overrides, else its recipe's, else the default)."""
    fields = steps_raw[name]["train"] or {}
    overrides = fields.get("overrides") or {}
    if "data.seq_len" in overrides:
        return overrides["data.seq_len"]
    recipe = load_yaml(fields["recipe"]) if fields.get("recipe") else {}
    return build_config(recipe).data.seq_len


def _check_acyclic(experiment: Experiment, fail, step_lines: dict[str, int]) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name) :] + [name]
            fail(f"steps.{name}", f"the steps form a cycle: {' -> '.join(cycle)}", step_lines.get(name))
        state[name] = 1
        for parent in experiment.steps[name].parent_names:
            visit(parent, [*path, name])
        state[name] = 2

    for name in experiment.steps:
        visit(name, [])
