"""tuner/effects.py: the objective per value of each searched setting, its intervals, the verdict."""

from __future__ import annotations

import itertools
import random
from typing import Any

from conftest import invoke

from tuner import effects
from tuner.record import TrialRecord, stored_attrs
from tuner.results import StoredStudy

SPACE: dict[str, list[Any]] = {"num_thread": [1, 2], "num_batch": [128, 512], "num_gpu": [0]}


def _rec(number: int, value: float, contended: bool | None = None, **params: Any) -> TrialRecord:
    return TrialRecord(number=number, state="COMPLETE", values=[value], params=params, contended=contended)


def _study(records: list[TrialRecord], space: dict[str, list[Any]] | None = None,
           objective: str = "decode_tps", direction: str = "maximize") -> StoredStudy:
    return StoredStudy("s", {"space": SPACE if space is None else space, "objectives": [objective]}, [direction],
                       records)


def _grid(thread_gain: float, batch_gain: float, noise: float, repeats: int = 3, seed: int = 1) -> list[TrialRecord]:
    """Every (num_thread, num_batch) pair ``repeats`` times: 20 tok/s, times ``thread_gain`` at
    2 threads and ``batch_gain`` at batch 512, times a random factor within +-``noise``."""
    rng = random.Random(seed)
    out = []
    for i, (t, b, _) in enumerate(itertools.product((1, 2), (128, 512), range(repeats))):
        v = 20.0 * (thread_gain if t == 2 else 1.0) * (batch_gain if b == 512 else 1.0)
        out.append(_rec(i + 1, v * (1 + rng.uniform(-noise, noise)), num_thread=t, num_batch=b, num_gpu=0))
    return out


def _param(e: effects.Effects, name: str) -> effects.ParamEffect:
    return next(p for p in e.params if p.name == name)


def test_the_setting_that_doubles_the_rate_is_named() -> None:
    e = effects.compute(_study(_grid(thread_gain=2.0, batch_gain=1.02, noise=0.01)))
    assert e.top == "num_thread" and e.log_scale and e.n_trials == 12
    assert [p.name for p in e.params] == ["num_thread", "num_batch"]  # num_gpu has one value: not searched
    thread, batch = _param(e, "num_thread"), _param(e, "num_batch")
    assert [(v.value, v.n) for v in thread.values] == [(1, 6), (2, 6)]
    assert thread.clear and (thread.high, thread.low) == (2, 1)
    assert thread.effect is not None and 1.9 < thread.effect < 2.1
    assert thread.effect_low is not None and thread.effect_high is not None
    assert thread.effect_low < thread.effect < thread.effect_high
    assert batch.effect is not None and batch.effect < 1.1
    assert e.verdict.startswith("num_thread moved decode tok/s most: 2 vs 1 gives 2.0")


def test_overlapping_intervals_are_not_distinguishable() -> None:
    e = effects.compute(_study(_grid(thread_gain=1.02, batch_gain=1.02, noise=0.3, repeats=2)))
    assert e.top is None and e.verdict.startswith("Not distinguishable")
    assert not any(p.clear for p in e.params)
    assert all(p.effect_low is not None and p.effect_low < 1.0 for p in e.params)


def test_intervals_never_leave_the_possible_range() -> None:
    rng = random.Random(7)
    for seed in range(30):
        # Wild spread, 2-3 trials a value: a linear t interval would go far below 0 here.
        recs = [_rec(i, rng.choice((0.5, 1.0, 80.0, 200.0)) * rng.uniform(0.5, 1.5),
                     num_thread=rng.choice((1, 2)), num_batch=rng.choice((128, 512))) for i in range(5)]
        e = effects.compute(_study(recs))
        for p in e.params:
            for v in p.values:
                assert v.mean > 0 and (v.ci_low is None or 0 < v.ci_low <= v.mean <= (v.ci_high or 0)), (seed, v)
            assert p.effect_low is None or p.effect_low > 0


def test_one_trial_has_no_interval_and_sizes_no_effect() -> None:
    recs = [_rec(1, 40.0, num_thread=2, num_batch=128), _rec(2, 20.0, num_thread=1, num_batch=512)]
    e = effects.compute(_study(recs))
    assert all(v.n == 1 and v.ci_low is None and v.ci_high is None for p in e.params for v in p.values)
    assert all(p.effect is None for p in e.params) and e.top is None
    assert "measured at least 2 times" in e.verdict


def test_only_measured_trials_with_settings_count() -> None:
    recs = _grid(2.0, 1.0, 0.01, repeats=2)
    recs += [
        TrialRecord(number=90, state="COMPLETE", values=[25.0], baseline=True),  # defaults: no searched values
        TrialRecord(number=91, state="COMPLETE", values=[0.0], params={"num_thread": 2, "num_batch": 128},
                    error="out of memory"),  # failed load, scored 0
        TrialRecord(number=92, state="PRUNED", values=[1.0], params={"num_thread": 2, "num_batch": 128}),
        TrialRecord(number=93, state="FAIL", params={"num_thread": 1, "num_batch": 128}),
    ]
    e = effects.compute(_study(recs))
    assert e.n_trials == 8 and all(max(v.trials) < 90 for p in e.params for v in p.values)


def test_contended_trials_are_left_out_when_quiet_ones_exist() -> None:
    recs = _grid(2.0, 1.0, 0.01, repeats=2)
    for r in recs:
        r.contended = False
    # A neighbour halved two 2-thread trials: with them, num_thread would look weaker.
    recs += [_rec(50, 20.0, True, num_thread=2, num_batch=128), _rec(51, 20.0, True, num_thread=2, num_batch=512)]
    e = effects.compute(_study(recs))
    assert e.excluded_contended == 2 and e.n_trials == 8
    assert all(50 not in v.trials for p in e.params for v in p.values)
    assert any("Left out 2 contended trial(s)" in n for n in e.notes)
    assert "Left out 2 contended" in "\n".join(e.lines())


def test_all_contended_are_kept_and_said() -> None:
    recs = _grid(2.0, 1.0, 0.01, repeats=2)
    for r in recs:
        r.contended = True
    e = effects.compute(_study(recs))
    assert e.excluded_contended == 0 and e.n_trials == 8
    assert any(n.startswith("Every measured trial with a known load was contended") for n in e.notes)


def test_minimised_objective_names_the_lower_value_best() -> None:
    recs = [_rec(i + 1, (400.0 if t == 1 else 200.0) * (1 + 0.01 * (i % 2)), num_thread=t, num_batch=b)
            for i, (t, b) in enumerate(itertools.product((1, 2), (128, 512, 128, 512)))]
    e = effects.compute(_study(recs, objective="ttft_p95", direction="minimize"))
    assert e.top == "num_thread" and not e.maximize
    assert e.verdict.startswith("num_thread moved p95 TTFT ms most: 2 vs 1 gives 2.0")


def test_two_clear_settings_with_overlapping_effects_are_not_ranked() -> None:
    e = effects.compute(_study(_grid(thread_gain=2.0, batch_gain=1.9, noise=0.02, repeats=6)))
    assert all(p.clear for p in e.params)
    assert e.top is None and e.verdict.startswith("Not distinguishable which parameter moved decode tok/s most")


def test_demo_numbers_name_the_threads_not_the_batch() -> None:
    # The 8-trial demo of the README (trial 0 is the baseline): PED-ANOVA ranked num_batch
    # first there; num_batch=256 ran only with 1 thread, so its one trial looks slow.
    rows = [(2048, 512, 2, 46.8), (4096, 64, 2, 46.2), (4096, 128, 2, 47.1), (4096, 128, 2, 46.3),
            (2048, 128, 1, 26.1), (4096, 256, 1, 25.8), (4096, 512, 2, 46.5)]
    recs = [TrialRecord(number=0, state="COMPLETE", values=[25.7], baseline=True)]
    recs += [_rec(i, v, num_ctx=c, num_batch=b, num_thread=t) for i, (c, b, t, v) in enumerate(rows, start=1)]
    space = {"num_ctx": [2048, 4096], "num_batch": [64, 128, 256, 512], "num_thread": [1, 2], "num_gpu": [0]}
    e = effects.compute(_study(recs, space=space))
    assert e.top == "num_thread" and e.n_trials == 7
    thread = _param(e, "num_thread")
    assert thread.effect_low is not None and thread.effect_high is not None
    assert 1.6 < thread.effect_low < thread.effect_high < 2.0
    assert not _param(e, "num_batch").clear


def test_no_searched_setting() -> None:
    e = effects.compute(_study([TrialRecord(number=0, state="COMPLETE", values=[25.7], baseline=True)]))
    assert e.params == [] and e.top is None and e.n_trials == 0
    assert e.verdict == "Not distinguishable: no measured trial with searched parameters."


def test_the_threshold_is_documented_with_its_reason() -> None:
    import inspect

    source = inspect.getsource(effects)
    comment = source[:source.index("MIN_TRIALS_FOR_IMPORTANCES = ")].rsplit("\n\n", 1)[-1]
    assert effects.MIN_TRIALS_FOR_IMPORTANCES == 50 and "PED-ANOVA" in comment and "top 10%" in comment


# ------------------------------------------------------------------------------ tune show


def test_show_prints_the_effects_block(tmp_path: Any) -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    study = optuna.create_study(study_name="fx", storage=url, direction="maximize")
    study.set_user_attr("space", SPACE)
    study.set_user_attr("objectives", ["decode_tps"])
    dists = {k: CategoricalDistribution(v) for k, v in SPACE.items() if len(v) > 1}
    for r in _grid(2.0, 1.0, 0.01, repeats=2):
        params = {k: r.params[k] for k in dists}
        study.add_trial(create_trial(value=r.values[0] if r.values else None, params=params, distributions=dists,
                                     user_attrs=stored_attrs(TrialRecord(model="m", options=params))))
    res = invoke("show", "fx", "--storage", url)
    assert res.exit_code == 0, res.output
    block = res.output[res.output.index("Parameter effects on decode tok/s"):].splitlines()
    assert block[0] == ("Parameter effects on decode tok/s (geometric mean [95% CI] (trials) per value, "
                        "8 measured trials):")
    assert block[1].startswith("  num_thread  1: ") and " (4)  2: " in block[1] and block[1].endswith("x)")
    assert block[2].startswith("  num_batch   128: ")
    assert block[3].startswith("  num_thread moved decode tok/s most: 2 vs 1 gives 2.0")
