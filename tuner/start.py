"""The study's start: the baseline first, then the warm start's seeds and the informed
starting point (or the staged search's screen), queued once no baseline waits."""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING, Any

from tuner import record
from tuner.options import TuneOptions
from tuner.progress import _Progress
from tuner.space import SearchSpace
from tuner.storage import open_storage
from tuner.terminal import printable

if TYPE_CHECKING:
    from tuner.study import Echo, _Prepared


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:
        return os.cpu_count() or 1


class _StartQueue:
    """The study's start (warm-start seeds, starting point or screen), queued once no baseline
    waits: trials are taken from the queue in order, so the baseline always runs first. The
    plan is kept on the study until queued, so a run stopped during the baseline queues it on
    resume."""

    def __init__(self, o: TuneOptions, progress: _Progress) -> None:
        self.o, self.progress, self.pending = o, progress, True

    def __call__(self, study: Any, trial: Any = None) -> None:
        if not self.pending:
            return
        trials = study.get_trials(deepcopy=False)
        if any(record.is_baseline(t) and t.state.name in ("WAITING", "RUNNING") for t in trials):
            return
        queue = study.user_attrs.get(_START_QUEUE)
        self.pending = False
        if not queue:
            return
        # Never queue more than this run measures: a leftover waiting trial is a config with no record.
        room = (self.o.trials - self.progress.done) - sum(1 for t in trials if t.state.name == "WAITING")
        for point, attrs in queue[:max(0, room)]:
            study.enqueue_trial(point, user_attrs=attrs, skip_if_exists=True)
        study.set_user_attr(_START_QUEUE, [])


def _dead_here(t: Any) -> bool:
    """Whether a RUNNING trial's worker was a process of this machine that is gone (killed, or
    stopped by a full disk before it could mark the trial failed): it will never finish, though
    its heartbeat has not gone stale yet."""
    w = t.user_attrs.get(record.WORKER) or {}
    if t.state.name != "RUNNING" or w.get("hostname") != platform.node() or not isinstance(w.get("pid"), int):
        return False
    if w["pid"] == os.getpid():
        return False
    try:
        os.kill(w["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


#: A baseline in one of these states is measured, or about to be: no second one is queued.
_BASELINE_DONE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")
#: Study attribute: the start's configs not queued yet (params, user attrs).
_START_QUEUE = "start_queue"


def _enqueue_start(study: Any, o: TuneOptions, p: _Prepared, created: bool, echo: Echo = lambda s: None,
                   source: Any = None, progress: _Progress | None = None) -> _StartQueue:
    """Plan the warm start's configs (earlier studies' winners), then the informed starting
    point, or with the staged search its screen (one config per variant at full offload, less
    the variants the warm start's sources screened on this hardware), and tell the staged
    sampler what it cannot read from trials. The plan is queued now, or after the baseline
    when one waits (:class:`_StartQueue`)."""
    from tuner import staged

    sampler = study.sampler
    points = starting_points(p.space, p.has_gpu, _physical_cores())
    planned = False
    if isinstance(sampler, staged.FitSampler):
        sampler.default_model, sampler.memory = p.model, p.memory
    if isinstance(sampler, staged.StagedSampler):
        sampler.sizes = dict(p.sizes)
        if p.memory is not None and points and staged.full_offload(p.space) is not None:
            # The screen is planned trial by trial from what the memory model predicts fits.
            sampler.start, planned = dict(points[0]), True
        else:
            sampler.memory = None  # the stages as before: nothing to offload
    start = _StartQueue(o, progress or _Progress(o, echo, o.trials))
    if not (created and o.starting_points):
        start(study)  # a plan kept from a run stopped during its baseline
        return start
    warm = _warm_start(study, o, p, echo, source)
    queue: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (s.params, {record.STAGE: staged.WARM, record.SEEDED_FROM: s.origin}) for s in warm.seeds]
    stage = staged.START
    if planned:
        points = []
    elif isinstance(sampler, staged.StagedSampler) and points and staged.screens(p.space):
        points, stage = staged.screen_points(p.space, points[0]), staged.SCREEN
        if warm.seeds:
            # A variant is screened unless a seed runs it at full offload or a source on this
            # hardware measured it there.
            full = staged.full_offload(p.space)
            covered = warm.screened | {s.params.get("variant", p.model) for s in warm.seeds
                                       if full is None or s.params.get("num_gpu") == full}
            points = [x for x in points if x.get("variant", p.model) not in covered]
    elif warm.seeds:
        points = []  # the seeds are better informed than the generic starting point
    queue += [(x, {record.STAGE: stage}) for x in points]
    study.set_user_attr(_START_QUEUE, [[point, attrs] for point, attrs in queue])
    start(study)
    return start


def _warm_start(study: Any, o: TuneOptions, p: _Prepared, echo: Echo, source: Any = None) -> Any:
    """Plan the warm start of a new study, say what it found and keep it with the study;
    ``source``: the storage of the sources when the run opened (and checked) it already."""
    from tuner import warmstart

    if not o.warm_start:
        return warmstart.WarmStart()
    # The sources are read through a storage of their own (a "memory" storage has none).
    storage = source if source is not None else open_storage(o.storage, create=False)
    ws = warmstart.plan(storage, study.study_name, p.model, p.space, study.user_attrs,
                        from_study=o.warm_start_from)
    for line in ws.lines():
        echo(printable(line))
    # Kept whether it seeded or not: `tune show` says what it did, or why it did nothing.
    study.set_user_attr(warmstart.ATTR, ws.to_dict())
    return ws


def starting_points(space: SearchSpace, has_gpu: bool, cores: int) -> list[dict[str, Any]]:
    """A few informed configs tried right after the baseline."""
    if not space.searched:
        return []
    prefs: dict[str, list[Any]] = {
        "num_ctx": [min(space["num_ctx"].values)] if "num_ctx" in space else [],
        "num_batch": [512, 256, 1024],
        "num_gpu": [max(space["num_gpu"].values)] if "num_gpu" in space and has_gpu else [0],
        # A GPU server's own thread count (0: the runtime decides) is the safe start: this
        # machine's cores need not be the server's, and offloaded layers hardly use them.
        "num_thread": ([0] if has_gpu else []) + [cores, max(1, cores // 2)],
    }
    point: dict[str, Any] = {}
    for p in space.searched:
        choice = next((v for v in prefs.get(p.name, []) if v in p.values), p.values[0])
        point[p.name] = choice
    return [point]
