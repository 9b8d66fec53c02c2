"""Parameter effects a user can believe: the objective per value of each searched setting,
with 95% intervals, and which setting moved it most.

Pure: computed from a :class:`~tuner.results.StoredStudy`'s records, nothing read again.

Method (one place, so the report and ``tune show`` say the same):

- Trials: measured ones (complete, not a failed load; infeasible ones count, they measured the
  objective too) with a finite first objective. The baseline has no searched values and is left
  out. Contended trials are left out when uncontended ones exist, and the result says so.
- Per value of a setting: n, and the mean on the log scale (the geometric mean) with a Student t
  interval on the log scale, back-transformed: rates and latencies are positive, and so is every
  bound. A value measured once has no interval. (Where the objective has values <= 0 the
  arithmetic mean and a plain t interval are used instead.)
- Effect of a setting: the ratio of its highest to its lowest value mean (geometric means, values
  measured at least twice: one trial carries no claim), with a Welch t interval on the log
  difference. The effect is *clear* when those two values' 95% intervals do not overlap.
- Verdict: the clear setting with the largest effect, when its effect interval does not overlap
  the next clear one's; otherwise "not distinguishable".

These are marginal means: other settings vary across the trials of one value too, so with few
trials a value's mean can carry another setting's effect (its interval is then wide).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from tuner import objectives
from tuner.record import TrialRecord
from tuner.results import StoredStudy, searched_values
from tuner.stats import overlaps, t_ci95, welch_ci95

#: Below this many measured trials with searched settings, importances are not shown as a
#: ranking. PED-ANOVA (the report's evaluator) contrasts the top 10% of trials with all of
#: them, and Optuna's documentation asks for at least 5 trials in that top set: 50 trials.
#: Below it the ranking reflects which values one or two lucky trials happened to have (an
#: 8-trial demo ranked num_batch 0.93 and num_thread 0.03 when num_thread decided nearly all).
MIN_TRIALS_FOR_IMPORTANCES = 50
#: Said wherever the effects are shown.
MARGINAL = ("Marginal means: the other settings vary across each value's trials too, so with few trials "
            "one setting's effect can show up in another's (with a wide interval).")
#: A value needs this many trials to carry an interval, and so to count for an effect.
MIN_PER_VALUE = 2


@dataclass(frozen=True)
class ValueEffect:
    """The objective over the trials that ran one value of one setting."""

    value: Any
    n: int
    #: Geometric mean (arithmetic on the linear scale), and its 95% interval (None when n < 2).
    mean: float
    ci_low: float | None
    ci_high: float | None
    #: Trial numbers used.
    trials: tuple[int, ...] = ()


@dataclass(frozen=True)
class ParamEffect:
    """One searched setting: its values' means, and how far apart the extremes are."""

    name: str
    values: list[ValueEffect]
    #: The values with the highest and lowest mean among those measured at least twice.
    high: Any = None
    low: Any = None
    #: high / low (log scale) or high - low (linear scale), with its 95% interval.
    effect: float | None = None
    effect_low: float | None = None
    effect_high: float | None = None
    #: The high and low values' 95% intervals do not overlap.
    clear: bool = False

    def effect_text(self, log_scale: bool) -> str:
        """``1.80x (95% CI 1.71-1.90x)``, or why there is no effect."""
        if self.effect is None:
            return f"no effect: fewer than two values measured at least {MIN_PER_VALUE} times"
        if log_scale:
            return f"{self.effect:.2f}x (95% CI {self.effect_low:.2f}-{self.effect_high:.2f}x)"
        return f"{self.effect:+.2f} (95% CI {self.effect_low:+.2f} .. {self.effect_high:+.2f})"


@dataclass(frozen=True)
class Effects:
    """The parameter effects of a study's first objective, and the verdict."""

    objective: str
    maximize: bool
    #: Means and intervals on the log scale (every value positive), else linear.
    log_scale: bool
    #: Trials used, and contended trials left out.
    n_trials: int
    excluded_contended: int
    params: list[ParamEffect]
    #: The setting that moved the objective most, or None when that is not distinguishable.
    top: str | None
    verdict: str
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return objectives.label(self.objective)

    def value_text(self, v: ValueEffect) -> str:
        """``2: 46.58 [46.10 .. 47.07] (5)``"""
        ci = f" [{v.ci_low:.2f} .. {v.ci_high:.2f}]" if v.ci_low is not None and v.ci_high is not None else ""
        return f"{v.value}: {v.mean:.2f}{ci} ({v.n})"

    def lines(self) -> list[str]:
        """The terminal block: one line per setting, then the verdict."""
        mean = "geometric mean" if self.log_scale else "mean"
        out = [f"Parameter effects on {self.label} ({mean} [95% CI] (trials) per value, "
               f"{self.n_trials} measured trials):"]
        width = max((len(p.name) for p in self.params), default=0)
        for p in self.params:
            values = "  ".join(self.value_text(v) for v in p.values)
            out.append(f"  {p.name:<{width}}  {values}  -> {p.effect_text(self.log_scale)}")
        out.append(f"  {self.verdict}")
        out.extend(f"  {n}" for n in self.notes)
        return out


# ------------------------------------------------------------------------------ compute


def _trials(s: StoredStudy) -> tuple[list[TrialRecord], int, list[str]]:
    """The trials the effects use, how many contended ones were left out, and notes."""
    used = [r for r in s.records if r.measured and r.values and math.isfinite(r.values[0]) and r.params]
    notes: list[str] = []
    contended = [r for r in used if r.contended]
    if contended and any(r.contended is False for r in used):
        used = [r for r in used if not r.contended]
        notes.append(f"Left out {len(contended)} contended trial(s) (other processes used the machine while "
                     f"they ran); the effects are from the {len(used)} other(s).")
        return used, len(contended), notes
    if contended:
        notes.append(f"Every measured trial with a known load was contended ({len(contended)}): the effects "
                     "include other processes' interference.")
    return used, 0, notes


def _param(name: str, values: list[Any], used: Sequence[TrialRecord], z: dict[int, float],
           log_scale: bool) -> ParamEffect:
    back = math.exp if log_scale else float
    rows: list[ValueEffect] = []
    groups: dict[int, list[float]] = {}
    for i, value in enumerate(values):
        trials = [r for r in used if name in r.params and r.params[name] == value]
        if not trials:
            continue
        zs = [z[r.number] for r in trials]
        ci = t_ci95(zs) if len(zs) >= MIN_PER_VALUE else None
        rows.append(ValueEffect(value, len(trials), back(statistics.fmean(zs)),
                                back(ci[1]) if ci else None, back(ci[2]) if ci else None,
                                tuple(r.number for r in trials)))
        if ci is not None:
            groups[len(rows) - 1] = zs
    if len(groups) < 2:
        return ParamEffect(name, rows)
    hi = max(groups, key=lambda i: statistics.fmean(groups[i]))
    lo = min(groups, key=lambda i: statistics.fmean(groups[i]))
    d, d_lo, d_hi = welch_ci95(groups[hi], groups[lo])
    effect = (back(d), back(d_lo), back(d_hi))
    clear = not overlaps((rows[hi].ci_low, rows[hi].ci_high), (rows[lo].ci_low, rows[lo].ci_high))
    return ParamEffect(name, rows, rows[hi].value, rows[lo].value, *effect, clear=clear)


def _verdict(params: Sequence[ParamEffect], label: str, maximize: bool, log_scale: bool) -> tuple[str | None, str]:
    if not params:
        return None, "Not distinguishable: no measured trial with searched parameters."
    sized = [p for p in params if p.effect is not None]
    if not sized:
        return None, (f"Not distinguishable: no searched parameter has two values measured at least "
                      f"{MIN_PER_VALUE} times each; more trials are needed.")
    clear = sorted((p for p in sized if p.clear), key=lambda p: -(p.effect or 0.0))
    if not clear:
        return None, (f"Not distinguishable: for every parameter the 95% intervals of its highest and lowest "
                      f"value overlap, so none is shown to move {label} at this number of trials.")
    top = clear[0]
    best, worst = (top.high, top.low) if maximize else (top.low, top.high)
    said = f"{best} vs {worst} gives {top.effect_text(log_scale)}"
    if len(clear) > 1 and overlaps((top.effect_low, top.effect_high), (clear[1].effect_low, clear[1].effect_high)):
        other = clear[1]
        return None, (f"Not distinguishable which parameter moved {label} most: {top.name} "
                      f"({top.effect_text(log_scale)}) and {other.name} ({other.effect_text(log_scale)}) "
                      "both did, and their effect intervals overlap.")
    rest = ("; the other parameters' values are not distinguishable" if len(clear) == 1 and len(params) > 1
            else "")
    return top.name, f"{top.name} moved {label} most: {said}{rest}."


def compute(s: StoredStudy) -> Effects:
    """The parameter effects of ``s``'s first objective (see the module docstring for the method)."""
    objective, maximize = s.info.objective, s.direction == "maximize"
    used, excluded, notes = _trials(s)
    space = searched_values(s.info.space or None, [r.params for r in used])
    used = [r for r in used if any(k in r.params for k in space)]
    raw = {r.number: float(r.values[0]) for r in used if r.values}
    log_scale = all(v > 0 for v in raw.values())
    z = {k: math.log(v) for k, v in raw.items()} if log_scale else raw
    params = [_param(k, v, used, z, log_scale) for k, v in space.items()]
    label = objectives.label(objective)
    top, verdict = _verdict(params, label, maximize, log_scale)
    return Effects(objective, maximize, log_scale, len(used), excluded, params, top, verdict, notes)
