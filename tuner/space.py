"""The search space: which runtime settings are tuned, over which values.

Built from the model itself (block count, trained context) and the machine (cores, GPU),
then narrowed by the user with ``--param name=v1,v2`` or a TOML space file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tuner import settings
from tuner.errors import SpaceError
from tuner.settings import REQUEST_PARAMS, SETTINGS
# Re-exported: callers split a config into runner and server parts with these.
from tuner.settings import RUNNER_PARAMS as RUNNER_PARAMS, SERVER_PARAMS as SERVER_PARAMS

# Contiguous integer ranges longer than this are sampled as ordered integers, not categories.
_INT_RANGE_MIN = 8
#: Values one parameter may take; checked before a range is expanded (1..100000000 would
#: take gigabytes of memory).
MAX_VALUES = 4096


@dataclass(frozen=True)
class Param:
    """One parameter and the values it may take (one value = fixed, not searched)."""

    name: str
    values: tuple[Any, ...]

    @property
    def level(self) -> str:
        return SETTINGS[self.name].level

    @property
    def fixed(self) -> bool:
        return len(self.values) == 1

    def is_int_range(self) -> bool:
        vals = self.values
        return (
            len(vals) >= _INT_RANGE_MIN
            and all(isinstance(v, int) for v in vals)
            and list(vals) == list(range(vals[0], vals[-1] + 1))
        )


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of parameters; ``suggest`` turns an Optuna trial into a config."""

    params: tuple[Param, ...] = field(default_factory=tuple)

    def __getitem__(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(p.name == name for p in self.params)

    @property
    def searched(self) -> list[Param]:
        return [p for p in self.params if not p.fixed]

    @property
    def fixed(self) -> dict[str, Any]:
        return {p.name: p.values[0] for p in self.params if p.fixed}

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask the trial for every searched parameter; return the full config."""
        config: dict[str, Any] = {}
        for p in self.params:
            if p.fixed:
                config[p.name] = p.values[0]
            elif p.is_int_range():
                config[p.name] = trial.suggest_int(p.name, p.values[0], p.values[-1])
            else:
                config[p.name] = trial.suggest_categorical(p.name, list(p.values))
        return config

    def distributions(self) -> dict[str, Any]:
        """The Optuna distribution of every searched parameter, as ``suggest`` asks for it."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        return {p.name: IntDistribution(p.values[0], p.values[-1]) if p.is_int_range()
                else CategoricalDistribution(list(p.values)) for p in self.searched}

    def grid(self) -> dict[str, list[Any]]:
        """Every searched parameter with all its values (for GridSampler)."""
        return {p.name: list(p.values) for p in self.searched}

    def size(self) -> int:
        return math.prod(len(p.values) for p in self.params)

    def to_dict(self) -> dict[str, list[Any]]:
        return {p.name: list(p.values) for p in self.params}

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def contains(self, config: dict[str, Any]) -> bool:
        """Whether every searched value of ``config`` is one the space allows."""
        return all(p.name in config and config[p.name] in p.values for p in self.searched)


def powers_of_two(low: int, high: int) -> list[int]:
    """Powers of two in [low, high], with ``low`` rounded up to the next power of two."""
    if low > high:
        return []
    start = 1 << max(0, math.ceil(math.log2(max(low, 1))))
    out = []
    v = start
    while v <= high:
        out.append(v)
        v *= 2
    return out


def parse_value(name: str, raw: Any) -> Any:
    """Convert one user-given value to the parameter's type, or raise SpaceError."""
    return settings.parse(name, raw)


def _expand(name: str, raw: str) -> list[Any]:
    values: list[Any] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if ".." in part and SETTINGS[name].kind is int:
            lo_s, hi_s = part.split("..", 1)
            lo, hi = parse_value(name, lo_s), parse_value(name, hi_s)
            if lo > hi:
                raise SpaceError(f"invalid range '{part}' for {name}: low is above high")
            _check_count(name, len(values) + hi - lo + 1)
            values.extend(range(lo, hi + 1))
        else:
            values.append(parse_value(name, part))
    _check_count(name, len(values))
    return values


def _check_count(name: str, n: int) -> None:
    if n > MAX_VALUES:
        raise SpaceError(
            f"{name} has {n:,} values, more than the {MAX_VALUES:,} one parameter may take: "
            "narrow the range or list the values to try"
        )


def parse_param_option(text: str) -> tuple[str, list[Any]]:
    """Parse one ``--param name=v1,v2`` (or ``name=lo..hi``) into its name and values."""
    if "=" not in text:
        raise SpaceError(
            f"invalid --param '{text}': write it as name=value or name=v1,v2 (e.g. num_ctx=2048,4096)"
        )
    name, raw = (s.strip() for s in text.split("=", 1))
    settings.get(name)  # an unknown name fails before its values
    values = _expand(name, raw)
    if not values:
        raise SpaceError(f"--param {name} has no values: give at least one, e.g. {settings.example(name)}")
    return name, values


def load_space_file(path: str | Path) -> dict[str, list[Any]]:
    """Read the ``[params]`` table of a TOML space file into name -> values."""
    data = read_toml(path)
    unknown = [k for k in data if k != "params"]
    if unknown:
        raise SpaceError(
            f"space file {path}: unknown table or key '{unknown[0]}': a space file holds only a [params] "
            "table (see studies/quick.toml)"
        )
    if "params" not in data:
        raise SpaceError(
            f"space file {path} has no [params] table: put the parameters under [params], "
            "e.g. [params] then num_ctx = [2048, 4096]"
        )
    table = data["params"]
    if not isinstance(table, dict):
        raise SpaceError(f"space file {path}: [params] must be a table of name = values")
    out: dict[str, list[Any]] = {}
    for name, raw in table.items():
        if isinstance(raw, dict):
            if "values" in raw:
                raw = raw["values"]
            elif "min" in raw and "max" in raw:
                raw = f"{raw['min']}..{raw['max']}"
            else:
                raise SpaceError(
                    f"space file {path}: '{name}' must be a value, a list, or {{min=.., max=..}}"
                )
        settings.get(name)
        if isinstance(raw, str):
            values = _expand(name, raw)
        elif isinstance(raw, list):
            _check_count(name, len(raw))
            values = [parse_value(name, v) for v in raw]
        else:
            values = [parse_value(name, raw)]
        if not values:
            raise SpaceError(f"space file {path}: '{name}' has an empty value list")
        out[name] = values
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, mapping every failure to a SpaceError naming the file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from tuner.inputs import MAX_SPACE_BYTES, read_text

    p = Path(path)
    text = read_text(p, "space file", MAX_SPACE_BYTES, SpaceError, "--space")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpaceError(f"space file {p} is not valid TOML: {e}") from None


@dataclass(frozen=True)
class SpaceLimits:
    """What the model and machine allow, used to build and validate the space."""

    context_length: int
    block_count: int
    physical_cores: int
    has_gpu: bool
    min_ctx: int = 512
    variants: tuple[str, ...] = ()
    supported: tuple[str, ...] = REQUEST_PARAMS
    #: Draft lengths searched by default (the engine says the model drafts by default: Ollama's
    #: MTP models); empty: drafting is only searched when asked for (--param draft_num_predict).
    draft_lengths: tuple[int, ...] = ()


def default_values(limits: SpaceLimits) -> dict[str, list[Any]]:
    """The default space for a model on this machine."""
    vals: dict[str, list[Any]] = {}
    if "variant" in limits.supported and limits.variants:
        vals["variant"] = list(limits.variants)
    ctx = powers_of_two(max(512, limits.min_ctx), limits.context_length)
    if not ctx and limits.min_ctx <= limits.context_length:
        ctx = [limits.min_ctx]
    vals["num_ctx"] = ctx
    vals["num_batch"] = powers_of_two(32, 2048)
    vals["num_gpu"] = list(range(-1, limits.block_count + 2)) if limits.has_gpu else [0]
    vals["num_thread"] = list(range(0, max(1, limits.physical_cores) + 1))
    if limits.draft_lengths:
        vals["draft_num_predict"] = list(limits.draft_lengths)
    return {k: v for k, v in vals.items() if k in limits.supported}


def build_space(
    limits: SpaceLimits, overrides: dict[str, list[Any]] | None = None
) -> SearchSpace:
    """Default space for the model, with user overrides applied and validated."""
    overrides = dict(overrides or {})
    for name in overrides:
        if name not in limits.supported:
            raise SpaceError(
                f"parameter '{name}' is not supported by this engine"
                + (
                    " without a managed server: add --manage-server"
                    if name in SERVER_PARAMS
                    else ""
                )
            )
    values = default_values(limits)
    if "num_ctx" in limits.supported and not values.get("num_ctx") and "num_ctx" not in overrides:
        raise SpaceError(
            f"the workload needs a context of {limits.min_ctx} tokens but the model's trained "
            f"context is {limits.context_length}: use shorter prompts or a smaller --num-predict"
        )
    values.update(overrides)
    _validate(values, limits)
    order = [n for n in SETTINGS if n in values]
    return SearchSpace(tuple(Param(n, tuple(_dedupe(values[n]))) for n in order))


def _dedupe(values: Iterable[Any]) -> list[Any]:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    if all(isinstance(v, int) for v in seen):
        seen.sort()
    return seen


def _validate(values: dict[str, list[Any]], limits: SpaceLimits) -> None:
    for name, vals in values.items():
        if not vals:
            raise SpaceError(f"parameter '{name}' has no values: give at least one")
    top = limits.block_count + 1
    for name in SETTINGS:
        for v in values.get(name, []):
            settings.check(name, v)
            if name == "num_ctx" and v > limits.context_length:
                raise SpaceError(
                    f"num_ctx={v} is above the model's trained context of {limits.context_length}: "
                    f"use at most {limits.context_length}"
                )
            if name == "num_ctx" and v < limits.min_ctx:
                raise SpaceError(
                    f"num_ctx={v} is below the {limits.min_ctx} tokens the workload needs "
                    f"(--context and the longest prompt plus --num-predict): use num_ctx >= {limits.min_ctx}"
                )
            if name == "num_gpu" and v > top:
                raise SpaceError(
                    f"num_gpu={v} is above the model's {top} offloadable layers "
                    f"({limits.block_count} blocks + output): use at most {top}"
                )
