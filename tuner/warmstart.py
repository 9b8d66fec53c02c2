"""Warm start: a new study begins, after its baseline, with the winners of earlier studies.

Sources are earlier studies of the same model (or another variant of it) in the storage, on
the nearest hardware that has any: the same stored fingerprint first, then (GPU servers) the
same GPU model, then the same VRAM class; (CPU-only servers) the same CPU model, then the same
core count. A CPU-only study seeds only CPU-only machines and a GPU study only GPU machines.
Each source gives its best feasible configs, those measured without contention first; one
measured while other processes competed seeds too, marked as such (every seed is measured again
here before it can win). Each is mapped into the new space and the output says what moved:

* a value the new space allows is kept;
* ``num_ctx`` at the lowest value its source could take (the floor its workload or
  ``--context`` set) moves to this space's floor: the KV cache read per token grows with the
  context, so the fastest context is the smallest the application allows;
* offload: a server that offloads to a GPU is never seeded with CPU-only or partial offload
  from other hardware: it gets full offload (the staged search's offload stage takes over when
  that does not fit); on the same hardware a partial offload is kept;
* any other number moves to the nearest allowed value (by ratio: these are sizes);
* a string value the space does not allow is left to the sampler; a variant this study does
  not search skips the config.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from tuner.errors import StudyError
from tuner.machine import SAME_GPU, SAME_HARDWARE, TIERS, Machine, match
from tuner.record import (ENGINE, IMPORTED_ENGINE, WARM_START, TrialRecord, WarmStartSource, read_study_info,
                          warm_start_sources)
from tuner.space import SearchSpace

#: The study attribute a warm start is kept in (:meth:`WarmStart.to_dict`).
ATTR = WARM_START

#: Configs taken from each source study, and from all sources together.
PER_SOURCE = 3
MAX_SEEDS = 5
#: How near a source chosen with --warm-start-from is when no tier matches (:func:`tuner.machine.match`).
CHOSEN = "chosen with --warm-start-from"
#: A GGUF file name's quantization part: Q4_K_M, q8_0, IQ3_XS, F16, BF16, ... (and "-it-qat"-like tags stay).
_QUANT_SUFFIX = re.compile(r"[.\-_](?:i?q\d[a-z0-9_]*|f16|f32|bf16)$")
#: A study that seeded this one, and how near its hardware is.
Source = WarmStartSource


def family(model: str) -> str:
    """The model a tag is a variant of: ``gemma3:4b-it-qat`` -> ``gemma3:4b``; a GGUF path by its
    file name without the quantization suffix."""
    if model.endswith(".gguf"):
        stem = model.rsplit("/", 1)[-1][:-len(".gguf")].lower()
        # Strip the quantization suffix only ("llama-2-7b.Q4_K_M", "gemma-3-270m-q4_k_m"): the
        # size stays, so a 13B study never seeds a 7B one.
        while True:
            shorter = _QUANT_SUFFIX.sub("", stem)
            if shorter == stem:
                return stem
            stem = shorter
    name, _, tag = model.partition(":")
    return f"{name}:{(tag or 'latest').split('-')[0]}"


def same_model(model: str, variants: Sequence[str], attrs: dict[str, Any]) -> bool:
    """Whether a stored study (``attrs``) tuned ``model`` or another variant of it."""
    theirs = [str(attrs.get("model") or "")] + [str(v) for v in (attrs.get("space") or {}).get("variant") or []]
    mine = [model, *variants]
    return bool(set(theirs) & set(mine)) or family(theirs[0]) == family(model)


@dataclass(frozen=True)
class Seed:
    """One config queued from a source: its params in this space and what mapping changed."""

    params: dict[str, Any]
    origin: str  # "STUDY#N"
    value: float | None
    notes: tuple[str, ...] = ()
    #: Measured in its source while other processes competed: its value is not to rely on.
    contended: bool = False


#: Why a warm start seeded nothing (:attr:`WarmStart.reason_code`): the storage holds no other
#: study; none of this model (engine, objective); none on hardware near enough; the sources have
#: no feasible config; every config of theirs was skipped (the reasons are listed).
EMPTY, OTHER_MODEL, OTHER_HARDWARE, NO_FEASIBLE, ALL_SKIPPED = (
    "storage empty", "different model", "hardware too far", "no feasible trial", "all skipped")


@dataclass
class WarmStart:
    """What a warm start found: its sources, the configs it queues and what it left out."""

    sources: list[Source] = field(default_factory=list)
    seeds: list[Seed] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: Variants the sources measured at full offload (the staged screen need not repeat them).
    screened: set[str] = field(default_factory=set)
    #: Why nothing was seeded (one of EMPTY .. ALL_SKIPPED) and in words; "" when seeds were found.
    reason_code: str = ""
    reason: str = ""

    def summary(self) -> str:
        """One line: the sources and how many configs they seeded, or why none."""
        if not self.seeds:
            why = self.reason or "no earlier study to start from"
            return f"warm start: no config to start from ({len(self.skipped)} skipped): {why}" if self.skipped \
                else f"warm start: no config to start from: {why}"
        names = ", ".join(f"'{s.study}' ({s.match})" for s in self.sources)
        busy = sum(s.contended for s in self.seeds)
        text = f"warm start: {len(self.seeds)} config(s) from {names}"
        if busy:
            text += (f"; {'all' if busy == len(self.seeds) else busy} measured there while other processes "
                     "competed (measured again here before one can win)")
        return text

    def lines(self) -> list[str]:
        """What the terminal says about it."""
        out = [self.summary()]
        for s in self.seeds:
            notes = [*s.notes, *(["contended in its source"] if s.contended else [])]
            note = f" ({'; '.join(notes)})" if notes else ""
            val = f" {s.value:.2f}" if s.value is not None else ""
            out.append(f"  from {s.origin}{val}: " + " ".join(f"{k}={v}" for k, v in s.params.items()) + note)
        out += [f"  skipped {x}" for x in self.skipped]
        return out

    def to_dict(self) -> dict[str, Any]:
        """The stored form (the study attribute :data:`ATTR`)."""
        return {"sources": [{"study": s.study, "match": s.match} for s in self.sources],
                "seeds": [{"from": s.origin, "params": s.params, "notes": list(s.notes),
                           **({"contended": True} if s.contended else {})} for s in self.seeds],
                "skipped": list(self.skipped),
                "summary": self.summary(),
                **({"reason_code": self.reason_code, "reason": self.reason} if self.reason_code else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WarmStart:
        """Read back what :meth:`to_dict` stored (a seed's value is not stored: None)."""
        def dicts(key: str) -> list[dict[str, Any]]:
            return [x for x in d.get(key) or [] if isinstance(x, dict)]

        return cls(sources=warm_start_sources(d),
                   seeds=[Seed(dict(x.get("params") or {}), str(x.get("from")), None, tuple(x.get("notes") or ()),
                               bool(x.get("contended"))) for x in dicts("seeds")],
                   skipped=[str(x) for x in d.get("skipped") or []],
                   reason_code=str(d.get("reason_code") or ""), reason=str(d.get("reason") or ""))


def find_sources(storage: Any, exclude: str, model: str, variants: Sequence[str], machine: Machine,
                 engine: str, objective: str) -> list[tuple[str, str]]:
    """(study name, match) of the stored studies that may seed a study of ``model`` on
    ``machine``: those of the nearest tier only, most recent first."""
    found: list[tuple[int, str, str]] = []
    for s in storage.get_all_studies():
        a = s.user_attrs
        if s.study_name == exclude or not same_model(model, variants, a) or not _same_question(a, engine, objective):
            continue
        how = match(machine, Machine.of(a))
        if how is not None:
            found.append((TIERS.index(how), str(s.user_attrs.get("created_at") or ""), s.study_name))
    if not found:
        return []
    nearest = min(t for t, _, _ in found)
    chosen = sorted((x for x in found if x[0] == nearest), key=lambda x: x[1], reverse=True)
    return [(name, TIERS[tier]) for tier, _, name in chosen]


def _same_question(attrs: Mapping[str, Any], engine: str, objective: str) -> bool:
    """A stored study answers this study's question: same engine, same first objective
    (another engine's or objective's winners answer another one)."""
    info = read_study_info(attrs)
    return info.engine_or_default == engine and info.objective == objective


def no_source_reason(storage: Any, exclude: str, model: str, variants: Sequence[str], machine: Machine,
                     engine: str, objective: str) -> tuple[str, str]:
    """Why :func:`find_sources` found no study: (code, words)."""
    others = [s for s in storage.get_all_studies() if s.study_name != exclude]
    if not others:
        return EMPTY, "the storage holds no other study"
    same = [s for s in others if same_model(model, variants, s.user_attrs)]
    if not same:
        return OTHER_MODEL, f"no earlier study tuned {model} or a variant of it"
    alike = [s for s in same if _same_question(s.user_attrs, engine, objective)]
    if not alike:
        return OTHER_MODEL, (f"the earlier studies of {model} ran on another engine or ranked another objective "
                             f"than {engine} and {objective}")
    names = ", ".join(f"'{s.study_name}'" for s in alike[:3]) + (", ..." if len(alike) > 3 else "")
    return OTHER_HARDWARE, (f"the earlier studies of {model} ({names}) ran on hardware too far from this "
                            "machine's (another GPU or VRAM class, another CPU and core count, or CPU-only against "
                            "GPU): --warm-start-from NAME uses one anyway")


def seeds_of(st: Any, space: SearchSpace, offloads: bool, same_hardware: bool,
             limit: int = PER_SOURCE) -> tuple[list[Seed], list[str]]:
    """The best feasible configs of a stored study (``results.StoredStudy``) mapped into
    ``space``, those measured without contention first; and what was skipped, in words."""
    source_space: dict[str, list[Any]] = st.attrs.get("space") or {}
    best = st.best()
    sign = 1 if not st.directions or str(st.directions[0]).lower().endswith("maximize") else -1
    # Contended trials seed too, after the quiet ones: each seed is measured again here.
    ranked = sorted((r for r in st.records if r.feasible and r.values and r.reused_from is None and not r.baseline),
                    key=lambda r: (not r.contended, sign * (r.values[0] if r.values else 0.0)), reverse=True)
    # Imported results (another tool's numbers) seed too, best first, after the measured ones:
    # they are measured here before one can win.
    ranked += sorted((r for r in st.records if r.imported and r.value is not None),
                     key=lambda r: sign * (r.value or 0), reverse=True)
    # The re-validated winner first, when the validation picked another than the top value.
    ranked.sort(key=lambda r: best is None or r.number != best.number)
    out: list[Seed] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for r in ranked:
        params, notes, why = map_config(r, space, source_space, offloads, same_hardware)
        origin = f"{st.name}#{r.number}"
        if params is None:
            skipped.append(f"{origin}: {why}")
            continue
        key = repr(sorted(params.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append(Seed(params, origin, r.value, tuple(notes), bool(r.contended)))
        if len(out) == limit:
            break
    return out, skipped


def map_config(r: TrialRecord, space: SearchSpace, source_space: dict[str, list[Any]], offloads: bool,
               same_hardware: bool) -> tuple[dict[str, Any] | None, list[str], str]:
    """``r``'s config as params of ``space`` (None and the reason when it cannot be), and notes
    on every value that moved."""
    config: dict[str, Any] = {**r.options, **r.effective_server}
    if r.model:
        config["variant"] = r.model
    params: dict[str, Any] = {}
    notes: list[str] = []
    for p in space.searched:
        if p.name not in config:
            continue
        v = config[p.name]
        if p.name == "variant":
            if v not in p.values and r.imported:
                # Another tool's model file, not a model here: its settings still tell.
                notes.append(f"variant {r.model_label} (imported) is not a model here: its settings kept")
                continue
            if v not in p.values:
                return None, [], f"variant {r.model_label} is not searched here"
            params[p.name] = v
            continue
        if p.name == "num_gpu":
            mapped = _offload(int(v), p.values, source_space.get("num_gpu") or [], offloads, same_hardware)
            if mapped != v:
                full = offloads and mapped == max(p.values) and (int(v) == 0 or not same_hardware
                                                                 or int(v) >= max(source_space.get("num_gpu") or [0]))
                why = ("full offload: this server offloads to a GPU" if full
                       else "this server runs on the CPU" if not offloads else "nearest allowed")
                notes.append(f"num_gpu {v} -> {mapped} ({why})")
            params[p.name] = mapped
            continue
        floor = source_space.get("num_ctx") or []
        if p.name == "num_ctx" and floor and v == min(floor):
            params[p.name] = min(p.values)
            if params[p.name] != v:
                notes.append(f"num_ctx {v} -> {params[p.name]} (the source's smallest context: this study's)")
            continue
        if v in p.values:
            params[p.name] = v
            continue
        nearest = _nearest(v, p.values)
        if nearest is None:
            notes.append(f"{p.name}={v} is not allowed here: left to the sampler")
            continue
        params[p.name] = nearest
        notes.append(f"{p.name} {v} -> {nearest} (nearest allowed)")
    return params, notes, ""


def _offload(v: int, allowed: Sequence[Any], source_allowed: Sequence[Any], offloads: bool,
             same_hardware: bool) -> int:
    ints = [int(x) for x in allowed]
    full = max(ints)
    if not offloads:
        return 0 if 0 in ints else min(ints, key=lambda x: abs(x - v))
    source_full = max((int(x) for x in source_allowed), default=None)
    if v == 0 or (v > 0 and not same_hardware) or (source_full is not None and v >= source_full):
        return full
    return v if v in ints else min(ints, key=lambda x: abs(x - v))


def _nearest(v: Any, allowed: Sequence[Any]) -> Any:
    nums = [x for x in allowed if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not nums:
        return None
    if v > 0 and all(x > 0 for x in nums):
        return min(nums, key=lambda x: abs(math.log(x / v)))
    return min(nums, key=lambda x: abs(x - v))


def open_source_storage(url: str | None, explicit: bool) -> Any:
    """The storage warm-start sources are read from (``--warm-start-storage``, else --storage),
    opened read-only; before anything is created, StudyError (exit 2) when it is not a study
    storage, StorageError (exit 1) when it cannot be reached."""
    from tuner.errors import StorageError
    from tuner.storage import open_storage, shown_url

    shown = shown_url(url)
    try:
        return open_storage(url, create=False)
    except Exception as e:
        reason = str(e).splitlines()[0].split(": pass ")[0] if str(e) else e.__class__.__name__
        reason = reason.removeprefix(f"{shown} ")  # named once, below
        where = "--warm-start-storage" if explicit else "--warm-start-from"
        error = StorageError if isinstance(e, StorageError) else StudyError
        raise error(f"{where}: cannot read the storage {shown} ({reason}): give the URL of the "
                    "storage that holds the earlier study") from None


def check_source(source_storage: Any, name: str, model: str | None = None, variants: Sequence[str] = ()) -> None:
    """Raise StudyError (before anything is created) when ``--warm-start-from`` names no study,
    or (given ``model``) a study of another model."""
    studies = {s.study_name: s for s in source_storage.get_all_studies()}
    if name not in studies:
        known = ", ".join(sorted(studies)) or "none"
        raise StudyError(f"--warm-start-from: no study named '{name}' in that storage (known studies: {known})")
    if model is not None:
        attrs = studies[name].user_attrs
        # Imported results name another tool's model file: their settings are what carries over.
        if not same_model(model, variants, attrs) and attrs.get(ENGINE) != IMPORTED_ENGINE:
            raise StudyError(
                f"--warm-start-from: study '{name}' tuned {attrs.get('model') or 'another model'}, not {model} or a "
                f"variant of it, so its settings do not carry over: pick a study of {model}, or leave the option out")


def plan(source_storage: Any, study_name: str, model: str, space: SearchSpace, attrs: dict[str, Any],
         from_study: str | None = None) -> WarmStart:
    """The warm start of a new study named ``study_name`` (``attrs``: its stored attrs, which
    describe its machine) from the studies in ``source_storage``."""
    from tuner import results

    machine = Machine.of(attrs)
    # Not known (no source observed it) is searched as a GPU server: num_gpu stays in the space.
    on_gpu = machine.offloads is not False
    variants = [str(v) for v in (space["variant"].values if "variant" in space else ())]
    if from_study is not None:
        names = {s.study_name: s for s in source_storage.get_all_studies()}
        if from_study not in names:
            check_source(source_storage, from_study)  # raises, naming the studies there
        how = match(machine, Machine.of(names[from_study].user_attrs))
        found = [(from_study, how or CHOSEN)]
    else:
        info = read_study_info(attrs)
        found = find_sources(source_storage, study_name, model, variants, machine, info.engine_or_default,
                             info.objective)
    ws = WarmStart()
    if not found:
        info = read_study_info(attrs)
        ws.reason_code, ws.reason = no_source_reason(source_storage, study_name, model, variants, machine,
                                                     info.engine_or_default, info.objective)
    import optuna

    for name, how in found:
        st = results.read_study(optuna.load_study(study_name=name, storage=source_storage))
        seeds, skipped = seeds_of(st, space, on_gpu, how == SAME_HARDWARE)
        ws.skipped += skipped
        fresh = [s for s in seeds if all(s.params != t.params for t in ws.seeds)]
        room = MAX_SEEDS - len(ws.seeds)
        if fresh and room > 0:
            ws.sources.append(Source(name, how))
            ws.seeds += fresh[:room]
        if how in (SAME_HARDWARE, SAME_GPU) and fresh:
            # Ran at full offload on a GPU like this one: no need to screen it again. One that did
            # not fit there is screened again: its failed load is what starts the offload stage.
            full = max((int(x) for x in (st.attrs.get("space") or {}).get("num_gpu") or [0]), default=0)
            ws.screened |= {r.model for r in st.records if r.state in ("COMPLETE", "PRUNED") and not r.baseline
                            and not r.error and r.reused_from is None and not r.imported
                            and (not on_gpu or int(r.options.get("num_gpu", full) or 0) >= full)}
    if found and not ws.seeds:
        names = ", ".join(f"'{name}'" for name, _ in found)
        ws.reason_code, ws.reason = ((ALL_SKIPPED, f"no config of {names} fits this study's search (listed below)")
                                     if ws.skipped else (NO_FEASIBLE, f"{names} has no feasible measured config"))
    return ws
