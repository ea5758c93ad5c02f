"""Search spaces: ``search_spaces/*.yaml`` over any dotted field of the run config.

    stage: pretrain                              # the entry point every trial runs (and best.yaml)
    recipe: recipes/minimind-26m/pretrain.yaml   # every trial starts from it; as is, it is the baseline trial
    objective: val_perplexity                    # default of --objective
    budget: {max_tokens: 2.0e7, eval_every_tokens: 2.0e6, grace_tokens: 4.0e6, reduction_factor: 3}
    overrides: {eval.val_fraction: 0.02}         # set in every trial (and in best.yaml)
    params:
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      optim.batch_size: {choice: [16, 32, 64]}
      optim.warmup_steps: {int: [0, 500]}
      lora.alpha: {loguniform: [4, 64], when: {lora.enabled: true}}
    points: [{optim.lr: 1.0e-3}]                 # further configs tried first, after the baseline (may
                                                 # leave a range; a choice must hold them)

A pipeline sweep (pretrain settings judged by what they give after SFT) lists later stages under
``then``; each trial runs them in order, each from the previous stage's weights, and is judged by
the last stage's evaluation. A later stage's parameters are named ``<stage>/<field>``:

    then:
      - stage: sft
        recipe: recipes/minimind-26m/sft.yaml
        overrides: {optim.max_steps: 2000, eval.val_fraction: 0.02}
        params: {optim.lr: {loguniform: [1.0e-5, 1.0e-3]}}     # "sft/optim.lr"

A *proxy* sweep names the run it tunes for as ``target:`` (a μP recipe; ``minimind/tune/transfer.py``):
trials run the target's model at its base width (``model.mup_base_width``) unless the space's recipe
or overrides give the proxy's, and the sweep also writes ``best-target.yaml``:

    stage: pretrain
    target: {recipe: recipes/minimind-26m-mup/pretrain.yaml, tokens: 4.0e8}   # or just the recipe's path
    overrides: {data.seq_len: 128}                # the proxy's runs (the recipe defaults to the target's)

A parameter is ``loguniform``/``uniform`` (a float range; an integer field samples integers),
``int`` (optionally ``step``/``log``) or ``choice``. ``when`` makes it conditional (Optuna's
define-by-run): it is sampled only when the named fields, as sampled before it or as the recipe
sets them, have those values. Everything is checked against the run config before anything
starts; an error names the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from minimind.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    build_config,
    load_yaml,
    load_yaml_document,
    yaml_child,
    yaml_key_lines,
)
from minimind.train.launch import ENTRY_POINTS
from minimind.tune.transfer import (
    TARGET_KEYS,
    WIDTH_FIELDS,
    Target,
    check_target,
    check_transfer,
    proxy_width_overrides,
)

KINDS = ("loguniform", "uniform", "int", "choice")
TOP_LEVEL = ("stage", "recipe", "target", "objective", "budget", "overrides", "params", "points", "then")
LATER_STAGE_KEYS = ("stage", "recipe", "overrides", "params")
DURATION_FIELDS = ("optim.epochs", "optim.max_steps")
"""Fields that set how long a run trains."""


@dataclass
class Budget:
    """How much each trial trains, and when ASHA may stop it (all in trained tokens)."""

    max_tokens: float | None = None
    """Every trial stops at this many tokens, whatever its batch (equal budgets); None: its epochs."""
    eval_every_tokens: float | None = None
    """Each trial is evaluated (and may be stopped) about every this many tokens; None: only at its end."""
    grace_tokens: float | None = None
    """ASHA stops no trial before this many tokens; None: ``eval_every_tokens``."""
    reduction_factor: float = 3.0
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    durations_tokens: list[float] | None = None
    """Candidate training lengths (``optim.schedule: wsd``): every trial trains once to the longest and
    is evaluated at each shorter one by a cooldown branch that ends there, so lr x duration trains each
    lr once. ``max_tokens`` is the longest; ``best.yaml`` is a WSD run of the best length."""
    durations_epochs: list[int] | None = None
    """Candidate lengths in epochs: a space's ``optim.epochs`` parameter under WSD (``{choice: [1, 2, 3]}``).
    Not sampled: the sweep's plan turns them into ``durations_tokens`` by the tokens of an epoch of the
    baseline trial's data, and every trial trains once to the longest."""


@dataclass
class LaterStage:
    """A stage a pipeline trial runs after the first, from the previous stage's weights."""

    name: str
    """Its parameters' prefix and its run directory under the trial's (the entry point's name)."""
    stage: str
    recipe: str
    base: dict[str, Any]


@dataclass
class Param:
    """One searched field and its distribution."""

    name: str
    """As Optuna and the report know it: the field, or ``<stage>/<field>`` for a later stage's."""
    kind: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    log: bool = False
    choices: list = field(default_factory=list)
    integer: bool = False
    when: dict[str, Any] = field(default_factory=dict)
    """Full parameter-style names (``<stage>/<field>`` in a later stage) and the values enabling this one."""
    line: int = 0
    stage_index: int = 0
    """0: the first stage; k: ``then[k - 1]``."""

    @property
    def dotted_field(self) -> str:
        """The run config field it sets, in its stage's config."""
        return self.name.split("/", 1)[-1]

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.integer:
            low, high = int(self.low), int(self.high)
            return optuna.distributions.IntDistribution(low, high, log=self.log, step=self.step or 1)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.choices)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def applies(self, values: dict[str, Any]) -> bool:
        return all(values.get(name) == wanted for name, wanted in self.when.items())

    def contains(self, value) -> bool:
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and (value != int(value) or (int(value) - int(self.low)) % (self.step or 1)):
            return False
        return self.low <= value <= self.high

    def listed_values(self) -> list | None:
        """Every value the parameter takes, where they can be listed: its choices, or an integer range by its step
        (None for a continuous or log range)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.integer and not self.log:
            return list(range(int(self.low), int(self.high) + 1, self.step or 1))
        return None

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {self.choices}"
        return f"{'log-' if self.log else ''}{'integer ' if self.integer else ''}range [{self.low}, {self.high}]"


@dataclass
class SearchSpace:
    """A parsed, validated search space. Callable as Optuna's define-by-run function."""

    path: str
    stage: str
    recipe: str
    base: dict[str, Any]
    """The recipe with the space's and the command line's overrides: the baseline trial's config."""
    params: list[Param]
    objective: str = "val_perplexity"
    budget: Budget = field(default_factory=Budget)
    points: list[dict[str, Any]] = field(default_factory=list)
    then: list[LaterStage] = field(default_factory=list)
    target: Target | None = None
    """The run a proxy sweep tunes for (``target:``); None: the trials' own recipe is the goal."""

    def __call__(self, trial) -> None:
        """Optuna define-by-run: sample each parameter whose ``when`` holds, in file order."""
        values = self.base_values()
        for param in self.params:
            if param.applies(values):
                values[param.name] = param.suggest(trial)

    def base_values(self) -> dict[str, Any]:
        """Every field a ``when`` names (and every searched field), as the base config sets it."""
        configs = [dataclasses.asdict(build_config(base)) for base in self.stage_bases()]
        names = {param.name for param in self.params} | {n for param in self.params for n in param.when}
        return {name: _get(configs[self.stage_of(name)], name.split("/", 1)[-1]) for name in names}

    def stage_bases(self) -> list[dict[str, Any]]:
        return [self.base, *(later.base for later in self.then)]

    def stage_of(self, name: str) -> int:
        """The stage index of a parameter-style name (``field`` or ``<stage>/<field>``)."""
        prefix = name.split("/", 1)[0] if "/" in name else None
        return 0 if prefix is None else 1 + [later.name for later in self.then].index(prefix)

    def stage_params(self, params: dict[str, Any], index: int) -> dict[str, Any]:
        """The sampled values of stage ``index``'s fields, by dotted field."""
        return {name.split("/", 1)[-1]: value for name, value in params.items() if self.stage_of(name) == index}

    def baseline(self) -> dict[str, Any]:
        """The recipe's own values of the parameters that apply to it: the first trial."""
        values = self.base_values()
        return {param.name: values[param.name] for param in self.params if param.applies(values)}

    def grid(self) -> dict[str, list]:
        """Every value of every parameter, for a full grid: choices and integer ranges (by their step)."""
        grid = {}
        for param in self.params:
            where = f"{self.path}:{param.line}: params.{param.name}"
            if param.when:
                raise ConfigError(f"{where}: a grid cannot hold a conditional parameter")
            values = param.listed_values()
            if values is None:
                raise ConfigError(f"{where}: a grid needs its values listed; give it as a choice")
            grid[param.name] = values
        return grid

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {param.name: param.distribution() for param in self.params}


def load_space(path: str | Path, cli_overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Parse and validate ``path``; the command line's dotted overrides apply on top of the space's."""
    path = str(path)
    raw, root, _ = load_yaml_document(path, "the search space")
    lines = yaml_key_lines(root)

    def fail(where: str, message: str, line: int | None = None) -> typing.NoReturn:
        line = line or lines.get(where.split(".")[0], 1)
        raise ConfigError(f"{path}:{line}: {where}: {message}")

    for key in raw:
        if key not in TOP_LEVEL:
            fail(key, f"unknown key (valid: {', '.join(TOP_LEVEL)})")
    cli_overrides = cli_overrides or {}
    target = None
    if "target" in raw:
        target, raw = _parse_target(raw, root, lines, _stage_overrides(cli_overrides, None), fail)
    stage, recipe, base = _parse_stage(raw, "", lines, _stage_overrides(cli_overrides, None), fail)
    if target is not None:
        try:
            check_transfer(build_config(base), build_config(target.base))
        except ConfigError as error:
            fail("target", str(error))
    budget = _parse_budget(raw.get("budget") or {}, fail)
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        fail("params", "must map at least one dotted field to a distribution")
    param_lines = yaml_key_lines(yaml_child(root, "params"))
    params = [_parse_param(name, spec, base, param_lines.get(name, lines.get("params", 1)), fail)
              for name, spec in params_raw.items()]  # fmt: skip

    then_raw = raw.get("then") or []
    if not isinstance(then_raw, list):
        fail("then", "must be a list of later stages ({stage, recipe, overrides, params})")
    then_nodes = yaml_child(root, "then")
    later_stages: list[LaterStage] = []
    for index, entry in enumerate(then_raw):
        where = f"then[{index}]"
        node = then_nodes.value[index] if isinstance(then_nodes, yaml.SequenceNode) else None
        entry_lines = yaml_key_lines(node) or {"": lines.get("then", 1)}
        first_line = min(entry_lines.values())
        if not isinstance(entry, dict):
            fail(where, "must be a mapping with stage, recipe (and overrides, params)", first_line)
        for key in entry:
            if key not in LATER_STAGE_KEYS:
                fail(f"{where}.{key}", f"unknown key (valid: {', '.join(LATER_STAGE_KEYS)})", entry_lines[key])
        later_fail = _at_lines(fail, where, entry_lines, first_line)
        kind = entry.get("stage")
        name = kind if all(s.name != kind for s in later_stages) else f"{kind}{index + 1}"
        later_stage, later_recipe, later_base = _parse_stage(
            entry, "", entry_lines, _stage_overrides(cli_overrides, name), later_fail
        )
        later_stages.append(LaterStage(name, later_stage, later_recipe, later_base))
        later_params = entry.get("params") or {}
        if not isinstance(later_params, dict):
            later_fail("params", "must map dotted fields to distributions")
        later_lines = yaml_key_lines(yaml_child(node, "params")) if node is not None else {}
        for field_name, spec in later_params.items():
            param = _parse_param(field_name, spec, later_base, later_lines.get(field_name, first_line), fail,
                                 where=f"{where}.params.{field_name}")  # fmt: skip
            param.name = f"{name}/{field_name}"
            param.when = {f"{name}/{condition}": value for condition, value in param.when.items()}
            param.stage_index = index + 1
            params.append(param)
    stage_names = {stage.name for stage in later_stages}
    for key in cli_overrides:
        prefix = key.partition("/")[0] if "/" in key else None
        if prefix is not None and prefix not in stage_names:
            raise ConfigError(
                f"--{key}: the space has no later stage {prefix!r} (its later stages: {sorted(stage_names) or 'none'})"
            )
    names = [param.name for param in params]
    for index, param in enumerate(params):
        for name in param.when:
            if name in names[index:]:
                fail(f"params.{param.name}.when", f"{name!r} is sampled after this parameter; list it first",
                     param.line)  # fmt: skip

    if target is not None:
        if later_stages:
            fail("target", "a target applies to one-stage sweeps (this one has then:)")
        for param in params:
            if param.name.startswith("model.") and param.name.split(".", 1)[1] in WIDTH_FIELDS:
                fail(f"params.{param.name}", "a target sweep tunes at the proxy's width; the target keeps its own",
                     param.line)  # fmt: skip
    if build_config(base).optim.schedule == "wsd":
        params = _durations_from_epochs(params, budget, fail)
    space = SearchSpace(path, stage, recipe, base, params, raw.get("objective") or "val_perplexity", budget,
                        then=later_stages, target=target)  # fmt: skip
    for name, value in space.baseline().items():
        param = next(p for p in params if p.name == name)
        if not param.contains(value):
            fail(f"params.{name}", f"the recipe's value {value!r} is outside {param.describe()}; the baseline "
                 "trial runs the recipe as is, so the space must contain it", param.line)  # fmt: skip
    points = raw.get("points") or []
    if not isinstance(points, list):
        fail("points", "must be a list of {dotted.field: value} mappings")
    by_name = {param.name: param for param in params}
    point_nodes = yaml_child(root, "points")
    for index, point in enumerate(points):
        where = f"points[{index}]"
        line = lines.get("points", 1)
        if isinstance(point_nodes, yaml.SequenceNode):
            line = point_nodes.value[index].start_mark.line + 1
        if not isinstance(point, dict):
            fail(where, "must be a mapping of searched fields to values", line)
        for name, value in point.items():
            if name not in by_name:
                fail(f"{where}.{name}", f"is not a searched parameter (searched: {', '.join(by_name)})", line)
            if by_name[name].kind == "choice" and value not in by_name[name].choices:
                fail(f"{where}.{name}", f"{value!r} is not {by_name[name].describe()}", line)
        for stage_index, base in enumerate(space.stage_bases()):
            try:
                build_config(base, space.stage_params(point, stage_index))
            except ConfigError as error:
                fail(where, f"the run config rejects it: {error}", line)
        space.points.append(point)
    return space


def _durations_from_epochs(params: list[Param], budget: Budget, fail) -> list[Param]:
    """Under WSD a searched length is a duration dimension, not a sampled parameter: ``optim.epochs`` becomes
    ``budget.durations_epochs`` (each trial trains once to the longest, scored at each shorter one by a cooldown
    branch); ``optim.max_steps``, whose steps differ with the batch, is refused for ``budget.durations_tokens``."""
    kept = []
    for param in params:
        if param.stage_index or param.dotted_field not in DURATION_FIELDS:
            kept.append(param)
            continue
        where = f"params.{param.name}"
        if param.dotted_field == "optim.max_steps":
            fail(where, "under optim.schedule: wsd list the lengths as budget.durations_tokens (or optim.epochs): "
                 "each trial trains once, to the longest, and is scored at every shorter one by a cooldown branch "
                 "ending there; steps as a parameter would train each length from scratch", param.line)  # fmt: skip
        values = param.listed_values() or []
        if len(set(values)) < 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            fail(where, "under optim.schedule: wsd the epochs are durations a trial is scored at: a choice (or int "
                 "range) of at least two positive whole numbers of epochs", param.line)  # fmt: skip
        if budget.durations_tokens or budget.max_tokens:
            fail(where, "the durations are these epochs: drop budget.durations_tokens and budget.max_tokens, or this "
                 "parameter", param.line)  # fmt: skip
        if any(param.name in other.when for other in params):
            fail(where, "a duration is not sampled, so no parameter can depend on it", param.line)
        budget.durations_epochs = sorted(set(values))
    if not kept:
        fail("params", "searches only the duration; add a parameter to tune (optim.lr, optim.batch_size, ...)")
    return kept


def _stage_overrides(cli_overrides: dict[str, Any], stage_name: str | None) -> dict[str, Any]:
    """The command line's overrides of one stage: plain ``field`` ones are the sweep's own (first) stage's,
    ``NAME/field`` ones the later stage NAME's, as parameters are named."""
    if stage_name is None:
        return {key: value for key, value in cli_overrides.items() if "/" not in key}
    prefix = f"{stage_name}/"
    return {key[len(prefix) :]: value for key, value in cli_overrides.items() if key.startswith(prefix)}


def _parse_stage(raw: dict, where: str, lines: dict[str, int], cli_overrides, fail) -> tuple[str, str, dict]:
    """A stage's entry point, recipe and base config (the recipe with the overrides)."""
    stage = raw.get("stage")
    if stage not in ENTRY_POINTS:
        fail(f"{where}stage", f"must be one of {sorted(ENTRY_POINTS)}, got {stage!r}", lines.get("stage"))
    recipe = raw.get("recipe")
    if not isinstance(recipe, str) or not Path(recipe).is_file():
        fail(f"{where}recipe", f"must name an existing recipe file (relative to the working directory), got {recipe!r}",
             lines.get("recipe"))  # fmt: skip
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        fail(f"{where}overrides", "must be a mapping of dotted fields to values", lines.get("overrides"))
    stage_name, defining = ENTRY_POINTS[stage]
    base = apply_overrides(load_yaml(recipe), {"stage": stage_name, **defining, **overrides, **(cli_overrides or {})})
    try:
        build_config(base)
    except ConfigError as error:
        fail(f"{where}recipe", f"{recipe} with the overrides is not a valid run config: {error}", lines.get("recipe"))
    return stage, recipe, base


def _parse_target(raw: dict, root, lines: dict[str, int], cli_overrides: dict, fail) -> tuple[Target, dict]:
    """The space's ``target`` (a recipe path, or {recipe, overrides, tokens}) and the space with the
    proxy's recipe and width filled in where it leaves them to the target."""
    entry = raw["target"]
    if isinstance(entry, str):
        entry = {"recipe": entry}
    if not isinstance(entry, dict):
        fail("target", "must be a recipe path or a mapping with recipe (and overrides, tokens)")
    target_lines = yaml_key_lines(yaml_child(root, "target")) or {"": lines["target"]}
    target_fail = _at_lines(fail, "target", target_lines, lines["target"])
    for key in entry:
        if key not in TARGET_KEYS:
            target_fail(key, f"unknown key (valid: {', '.join(TARGET_KEYS)})")
    tokens = entry.get("tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or tokens <= 0):
        target_fail("tokens", f"must be a positive number of tokens, got {tokens!r}")
    stage_entry = {"stage": raw.get("stage"), "recipe": entry.get("recipe"), "overrides": entry.get("overrides")}
    _, recipe, base = _parse_stage(stage_entry, "", {**target_lines, "stage": lines.get("stage")}, {}, target_fail)
    raw = dict(raw)
    overrides = raw.get("overrides") or {}
    if raw.get("recipe") is None and isinstance(overrides, dict):
        raw["recipe"] = recipe
        try:
            check_target(build_config(base))
            width = proxy_width_overrides(build_config(base))
        except ConfigError as error:
            fail("target", str(error))
        raw["overrides"] = {**{k: v for k, v in width.items() if k not in overrides}, **overrides}
    proxy_overrides = {**(overrides if isinstance(overrides, dict) else {}), **cli_overrides}
    return Target(recipe, base, float(tokens) if tokens is not None else None, proxy_overrides), raw


def _at_lines(fail, where: str, lines: dict[str, int], default: int):
    """``fail`` for keys of a nested mapping: names the key under ``where`` at its own line."""

    def nested_fail(key: str, message: str, line: int | None = None) -> typing.NoReturn:
        fail(f"{where}.{key}", message, line or lines.get(key.split(".")[0], default))

    return nested_fail


def _parse_budget(raw: Any, fail) -> Budget:
    if not isinstance(raw, dict):
        fail("budget", "must be a mapping")
    names = [f.name for f in dataclasses.fields(Budget)]

    def positive(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0

    raw = dict(raw)
    durations = raw.pop("durations_tokens", None)
    for key, value in raw.items():
        if key not in names:
            fail(f"budget.{key}", f"unknown key (valid: {', '.join(names)})")
        if value is not None and not positive(value):
            fail(f"budget.{key}", f"must be a positive number, got {value!r}")
    budget = Budget(**{k: (float(v) if v is not None else None) for k, v in raw.items()})
    if budget.reduction_factor <= 1:
        fail("budget.reduction_factor", "must be > 1")
    if durations is not None:
        if not isinstance(durations, list) or len(durations) < 2 or not all(positive(d) for d in durations):
            fail("budget.durations_tokens", f"must list at least two positive token counts, got {durations!r}")
        budget.durations_tokens = sorted({float(d) for d in durations})
        longest = budget.durations_tokens[-1]
        if budget.max_tokens not in (None, longest):
            fail("budget.max_tokens", f"is {budget.max_tokens:g} but the longest duration is {longest:g}; give one")
        budget.max_tokens = longest
    if budget.max_tokens is not None:
        for key in ("grace_tokens", "eval_every_tokens"):
            value = getattr(budget, key)
            if value is not None and value > budget.max_tokens:
                fail(f"budget.{key}", f"{value:g} is beyond max_tokens {budget.max_tokens:g}: no trial would get there")
    return budget


def _parse_param(name: str, spec: Any, base: dict, line: int, fail, where: str | None = None) -> Param:
    where = where or f"params.{name}"
    annotation = _field_type(name)
    if annotation is None:
        try:
            build_config(base, {name: None})
        except ConfigError as error:
            fail(where, str(error), line)
        fail(where, "is not a field of the run config", line)
    if not isinstance(spec, dict):
        fail(where, f"must be a mapping like {{loguniform: [1.0e-4, 1.0e-2]}} or {{choice: [...]}}, got {spec!r}", line)
    kinds = [key for key in spec if key in KINDS]
    extra = [key for key in spec if key not in (*KINDS, "step", "log", "when")]
    if len(kinds) != 1 or extra:
        fail(where, f"needs one of {', '.join(KINDS)} (and optionally step, log, when); got {sorted(spec)}", line)
    kind = kinds[0]
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        fail(f"{where}.when", "must map dotted fields to the values that enable this parameter", line)
    for condition in when:
        if _field_type(condition) is None:
            fail(f"{where}.when", f"{condition!r} is not a field of the run config", line)
    numeric = annotation in (int, float)
    param = Param(name, kind, when=when, line=line)
    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            fail(where, "choice needs a non-empty list of values", line)
        if any(not isinstance(c, (bool, int, float, str, type(None))) for c in choices):
            fail(where, "choice values must be numbers, strings, booleans or null", line)
        param.choices = choices
        samples = choices
    else:
        bounds = spec[kind]
        if not numeric:
            fail(where, f"{kind} needs a numeric field; {name} is {_type_name(annotation)} (use choice)", line)
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in bounds)
        ):
            fail(where, f"{kind} needs [low, high] numbers, got {bounds!r}", line)
        low, high = float(bounds[0]), float(bounds[1])
        if not low < high:
            fail(where, f"empty range [{bounds[0]}, {bounds[1]}]: low must be below high", line)
        param.integer = kind == "int" or annotation is int
        param.log = kind == "loguniform" or bool(spec.get("log", False))
        if param.log and low <= 0:
            fail(where, f"a log range must be positive, got low={bounds[0]}", line)
        if param.integer and not (low.is_integer() and high.is_integer()):
            fail(where, f"{name} is an integer field; bounds must be integers, got {bounds!r}", line)
        if "step" in spec:
            step = spec["step"]
            if not param.integer or isinstance(step, bool) or not isinstance(step, int) or step <= 0:
                fail(where, "step must be a positive integer, on an integer range", line)
            if param.log and step != 1:
                fail(where, "a log range cannot have a step", line)
            param.step = step
        param.low, param.high = low, high
        samples = [int(low), int(high)] if param.integer else [low, high]
    for value in samples:
        try:
            build_config(base, {**when, name: value})
        except ConfigError as error:
            fail(where, f"the run config rejects {value!r}: {error}", line)
    return param


def _field_type(dotted: str):
    """The annotation of a dotted TrainConfig field (``int``, ``float``, ``bool``, ...), or None if unknown."""
    cls: Any = TrainConfig
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        annotation = hints[part]
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(options) == 1:
            annotation = options[0]
        if index == len(parts) - 1:
            return annotation
        cls = annotation
    return None


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _get(config: dict, dotted: str):
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node
