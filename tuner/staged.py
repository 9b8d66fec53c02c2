"""The staged search (``--sampler staged``): what users know about GPUs, told to Optuna.

Offload is a cliff: a model that fits runs fastest fully offloaded, and each layer left on
the CPU costs a large share of decode speed. Variants differ by a roughly constant factor.
So the search runs in stages, each an ordinary Optuna trial:

* **screen**: every variant once at full offload with the informed defaults of
  :func:`tuner.start.starting_points` (enqueued right after the baseline);
* **tune**: TPE over the remaining settings inside the best one or two variants, with
  ``num_gpu`` fixed at full offload (Optuna's ``PartialFixedSampler`` over the TPE sampler);
* **offload**: only when no variant's full offload fits (a failed load, or over
  ``--max-vram-mib``): a bisection of ``num_gpu`` for the smallest variant, first probing
  the count the measured VRAM says fits; the tune stage then keeps the largest count that
  loaded.

With a GPU memory model (tuner/memory.py; every GPU server), fitting is a property of the
whole config, not of the variant: the screen is planned trial by trial instead of queued.
Each variant is screened at full offload with the largest num_batch (then a quantized KV
cache, then a smaller context down to the floor) predicted to fit; when only a config the
evidence cannot vouch for could fit, the smallest of them is tried, variants in order of
that need, so one failed load rules out every larger one. A variant that failed is retried
whenever the model predicts a config of it fits. TPE's proposals are repaired before they
are measured: a config predicted not to fit is moved to the nearest one predicted to fit
(smaller batch, then quantized KV, then smaller context, then fewer layers), and partial
offload takes the most layers predicted to fit for the batch and context. After the screen,
the leader's batch climbs one step while the next step up is not known not to fit. Nothing
predicted not to fit is loaded (tuner/runner.py skips it).

With one variant and no offload to search (a CPU-only server) there is nothing to screen:
the stages reduce to today's TPE set-up (the starting point, then TPE over the whole space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from optuna.samplers import BaseSampler

from tuner import memory as mem
from tuner import record
from tuner.leaderboard import TrialCache
from tuner.memory import Calibration, Evidence, StudyMemory
from tuner.record import TrialRecord
from tuner.space import Param, SearchSpace

#: The baseline trial (engine defaults), chosen by no stage: named as its stored flag.
BASELINE = record.BASELINE
#: The informed starting point, when there is no screen (one variant, nothing to offload).
START = "start"
#: A config seeded from an earlier study (tuner/warmstart.py), queued after the baseline.
WARM = "warm"
SCREEN, TUNE, OFFLOAD = "screen", "tune", "offload"
STAGES = (BASELINE, START, WARM, SCREEN, TUNE, OFFLOAD)
#: A runner-up variant is tuned too when its best is within this share of the leader's.
RUNNER_UP_SHARE = 0.95


@dataclass(frozen=True)
class Plan:
    """The stage of the next trial and the settings it fixes (TPE samples the rest)."""

    stage: str
    fixed: dict[str, Any] = field(default_factory=dict)


def full_offload(space: SearchSpace) -> int | None:
    """The ``num_gpu`` of full offload when offload is searched (else None: nothing to stage)."""
    if "num_gpu" not in space or space["num_gpu"].fixed:
        return None
    return int(max(space["num_gpu"].values))


def variants(space: SearchSpace) -> tuple[Any, ...]:
    """The variants searched (empty when the space has no variant choice)."""
    return space["variant"].values if "variant" in space and not space["variant"].fixed else ()


def screens(space: SearchSpace) -> bool:
    """Whether the staged search has anything to screen (several variants, or offload)."""
    return bool(variants(space)) or full_offload(space) is not None


def narrowed(space: SearchSpace) -> SearchSpace:
    """The space TPE tunes in once the stages have fixed the variant and the offload."""
    if not screens(space):
        return space
    return SearchSpace(tuple(Param(p.name, p.values[:1]) if p.name in ("variant", "num_gpu") else p
                             for p in space.params))


def screen_points(space: SearchSpace, start: dict[str, Any]) -> list[dict[str, Any]]:
    """One config per variant at full offload, the rest as in the starting point ``start``."""
    full = full_offload(space)
    point = dict(start)
    if full is not None:
        point["num_gpu"] = full
    names = variants(space)
    return [{**point, "variant": v} for v in names] if names else [point]


def _gpu(r: TrialRecord) -> Any:
    return r.options.get("num_gpu")


def _over_memory(r: TrialRecord) -> bool:
    """The config did not fit: it failed to load, or it broke --max-vram-mib."""
    return (r.state == "COMPLETE" and r.error is not None) or r.constraints.get("vram_mib", 0.0) > 0


def _fits(r: TrialRecord) -> bool:
    return r.state in ("COMPLETE", "PRUNED") and r.error is None and r.constraints.get("vram_mib", 0.0) <= 0


def _score(r: TrialRecord) -> float:
    """A trial's standing: feasible values first, a pruned trial below every measured one."""
    if r.state != "COMPLETE" or r.error is not None or r.value is None:
        return -math.inf
    return r.value if r.feasible else r.value * 1e-6


def plan(space: SearchSpace, done: Sequence[TrialRecord], default_model: str,
         sizes: dict[str, int] | None = None, memory: StudyMemory | None = None,
         start: dict[str, Any] | None = None, cal: Calibration | None = None,
         tally: Tally | None = None) -> Plan:
    """The next sampled trial's stage, from the finished trials ``done`` (and, with a memory
    model, the calibration ``cal`` they make; ``tally``: the sampler's, kept from call to call)."""
    if memory is not None and start is not None and full_offload(space) is not None:
        tally = tally if tally is not None else Tally(full_offload(space))
        tally.update(done)
        return _memory_plan(space, tally, default_model, sizes or {}, memory, start,
                            cal if cal is not None else memory.calibrate(done))
    full = full_offload(space)
    names = [str(v) for v in variants(space)] or [default_model]
    mine = [r for r in done if not r.baseline and r.state in ("COMPLETE", "PRUNED")]
    if not screens(space):
        return Plan(TUNE)
    fixed_variant: dict[str, Any] = {}
    # Full offload (or the one num_gpu there is) per variant: which variants it fits.
    at_full = [r for r in mine if full is None or _gpu(r) == full]
    fitting = {r.model for r in at_full if _fits(r)}
    screened = {r.model for r in at_full}
    if fitting:
        best = _ranked({v: [r for r in at_full if r.model == v] for v in names if v in fitting})
        if variants(space):
            fixed_variant = {"variant": _pick(best, mine, full)}
        return Plan(TUNE, {**fixed_variant, **({"num_gpu": full} if full is not None else {})})
    if full is None or not all(v in screened for v in names):
        return Plan(TUNE)
    target = min(names, key=lambda v: ((sizes or {}).get(v, 0), names.index(v)))
    if variants(space):
        fixed_variant = {"variant": target}
    tried = [r for r in mine if r.model == target and isinstance(_gpu(r), int) and _gpu(r) >= 0]
    ok = [int(_gpu(r)) for r in tried if _fits(r)]
    bad = [int(_gpu(r)) for r in tried if _over_memory(r)]
    lo, hi = max(ok, default=0), min(bad, default=full)
    if hi - lo <= 1 or (not ok and hi <= 1):
        return _climb(tried, full) or Plan(TUNE, {**fixed_variant, "num_gpu": lo if ok else 0})
    guess = _estimate(done, target, full, (sizes or {}).get(target))
    probe = guess if guess is not None and lo < guess < hi and len(tried) <= 1 else (lo + hi + 1) // 2
    # Memory depends on the other settings too: probe with the screen's.
    screen = next((r for r in tried if _gpu(r) == full and r.params), None)
    held = dict(screen.params) if screen is not None else dict(fixed_variant)
    return Plan(OFFLOAD, {**held, "num_gpu": probe})


def _climb(tried: Sequence[TrialRecord], full: int) -> Plan | None:
    """One more layer on the GPU for the best partial-offload config, until one does not fit.

    The bisection ran with the screen's settings; a smaller batch or context found by the
    tune stage frees memory for more layers, and each layer is worth more than any of them.
    """
    measured = [r for r in tried if _fits(r) and r.params and _score(r) > -math.inf]
    if not measured:
        return None
    best = max(measured, key=_score)
    up = int(_gpu(best)) + 1
    if up >= full:
        return None
    key = {k: v for k, v in best.params.items() if k != "num_gpu"}
    if any(_gpu(r) == up and {k: v for k, v in r.params.items() if k != "num_gpu"} == key for r in tried):
        return None
    return Plan(OFFLOAD, {**best.params, "num_gpu": up})


def _ranked(by_variant: dict[str, list[TrialRecord]]) -> list[tuple[str, float, int]]:
    """(variant, best score, trials) from the best variant down."""
    rows = [(v, max(_score(r) for r in rs), len(rs)) for v, rs in by_variant.items()]
    return sorted(rows, key=lambda x: -x[1])


def _pick(ranked: list[tuple[str, float, int]], mine: Sequence[TrialRecord], full: int | None) -> str:
    """The leader, or every third tune trial the runner-up when it is close behind."""
    leader = ranked[0]
    if len(ranked) < 2 or not (leader[1] > 0 and ranked[1][1] >= RUNNER_UP_SHARE * leader[1]):
        return leader[0]
    runner_up = ranked[1]
    # Both keep being measured: the one with fewer trials than its share gets the next.
    return runner_up[0] if 2 * runner_up[2] < leader[2] else leader[0]


def _estimate(done: Sequence[TrialRecord], target: str, full: int, file_bytes: int | None) -> int | None:
    """The largest num_gpu that should fit, from what the server reported.

    The most VRAM any loaded trial held is memory that fits; a loaded trial of the target
    (or its full-offload trial over --max-vram-mib) gives its size, so the share that fits
    is the ratio of the two (the file size stands in for a target that never loaded).
    """
    budget = max((r.server_vram_mib or 0.0 for r in done if _fits(r)), default=0.0)
    over = [r for r in done if not r.baseline and r.model == target and r.error is None and r.constraints.get("vram_mib", 0.0) > 0
            and r.server_vram_mib]
    if over:
        r = over[0]
        # The limit is what fits: vram / limit = 1 + the normalised excess.
        return int(int(_gpu(r)) / (1.0 + r.constraints["vram_mib"]))
    sizes = [r.server_size_mib for r in done if r.model == target and r.server_size_mib]
    if not sizes and file_bytes:
        sizes = [file_bytes / 2**20]
    if not budget or not sizes:
        return None
    return int(full * budget / max(sizes))


# ----------------------------------------------------------------------------- with a memory model


def _key(model: str, params: dict[str, Any]) -> tuple[Any, ...]:
    """The evidence key (tuner.memory.config_key) of a params dict."""
    return mem.config_key(model, *_config(model, params))


def _config(model: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(runner options, server settings) of a params dict, as the study sends them."""
    from tuner.settings import SERVER_PARAMS

    runner = {k: v for k, v in params.items() if k not in SERVER_PARAMS and k != "variant"}
    server = {k: v for k, v in params.items() if k in SERVER_PARAMS}
    return runner, server


def prior_mib(memory: StudyMemory, model: str, params: dict[str, Any]) -> float:
    runner, server = _config(model, params)
    p = memory.predict(model, runner, server)
    return p.total_mib if p is not None else 0.0


def verdict(memory: StudyMemory, cal: Calibration, model: str, params: dict[str, Any]) -> str:
    return memory.verdict(cal, model, *_config(model, params))


def step_up(space: SearchSpace, memory: StudyMemory, cal: Calibration, model: str, params: dict[str, Any],
            name: str, values: list[Any], tried: set[tuple[Any, ...]]) -> dict[str, Any] | None:
    """The next value of ``name`` above the config's worth trying, bisecting what is not known:
    the largest predicted to fit; else the largest in the lower half of the ground between what
    loaded and what did not; else the smallest not known not to fit. None: nothing to try."""
    cands = [{**params, name: v} for v in sorted(values)]
    cands = [c for c in cands if _key(model, c) not in tried]
    verdicts = [verdict(memory, cal, model, c) for c in cands]
    fits = [c for c, v in zip(cands, verdicts) if v == mem.FITS]
    unknown = [c for c, v in zip(cands, verdicts) if v == mem.UNKNOWN]
    half = [c for c in unknown if cal.between(prior_mib(memory, model, c))]
    for group in (half, fits):
        if group:
            best = group[-1]
            if group is half and fits and fits[-1][name] > best[name]:
                best = fits[-1]
            return best
    return unknown[0] if unknown else None


def _down(space: SearchSpace, name: str, value: Any) -> list[Any]:
    """The space's values of ``name`` from ``value`` down (smaller first for numbers: nearest first)."""
    if name not in space:
        return [value]
    vals = list(space[name].values)
    if name == "kv_cache_type":
        order = [v for v in ("f16", "q8_0", "q4_0") if v in vals]
        i = order.index(value) if value in order else 0
        return order[i:] or [value]
    lower = sorted((v for v in vals if isinstance(v, int) and v <= value), reverse=True)
    return lower if lower and lower[0] == value else [value] + lower


def alternatives(space: SearchSpace, params: dict[str, Any], move_gpu: bool) -> list[dict[str, Any]]:
    """Configs near ``params`` that need less memory, in the order worth trying: a smaller
    batch, a quantized KV cache, a smaller context (down to the floor), then fewer layers."""
    out: list[dict[str, Any]] = []
    gpus = [params.get("num_gpu")]
    if move_gpu and isinstance(params.get("num_gpu"), int) and params["num_gpu"] > 0:
        gpus = [g for g in _down(space, "num_gpu", params["num_gpu"]) if g >= 0]
    for gpu in gpus:
        for ctx in _down(space, "num_ctx", params.get("num_ctx")) if "num_ctx" in params else [None]:
            for kv in _down(space, "kv_cache_type", params.get("kv_cache_type")) if "kv_cache_type" in params else [None]:
                for batch in _down(space, "num_batch", params.get("num_batch")) if "num_batch" in params else [None]:
                    c = dict(params)
                    for k, v in (("num_gpu", gpu), ("num_ctx", ctx), ("kv_cache_type", kv), ("num_batch", batch)):
                        if v is not None:
                            c[k] = v
                    out.append(c)
    return out


def most_layers(space: SearchSpace, memory: StudyMemory, cal: Calibration, model: str,
                params: dict[str, Any], allow: tuple[str, ...] = (mem.FITS,)) -> int | None:
    """The most layers (num_gpu) predicted to fit with the rest of ``params``."""
    if "num_gpu" not in space:
        return None
    for g in sorted((v for v in space["num_gpu"].values if isinstance(v, int) and v >= 0), reverse=True):
        if verdict(memory, cal, model, {**params, "num_gpu": g}) in allow:
            return g
    return None


def repair(space: SearchSpace, memory: StudyMemory, cal: Calibration, model: str, params: dict[str, Any],
           move_gpu: bool) -> dict[str, Any]:
    """``params`` if predicted to fit, else the nearest config predicted to fit; with
    ``move_gpu`` (partial offload) the most layers predicted to fit for its batch and context."""
    if move_gpu and isinstance(params.get("num_gpu"), int) and params["num_gpu"] >= 0:
        top = most_layers(space, memory, cal, model, params)
        if top is not None and top > params["num_gpu"]:
            params = {**params, "num_gpu": top}
    if verdict(memory, cal, model, params) == mem.FITS:
        return params
    for c in alternatives(space, params, move_gpu):
        if verdict(memory, cal, model, c) == mem.FITS:
            return c
    return params


class Tally:
    """What the memory-planned stages read of the finished trials, folded in one trial at a
    time: the answers the passes over every trial gave (a maximum is the first one reached,
    in trial order, as ``max`` gives it)."""

    def __init__(self, full: int | None) -> None:
        self.full = full
        self._reset()

    def _reset(self) -> None:
        #: The records folded, in order: a list that does not start with them is folded anew.
        self.records: list[TrialRecord] = []
        #: The configs of the sampled trials (not the baseline) that finished.
        self.tried: set[tuple[Any, ...]] = set()
        #: Per variant, its trials at full offload that fit: how many, and the best.
        self.at_full: dict[str, tuple[int, TrialRecord]] = {}
        #: Per variant, the trial that fit with the most layers given (the best of them).
        self.most_layers: dict[str, TrialRecord] = {}
        #: Per variant, the largest num_batch that failed to load.
        self.failed_batch: dict[str, int] = {}

    def update(self, done: Sequence[TrialRecord]) -> None:
        n = len(self.records)
        if len(done) < n or list(done[:n]) != self.records:
            self._reset()
            n = 0
        for r in done[n:]:
            self._add(r)

    def _add(self, r: TrialRecord) -> None:
        self.records.append(r)
        if r.baseline or r.state not in ("COMPLETE", "PRUNED"):
            return
        self.tried.add(mem.config_key(r.model, r.options, r.server))
        gpu = _gpu(r)
        if _fits(r):
            if gpu == self.full:
                count, best = self.at_full.get(r.model, (0, r))
                self.at_full[r.model] = (count + 1, r if _score(r) > _score(best) else best)
            if isinstance(gpu, int) and gpu >= 0:
                top = self.most_layers.get(r.model)
                if top is None or (int(gpu), _score(r)) > (int(_gpu(top)), _score(top)):
                    self.most_layers[r.model] = r
        batch = r.options.get("num_batch")
        if r.failed_load and isinstance(batch, int):
            self.failed_batch[r.model] = max(batch, self.failed_batch.get(r.model, batch))


def _memory_plan(space: SearchSpace, tally: Tally, default_model: str, sizes: dict[str, int],
                 memory: StudyMemory, start: dict[str, Any], cal: Calibration) -> Plan:
    full = full_offload(space)
    assert full is not None
    names = [str(v) for v in variants(space)] or [default_model]
    tried = tally.tried
    fitting = set(tally.at_full)
    # Every setting the trial will send (the fixed ones too), so configs compare with trials.
    base = {k: v for k, v in {**space.fixed, **start}.items() if k != "variant"}
    base["num_gpu"] = full

    def with_variant(v: str, c: dict[str, Any]) -> dict[str, Any]:
        return {**c, "variant": v} if variants(space) else dict(c)

    # Screen: each variant at full offload, variants by their smallest need first.
    screen: list[tuple[float, int, str, dict[str, Any]]] = []
    for i, v in enumerate(names):
        if v in fitting:
            continue
        cands = [c for c in alternatives(space, base, move_gpu=False) if _key(v, c) not in tried]
        if not cands:
            continue
        # A quantized KV cache only when nothing fits with the starting point's (it may be slower).
        same_kv = [c for c in cands if c.get("kv_cache_type") == base.get("kv_cache_type")]
        smallest = min(same_kv or cands, key=lambda c: prior_mib(memory, v, c))
        if same_kv and verdict(memory, cal, v, smallest) == mem.NO:
            smallest = min(cands, key=lambda c: prior_mib(memory, v, c))
        vs = verdict(memory, cal, v, smallest)
        if vs == mem.NO:
            continue
        pick = next((c for c in cands if verdict(memory, cal, v, c) == mem.FITS), smallest)
        screen.append((prior_mib(memory, v, smallest), i, v, pick))
    if screen:
        _, _, v, pick = min(screen)
        return Plan(SCREEN, with_variant(v, pick))
    if fitting:
        ranked = sorted(((v, _score(tally.at_full[v][1]), tally.at_full[v][0]) for v in names if v in fitting),
                        key=lambda x: -x[1])
        leader = _pick(ranked, [], full)
        climb = _climb_batch(space, memory, cal, leader, [tally.at_full[leader][1]], tried,
                             tally.failed_batch.get(leader))
        if climb is not None:
            return Plan(TUNE, with_variant(leader, climb))
        return Plan(TUNE, {**({"variant": leader} if variants(space) else {}), "num_gpu": full})
    # Nothing fits fully: partial offload of the smallest variant, the most layers predicted to fit.
    target = min(names, key=lambda v: (sizes.get(v, 0), names.index(v)))
    fixed_variant = {"variant": target} if variants(space) else {}
    probe = {**base, **fixed_variant}
    small = {**probe, "num_batch": min(space["num_batch"].values)} if "num_batch" in space and not space["num_batch"].fixed else probe
    if "num_ctx" in space:
        small["num_ctx"] = min(space["num_ctx"].values)
    for kv in (_down(space, "kv_cache_type", small["kv_cache_type"])[-1:] if "kv_cache_type" in small else []):
        small["kv_cache_type"] = kv
    best = tally.most_layers.get(target)
    if best is None:
        sure = most_layers(space, memory, cal, target, small)
        c = {**small, "num_gpu": sure if sure is not None else 0}
        if _key(target, c) not in tried:
            return Plan(OFFLOAD, c)
    if best is not None:
        params = {k: v for k, v in {**small, **best.options, **best.server}.items() if k in space}
        params.update(fixed_variant)
        layers = [g for g in space["num_gpu"].values if isinstance(g, int) and int(_gpu(best)) < g < full]
        up = step_up(space, memory, cal, target, params, "num_gpu", layers, tried)
        if up is not None:
            return Plan(OFFLOAD, up)
        # The best config with the most layers is the best of those with as many layers.
        climb = _climb_batch(space, memory, cal, target, [best], tried, tally.failed_batch.get(target))
        if climb is not None:
            return Plan(OFFLOAD, {**climb, **fixed_variant})
    return Plan(TUNE, fixed_variant)


def _climb_batch(space: SearchSpace, memory: StudyMemory, cal: Calibration, leader: str,
                 trials: list[TrialRecord], tried: set[tuple[Any, ...]],
                 failed_batch: int | None = None) -> dict[str, Any] | None:
    """A larger batch (up to 512) for the leader's best config when one is not known not to fit
    (the screen may have had to start small); None when there is nothing to climb.
    ``failed_batch``: the largest num_batch of the leader that failed to load."""
    if "num_batch" not in space or space["num_batch"].fixed or not trials:
        return None
    best = max(trials, key=_score)
    params = {k: v for k, v in best.params.items() if k != "variant"}
    params.update({k: v for k, v in {**best.options, **best.server}.items() if k in space})
    batch = params.get("num_batch")
    if not isinstance(batch, int):
        return None
    ups = [v for v in space["num_batch"].values if batch < v <= 512]
    if not ups:
        return None
    # A larger batch is worth a few percent at most: after one failed load, only steps
    # predicted to fit are taken.
    if failed_batch is not None and failed_batch > batch:
        safe = [v for v in ups if _key(leader, {**params, "num_batch": v}) not in tried
                and verdict(memory, cal, leader, {**params, "num_batch": v}) == mem.FITS]
        return {**params, "num_batch": safe[-1]} if safe else None
    return step_up(space, memory, cal, leader, params, "num_batch", ups, tried)


class FitSampler(BaseSampler):
    """TPE whose proposals are repaired by the study's memory model before they are measured
    (``--sampler tpe`` on a GPU server): a config predicted not to fit moves to the nearest one
    predicted to fit, and an explicit ``num_gpu`` rises to the most layers predicted to fit."""

    def __init__(self, space: SearchSpace, tpe: Any) -> None:
        self.space = space
        self.tpe = tpe
        #: The model the baseline runs. Set by the study.
        self.default_model = ""
        #: The study's memory model (None: nothing is repaired). Set by the study.
        self.memory: StudyMemory | None = None
        self._cal: dict[int, Calibration] = {}
        # The finished trials read once each, and the memory evidence of each worked out once.
        self._finished = TrialCache(("COMPLETE", "PRUNED"))
        self._evidence: Evidence | None = None

    def _inner(self, trial: Any) -> Any:
        return self.tpe

    def _fixed_by_stage(self, trial: Any) -> dict[str, Any]:
        return {}

    def reseed_rng(self) -> None:
        self.tpe.reseed_rng()

    def _done(self, study: Any) -> list[TrialRecord]:
        """The study's complete and pruned trials, in trial order (only new ones are read)."""
        return self._finished.update(study)

    def _calibrate(self, done: Sequence[TrialRecord]) -> Calibration:
        assert self.memory is not None
        if self._evidence is None or self._evidence.memory is not self.memory:
            self._evidence = Evidence(self.memory)
        return self._evidence.calibrate(done)

    def before_trial(self, study: Any, trial: Any) -> None:
        self.tpe.before_trial(study, trial)
        if self.memory is not None and "fixed_params" not in trial.system_attrs:
            self._cal[trial._trial_id] = self._calibrate(self._done(study))

    def _repairs(self, trial: Any) -> bool:
        return (self.memory is not None and trial._trial_id in self._cal
                and "fixed_params" not in trial.system_attrs)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        if self._repairs(trial):
            # Every parameter at once, so the config can be repaired as a whole.
            return dict(self.space.distributions())
        space: dict[str, Any] = self._inner(trial).infer_relative_search_space(study, trial)
        return space

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        inner = self._inner(trial)
        if not (self._repairs(trial) and search_space):
            out: dict[str, Any] = inner.sample_relative(study, trial, search_space)
            return out
        own = inner.infer_relative_search_space(study, trial)
        vals: dict[str, Any] = dict(inner.sample_relative(study, trial, own)) if own else {}
        for name, dist in search_space.items():
            if name not in vals:
                vals[name] = inner.sample_independent(study, trial, name, dist)
        fixed = self._fixed_by_stage(trial)
        if len(fixed) >= len(self.space.searched):
            return vals  # the stage chose the whole config
        model = str(vals.get("variant", self.space.fixed.get("variant", self.default_model)))
        # Unless a stage fixed num_gpu (full offload), it takes the most layers that fit.
        out = repair(self.space, self.memory, self._cal[trial._trial_id], model,  # type: ignore[arg-type]
                     {**self.space.fixed, **vals}, move_gpu="num_gpu" not in fixed)
        return {k: v for k, v in out.items() if k in search_space}

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self._inner(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Sequence[float] | None) -> None:
        self._inner(trial).after_trial(study, trial, state, values)
        self._cal.pop(trial._trial_id, None)


class StagedSampler(FitSampler):
    """An Optuna sampler that runs the stages: a ``PartialFixedSampler`` over ``tpe`` per trial.

    Enqueued trials (the baseline, the screen) keep their params; every other trial asks
    :func:`plan` which stage it is and what it fixes, and stores the stage on the trial.
    """

    def __init__(self, space: SearchSpace, tpe: Any) -> None:
        super().__init__(space, tpe)
        #: Each variant's file size (bytes): the smallest variant is the one partial offload is
        #: searched for; and the starting point the memory-planned screen starts from. Set by the study.
        self.sizes: dict[str, int] = {}
        self.start: dict[str, Any] | None = None
        self._fixed: dict[int, dict[str, Any]] = {}
        self._tally = Tally(full_offload(space))

    def _inner(self, trial: Any) -> Any:
        from optuna.samplers import PartialFixedSampler

        fixed = self._fixed.get(trial._trial_id)
        return PartialFixedSampler(fixed, self.tpe) if fixed else self.tpe

    def _fixed_by_stage(self, trial: Any) -> dict[str, Any]:
        return self._fixed.get(trial._trial_id) or {}

    def before_trial(self, study: Any, trial: Any) -> None:
        self.tpe.before_trial(study, trial)
        if "fixed_params" in trial.system_attrs:
            return  # enqueued: the baseline or a screen, already labelled
        done = self._done(study)
        cal = self._calibrate(done) if self.memory is not None else None
        p = plan(self.space, done, self.default_model, self.sizes, self.memory, self.start, cal, self._tally)
        self._fixed[trial._trial_id] = p.fixed
        if cal is not None:
            self._cal[trial._trial_id] = cal
        study._storage.set_trial_user_attr(trial._trial_id, record.STAGE, p.stage)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Sequence[float] | None) -> None:
        super().after_trial(study, trial, state, values)
        self._fixed.pop(trial._trial_id, None)
