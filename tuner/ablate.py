"""The one-factor ablation: what each of the winner's settings is worth, measured.

After the re-validation, the winner W and the defaults D are measured interleaved with, for
each setting W changes, W with that setting reverted alone (W - s) and, when W changes at
most :data:`ALONE_MAX` settings, D with that setting applied alone (D + s). A setting's effect
is the paired per-round ratio W / (W - s): what it adds to the winner. The settings whose
effect is distinguishable from none make the portable config; when that config is none of
those already measured, it is measured against W in a few more rounds, so what the default
export recommends was itself measured. The record is :class:`tuner.gains.Ablation`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from tuner import objectives, results
from tuner.engines.base import Engine
from tuner.gains import Ablation, Ratio, SettingEffect, portable_record, portable_settings, revert_value, with_change
from tuner.measure import config_key
from tuner.record import TrialRecord, fixed_settings, user_fixed
from tuner.validate import Interleaved, interleaved_rounds
from tuner.workload import Workload

#: With more changed settings than this, only the reverted configs are measured (the applied-
#: alone ones would double each round).
ALONE_MAX = 3


def _key(t: TrialRecord) -> tuple[Any, ...]:
    # Sending no options is sending none, baseline or not.
    return config_key(t.model, t.options or None, t.effective_server)


def _combined(rows: Sequence[dict[tuple[Any, ...], float]], w: tuple[Any, ...], reverted: Sequence[tuple[Any, ...]],
              maximize: bool) -> Ratio | None:
    """The per-setting effects multiplied within each round that measured them all."""
    per_round = []
    for r in rows:
        if w in r and all(k in r for k in reverted):
            logs = sum(math.log(r[w] / r[k]) for k in reverted)
            per_round.append(math.exp(logs if maximize else -logs))
    return Ratio.of(per_round)


def ablate(study: Any, engine: Engine, workload: Workload, base_model: str, objective: str, rounds: int,
           echo: Callable[[str], None], sampler_factory: Callable[[], Any] | None = None,
           check: Callable[[TrialRecord], str | None] | None = None) -> Ablation | None:
    """Measure what each of the re-validated winner's settings is worth; None when there is no
    re-validated winner other than the defaults, or nothing changed. ``check`` refuses a config
    before it is measured (why, or None): the output-identity check of a drafting study, so a
    setting whose removal changes the greedy output counts as needed, never as worthless."""
    st = results.read_study(study)
    val, defaults = st.validation, st.baseline()
    if val is None or val.winner is None or defaults is None or val.winner == defaults.number or rounds < 2:
        return None
    winner = next((r for r in st.records if r.number == val.winner), None)
    if winner is None:
        return None
    fixed = fixed_settings(st.attrs.get("space"))
    found = results.changes(winner, defaults, base_model, fixed)
    if not found:
        return None
    maximize = objectives.get(objective).direction == "maximize"
    configs: dict[tuple[Any, ...], TrialRecord] = {_key(winner): winner}
    configs.setdefault(_key(defaults), defaults)
    reverted: dict[str, tuple[Any, ...]] = {}
    alone: dict[str, tuple[Any, ...]] = {}
    for i, c in enumerate(found):
        # A config equal to one already planned is measured once and read for both.
        r = with_change(winner, c, revert_value(c, defaults), -1 - i)
        reverted[c.setting] = _key(r)
        configs.setdefault(_key(r), r)
        if len(found) <= ALONE_MAX:
            a = with_change(defaults, c, c.value, -101 - i)
            alone[c.setting] = _key(a)
            configs.setdefault(_key(a), a)
    # The winner passed its check in the re-validation; the defaults are the reference.
    meter = Interleaved(engine, workload, base_model, sampler_factory, check,
                        exempt=[winner.number, defaults.number])
    measured = list(configs.values())

    def measure_round(todo: Sequence[TrialRecord]) -> Callable[[], dict[tuple[Any, ...], float] | None]:
        def one() -> dict[tuple[Any, ...], float] | None:
            recs = meter.round(todo)
            if recs is None:
                return None
            out = {}
            for t in todo:
                rec = recs.get(t.number)
                v = objectives.get(objective).value(rec) if rec is not None else None
                if v is not None and math.isfinite(v) and v > 0:
                    out[_key(t)] = v
            return out
        return one

    echo(f"measuring what each of #{winner.number}'s {len(found)} changed settings is worth: "
         f"{len(measured)} configs over {rounds} interleaved rounds ...")
    counted, contended, dropped = interleaved_rounds(measure_round(measured), rounds, rounds, echo, "ablation")
    errors = {_key(t): meter.errors[t.number] for t in measured if t.number in meter.errors}

    def ratio(better: tuple[Any, ...], worse: tuple[Any, ...], rows: Sequence[dict[tuple[Any, ...], float]]
              ) -> Ratio | None:
        pairs = [(r[better], r[worse]) for r in rows if better in r and worse in r]
        return Ratio.of([a / b if maximize else b / a for a, b in pairs])

    w, d = _key(winner), _key(defaults)
    effects = []
    for c in found:
        rk, ak = reverted[c.setting], alone.get(c.setting)
        effects.append(SettingEffect(c, ratio(w, rk, counted), ratio(ak, d, counted) if ak else None, errors.get(rk)))
    ab = Ablation(objective, winner.number, defaults.number, len(counted), effects, ratio(w, d, counted),
                  contended=contended, dropped=dropped, maximize=maximize,
                  combined=_combined(counted, w, list(reverted.values()), maximize))
    ab.portable = portable_settings(ab)
    # The config the default export writes, exactly (tuner/export.py select).
    portable, _ = portable_record(winner, defaults, found, ab.portable, user_fixed(st.info), number=-201)
    pk = _key(portable)
    if pk in configs:
        ab.portable_vs_winner = ratio(pk, w, counted) if pk != w else None
        ab.portable_vs_defaults = ratio(pk, d, counted) if pk != d else None
        failed = next((t.number for t in measured if _key(t) == pk and t.number in meter.errors), None)
    else:
        echo(f"measuring the portable config (only {', '.join(ab.portable) or 'what the study fixed'}) against "
             f"#{winner.number} over {rounds} interleaved rounds ...")
        more, c2, d2 = interleaved_rounds(measure_round([winner, defaults, portable]), rounds, rounds, echo,
                                          "portable check")
        ab.portable_vs_winner, ab.portable_vs_defaults = ratio(pk, w, more), ratio(pk, d, more)
        ab.contended, ab.dropped = ab.contended + c2, ab.dropped + d2
        failed = portable.number if portable.number in meter.errors else None
    if failed is not None:
        # A portable config that fails to load or changes the output is no export.
        ab.portable_error = meter.errors[failed]
    return ab
