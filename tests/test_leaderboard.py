"""Reads that scale: the incremental leaderboard and trial cache give what a full read gives,
and a running study reads each trial's record a bounded number of times."""

from __future__ import annotations

import random
from typing import Any

import pytest
from fake_ollama import FakeOllama, GpuSettings

from tuner import record, results
from tuner.leaderboard import Leaderboard, TrialCache
from tuner.record import TrialRecord
from tuner.results import StoredStudy, Validated, Validation
from tuner.study import TuneOptions, run_study

#: Few distinct values, so that ties are common.
VALUES = (10.0, 20.0, 20.0, 30.0, 30.0, 5.0)


def _random_record(rng: random.Random, number: int) -> TrialRecord:
    state = rng.choice(("COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "FAIL", "RUNNING"))
    r = TrialRecord(model="m", number=number, state=state, baseline=number == 0 or rng.random() < 0.05)
    if state in ("COMPLETE", "PRUNED"):
        r.values = [rng.choice(VALUES)]
    r.constraints = {"load": 0.0, "ttft_p95_ms": rng.choice((-0.5, -0.1, 0.0, 0.2))}
    if state == "COMPLETE" and rng.random() < 0.1:
        r.error = "failed to load"
    r.contended = rng.choice((None, False, False, True))
    if rng.random() < 0.1 and number > 0:
        r.reused_from = rng.randrange(number)
    return r


def _validation(rng: random.Random, numbers: list[int], baseline: int | None) -> Validation | None:
    """A stored re-validation over a few trials, its winner among them (or the defaults)."""
    if not numbers or rng.random() < 0.3:
        return None
    entries = [Validated(n) for n in rng.sample(numbers, min(len(numbers), rng.randint(1, 4)))]
    winner = rng.choice([e.number for e in entries] + [None])
    val = Validation("decode_tps", 3, entries, winner, False, len(numbers))
    if baseline is not None and rng.random() < 0.4:
        from tuner.results import Speedup

        val.baseline, val.winner = Validated(baseline), baseline
        val.speedup = Speedup(entries[0].number, baseline, 1.0, (0.9, 1.1))
    return val


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("seed", range(20))
def test_incremental_leaderboard_equals_a_full_recomputation(direction: str, seed: int) -> None:
    rng = random.Random(seed)
    board = Leaderboard(direction)
    latest: dict[int, TrialRecord] = {}
    # Trials arrive out of order (several workers) and some again in a later state.
    for _ in range(60):
        number = rng.randrange(40)
        r = _random_record(rng, number)
        board.add(r)
        latest[number] = r
        records = sorted(latest.values(), key=lambda x: x.number)
        base = next((x.number for x in records if x.baseline and x.measured), None)
        val = _validation(rng, [x.number for x in records], base)
        attrs = {"validation": val.to_dict()} if val is not None else {}
        full = StoredStudy("s", attrs, [direction], records)
        assert board.best(full.validation) is full.best()
        assert board.best() is StoredStudy("s", {}, [direction], records).best()


def _study_with(n: int) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize")
    for i in range(n):
        t = study.ask()
        t.set_user_attr(record.CONFIG, {"model": "m", "options": {"num_thread": i}})
        study.tell(t, float(i))
    return study


def test_trial_cache_reads_each_trial_once_and_again_when_its_state_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from optuna.trial import TrialState

    reads: list[int] = []
    real = record.read_record
    monkeypatch.setattr(record, "read_record", lambda t, *a: reads.append(t.number) or real(t, *a))
    study = _study_with(5)
    cache = TrialCache(("COMPLETE", "RUNNING"), Leaderboard())
    first = cache.update(study)
    assert [r.number for r in first] == [0, 1, 2, 3, 4] and reads == [0, 1, 2, 3, 4]
    assert cache.update(study) == first and len(reads) == 5
    running = study.ask()
    assert [r.state for r in cache.update(study)][-1] == "RUNNING" and reads[-1] == running.number
    study.tell(running, 99.0)
    again = cache.update(study)
    assert reads[-1] == running.number and len(reads) == 7
    assert again[-1].state == "COMPLETE" and again[:5] == first
    assert cache.board is not None and cache.board.best() is again[-1]
    # The same records as a full read, in the same order.
    full = [real(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))]
    assert [(r.number, r.state, r.values) for r in again] == [(r.number, r.state, r.values) for r in full]


THREADS = [1, 2, 4, 8]
#: Four configs: most trials repeat one, so the runner asks whether its measurement settled.
SMALL = {"num_thread": [1, 2], "num_batch": [256, 512], "num_ctx": [2048], "num_gpu": [27]}


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every record read of a trial (tuner.record.read_record and its import in results)."""
    reads: list[int] = []
    real = record.read_record

    def counted(t: Any, *a: Any) -> TrialRecord:
        reads.append(t.number)
        return real(t, *a)

    monkeypatch.setattr(record, "read_record", counted)
    monkeypatch.setattr(results, "read_record", counted)
    return reads


@pytest.mark.parametrize("sampler,params", [("staged", {"num_thread": THREADS}), ("tpe", SMALL)])
def test_a_study_reads_each_trial_a_bounded_number_of_times(monkeypatch: pytest.MonkeyPatch, sampler: str,
                                                            params: dict[str, list[Any]]) -> None:
    reads = _count_reads(monkeypatch)
    trials = 30
    with FakeOllama(time_scale=0, memory_budget_mib=1300, gpu=GpuSettings(auto_max_layers=None)) as fake:
        summary = run_study(TuneOptions(
            model=["gemma3:1b"], host=fake.url, trials=trials, repeats=2, num_predict=8, storage="memory",
            seed=3, sampler=sampler, params=params, validate=0, roofline=False, prune=False,
            warm_start=False, measure_interference=False))
    assert len(summary.trials) == trials
    # Re-reading every trial before each trial would be ~trials^2/2 reads per reader (450 each).
    per_trial = {n: reads.count(n) for n in set(reads)}
    assert len(reads) <= 5 * trials, sorted(per_trial.items())
    assert max(per_trial.values()) <= 6


def _params(sampler: str, params: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch | None) -> list[Any]:
    if monkeypatch is not None:
        # The reads as they were: every record read again and everything worked out anew on
        # every call (a record read again replaces the board's, which then ranks all anew).
        from tuner import staged
        from tuner.memory import Evidence

        def anew(cls: Any, name: str, reset: Any) -> None:
            real = getattr(cls, name)

            def call(self: Any, *a: Any) -> Any:
                reset(self)
                return real(self, *a)

            monkeypatch.setattr(cls, name, call)

        anew(TrialCache, "records", lambda self: (self._seen.clear(), self._trials.clear()))
        anew(staged.Tally, "update", lambda self: self._reset())
        anew(Evidence, "calibrate", lambda self: self._reset())
    with FakeOllama(time_scale=0, memory_budget_mib=1300, gpu=GpuSettings(auto_max_layers=None)) as fake:
        summary = run_study(TuneOptions(
            model=["gemma3:1b"], host=fake.url, trials=24, repeats=2, num_predict=8, storage="memory",
            seed=5, sampler=sampler, params=params, validate=0, roofline=False, prune=False,
            warm_start=False, measure_interference=False))
    return [(t.params, t.stage, t.reused_from, t.memory) for t in sorted(summary.trials, key=lambda t: t.number)]


@pytest.mark.parametrize("sampler,params", [("staged", {"num_thread": THREADS}), ("tpe", {"num_thread": THREADS}),
                                            ("tpe", SMALL)])
def test_the_cached_reads_decide_what_full_reads_decided(monkeypatch: pytest.MonkeyPatch, sampler: str,
                                                         params: dict[str, list[Any]]) -> None:
    cached = _params(sampler, params, None)
    assert cached == _params(sampler, params, monkeypatch)
