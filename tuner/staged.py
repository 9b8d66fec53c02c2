"""The staged search (``--sampler staged``): what users know about GPUs, told to Optuna.

Offload is a cliff: a model that fits runs fastest fully offloaded, and each layer left on
the CPU costs a large share of decode speed. Variants differ by a roughly constant factor.
So the search runs in stages, each an ordinary Optuna trial:

* **screen**: every variant once at full offload with the informed defaults of
  :func:`tuner.study.starting_points` (enqueued right after the baseline);
* **tune**: TPE over the remaining settings inside the best one or two variants, with
  ``num_gpu`` fixed at full offload (Optuna's ``PartialFixedSampler`` over the TPE sampler);
* **offload**: only when no variant's full offload fits (a failed load, or over
  ``--max-vram-mib``): a bisection of ``num_gpu`` for the smallest variant, first probing
  the count the measured VRAM says fits; the tune stage then keeps the largest count that
  loaded.

With one variant and no offload to search (a CPU-only server) there is nothing to screen:
the stages reduce to today's TPE set-up (the starting point, then TPE over the whole space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from optuna.samplers import BaseSampler

from tuner import record
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
         sizes: dict[str, int] | None = None) -> Plan:
    """The next sampled trial's stage, from the finished trials ``done``."""
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


class StagedSampler(BaseSampler):
    """An Optuna sampler that runs the stages: a ``PartialFixedSampler`` over ``tpe`` per trial.

    Enqueued trials (the baseline, the screen) keep their params; every other trial asks
    :func:`plan` which stage it is and what it fixes, and stores the stage on the trial.
    """

    def __init__(self, space: SearchSpace, tpe: Any) -> None:
        self.space = space
        self.tpe = tpe
        #: The model the baseline runs, and each variant's file size (bytes): the smallest
        #: variant is the one partial offload is searched for. Set by the study.
        self.default_model = ""
        self.sizes: dict[str, int] = {}
        self._fixed: dict[int, dict[str, Any]] = {}

    def _inner(self, trial: Any) -> Any:
        from optuna.samplers import PartialFixedSampler

        fixed = self._fixed.get(trial._trial_id)
        return PartialFixedSampler(fixed, self.tpe) if fixed else self.tpe

    def reseed_rng(self) -> None:
        self.tpe.reseed_rng()

    def before_trial(self, study: Any, trial: Any) -> None:
        self.tpe.before_trial(study, trial)
        if "fixed_params" in trial.system_attrs:
            return  # enqueued: the baseline or a screen, already labelled
        from optuna.trial import TrialState

        done = [record.read_record(t) for t in study.get_trials(deepcopy=False,
                                                                  states=(TrialState.COMPLETE, TrialState.PRUNED))]
        p = plan(self.space, done, self.default_model, self.sizes)
        self._fixed[trial._trial_id] = p.fixed
        study._storage.set_trial_user_attr(trial._trial_id, record.STAGE, p.stage)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        space: dict[str, Any] = self._inner(trial).infer_relative_search_space(study, trial)
        return space

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self._inner(trial).sample_relative(study, trial, search_space)
        return out

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self._inner(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Sequence[float] | None) -> None:
        self._inner(trial).after_trial(study, trial, state, values)
        self._fixed.pop(trial._trial_id, None)
