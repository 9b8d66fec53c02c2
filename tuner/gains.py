"""What each of the winner's settings is worth: the one-factor ablation's stored record.

After the re-validation, ``tuner/ablate.py`` measures the winner, the defaults, the winner
with each changed setting reverted alone and (with few changes) the defaults with each
setting applied alone, interleaved in the same rounds. This module is the read side: the
record stored on the study (``record.ABLATION``), its wording, and which settings a portable
export keeps. Every ratio is oriented so that above 1 is better for the objective.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from tuner.stats import log_ci95, overlaps

if TYPE_CHECKING:
    from tuner.record import TrialRecord


@dataclass(frozen=True)
class Change:
    """One setting the winner sets away from what the defaults ran."""

    setting: str
    #: What the defaults ran (None: not known, the server decided).
    default: Any
    value: Any
    #: "variant" (the model), "option" (per request / per load) or "server" (server start).
    kind: str = "option"

    def text(self) -> str:
        """e.g. ``num_batch 512->256`` (``auto`` where the default is not known)."""
        return f"{self.setting} {_show(self.default)}->{_show(self.value)}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _show(v: Any) -> str:
    if v is None:
        return "auto"
    if isinstance(v, str) and "/" in v:  # a model path: its file name
        return v.rsplit("/", 1)[-1]
    return str(v).lower() if isinstance(v, bool) else str(v)


def with_change(base: TrialRecord, c: Change, value: Any, number: int | None = None) -> TrialRecord:
    """``base`` with ``c``'s setting at ``value`` (None: not sent, the server decides); not the
    baseline any more (it sends what it holds)."""
    options, server, model = dict(base.options), dict(base.effective_server), base.model
    if c.kind == "variant":
        model = str(value)
    else:
        target = server if c.kind == "server" else options
        if value is None:
            target.pop(c.setting, None)
        else:
            target[c.setting] = value
    return dataclasses.replace(base, model=model, options=options, server=server, server_effective=None,
                               number=base.number if number is None else number, baseline=False)


def revert_value(c: Change, defaults: TrialRecord | None) -> Any:
    """What a reverted setting sends: what the defaults sent, else nothing (the server decides)."""
    if c.kind == "variant":
        return c.default
    if defaults is None:
        return None
    sent = defaults.effective_server if c.kind == "server" else defaults.options
    return sent.get(c.setting)


def portable_record(winner: TrialRecord, defaults: TrialRecord | None, changes: Sequence[Change],
                    kept: Iterable[str], fixed: Iterable[str] = (), number: int | None = None
                    ) -> tuple[TrialRecord, list[tuple[str, Any, str]]]:
    """The winner with every change not ``kept`` reverted, and what it sent that the defaults
    ran anyway (not a change) left to the server unless the study ``fixed`` it or the defaults
    sent it (``--context``): the config a portable export writes, and the one the ablation
    measures. Returns it and what was left out as (setting, value, why)."""
    keep, fixed_ = set(kept), set(fixed)
    rec, left = winner, []
    for c in changes:
        if c.setting not in keep:
            rec = with_change(rec, c, revert_value(c, defaults), number)
            left.append((c.setting, c.value, "reverted"))
    changed = {c.setting for c in changes}
    sent_by_defaults = {**(defaults.options if defaults else {}), **(defaults.effective_server if defaults else {})}
    for kind, values in (("option", rec.options), ("server", rec.effective_server)):
        for k, v in values.items():
            if k in changed or k in fixed_ or k in keep or sent_by_defaults.get(k) == v:
                continue
            rec = with_change(rec, Change(k, None, v, kind), None, number)
            left.append((k, v, "default"))
    return (rec if number is None else dataclasses.replace(rec, number=number)), left


@dataclass(frozen=True)
class Ratio:
    """A paired ratio over interleaved rounds: geometric mean and 95% interval (t on logs)."""

    ratio: float
    ci95: tuple[float, float]
    #: The per-round ratios it came from.
    ratios: tuple[float, ...] = ()

    @classmethod
    def of(cls, ratios: Sequence[float]) -> Ratio | None:
        """None under 2 ratios (no interval)."""
        ok = [r for r in ratios if r > 0 and math.isfinite(r)]
        if len(ok) < 2:
            return None
        g, lo, hi = log_ci95(ok)
        return cls(g, (lo, hi), tuple(round(x, 4) for x in ok))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Ratio | None:
        if not d:
            return None
        return cls(float(d["ratio"]), (float(d["ci95"][0]), float(d["ci95"][1])),
                   tuple(float(x) for x in d.get("ratios") or ()))

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "ci95": list(self.ci95), "ratios": list(self.ratios)}

    @property
    def distinguishable(self) -> bool:
        """The interval leaves out 1: a real difference."""
        return not self.ci95[0] <= 1.0 <= self.ci95[1]

    @property
    def gain(self) -> bool:
        """Distinguishably better (the whole interval above 1)."""
        return self.ci95[0] > 1.0

    def pct(self, lower_is_better: bool = False) -> str:
        """e.g. ``+4.1% (95% CI +3.2 .. +5.0%)``: the change in the objective itself. The ratio
        is oriented so that above 1 is better; for an objective where lower is better (TTFT)
        it is turned back into the objective's change (-3.9%: lower)."""
        r, (lo, hi) = (1.0 / self.ratio, (1.0 / self.ci95[1], 1.0 / self.ci95[0])) if lower_is_better else (
            self.ratio, self.ci95)
        return f"{(r - 1.0) * 100:+.1f}% (95% CI {(lo - 1.0) * 100:+.1f} .. {(hi - 1.0) * 100:+.1f}%)"

    def times(self, lower_is_better: bool = False) -> str:
        """e.g. ``1.56x (95% CI 1.55-1.57x)``: the objective's own ratio."""
        r, (lo, hi) = (1.0 / self.ratio, (1.0 / self.ci95[1], 1.0 / self.ci95[0])) if lower_is_better else (
            self.ratio, self.ci95)
        return f"{r:.2f}x (95% CI {lo:.2f}-{hi:.2f}x)"


@dataclass
class SettingEffect:
    """One changed setting: the winner over the winner with it reverted (what the setting adds
    to the winner), and the defaults with it alone over the defaults, where measured."""

    change: Change
    reverted: Ratio | None = None
    alone: Ratio | None = None
    #: Why a config could not be measured (it failed to load or run).
    error: str | None = None

    @property
    def kept(self) -> bool:
        """Exported by default: reverting it alone makes the winner distinguishably worse, or
        could not be measured (a config without it that fails to load needs it; an effect not
        measured is not shown to be none)."""
        return self.reverted is None or self.reverted.gain

    def text(self, lower_is_better: bool = False) -> str:
        """e.g. ``num_batch 512->256: +4.1% (95% CI +3.2 .. +5.0%)`` (and alone, where measured)."""
        head = self.change.text()
        if self.reverted is None:
            return f"{head}: not measured, kept ({self.error or 'fewer than 2 rounds'})"
        text = f"{head}: {self.reverted.pct(lower_is_better)}"
        if self.alone is not None:
            text += f"; alone on the defaults {self.alone.pct(lower_is_better)}"
        return text + ("" if self.reverted.distinguishable else ", not distinguishable from no effect")

    def short(self, lower_is_better: bool = False) -> str:
        """The change and its effect in the winner only, e.g. ``num_batch 512->64: -0.6% (95% CI
        -3.7 .. +2.5%), no distinguishable effect``."""
        if self.reverted is None:
            return self.text(lower_is_better)
        return (f"{self.change.text()}: {self.reverted.pct(lower_is_better)}"
                + ("" if self.reverted.distinguishable else ", no distinguishable effect"))

    def to_dict(self) -> dict[str, Any]:
        return {"change": self.change.to_dict(), "reverted": self.reverted.to_dict() if self.reverted else None,
                "alone": self.alone.to_dict() if self.alone else None, "error": self.error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SettingEffect:
        c = d.get("change") or {}
        return cls(Change(str(c.get("setting")), c.get("default"), c.get("value"), str(c.get("kind") or "option")),
                   Ratio.from_dict(d.get("reverted")), Ratio.from_dict(d.get("alone")), d.get("error"))


@dataclass
class Ablation:
    """The one-factor ablation of the winner against the defaults (``record.ABLATION``)."""

    objective: str
    winner: int
    baseline: int
    rounds: int
    effects: list[SettingEffect] = field(default_factory=list)
    #: Winner over defaults in the same rounds.
    total: Ratio | None = None
    #: The settings a portable export keeps, and that config measured against the winner
    #: and the defaults (None where it is the winner or the defaults themselves).
    portable: list[str] = field(default_factory=list)
    portable_vs_winner: Ratio | None = None
    portable_vs_defaults: Ratio | None = None
    contended: int = 0
    dropped: int = 0
    #: The objective is maximised (a rate); False where lower is better (TTFT, latency).
    maximize: bool = True
    #: The per-setting effects multiplied round by round (summed on the log scale), with an
    #: interval: what the settings give if each acts alone.
    combined: Ratio | None = None
    #: Why the portable config could not be measured (it failed to load, or its drafting changed
    #: the greedy output): exports then keep every setting.
    portable_error: str | None = None

    def effect(self, setting: str) -> SettingEffect | None:
        return next((e for e in self.effects if e.change.setting == setting), None)

    @property
    def product(self) -> float | None:
        """The per-setting effects multiplied (summed on the log scale)."""
        if not self.effects or any(e.reverted is None for e in self.effects):
            return None
        return math.exp(sum(math.log(e.reverted.ratio) for e in self.effects if e.reverted))

    @property
    def adds_up(self) -> bool | None:
        """Whether the effects multiplied agree with the winner's measured gain (their 95%
        intervals overlap; without a combined interval, the product lies in the gain's): the
        settings act one by one. None when either is missing."""
        p = self.product
        if p is None or self.total is None:
            return None
        if self.combined is not None:
            return overlaps(self.combined.ci95, self.total.ci95)
        return self.total.ci95[0] <= p <= self.total.ci95[1]

    @property
    def portable_holds(self) -> bool:
        """The portable config ran and is not distinguishably worse than the winner."""
        r = self.portable_vs_winner
        return self.portable_error is None and (r is None or r.ci95[1] >= 1.0)

    def lines(self, label: str) -> list[str]:
        """What each setting is worth, in words, for every view."""
        low = not self.maximize
        out = [f"what each setting is worth ({label}{', lower is better' if low else ''}, reverted alone from "
               f"#{self.winner}, {self.rounds} interleaved rounds):"]
        out += [f"  {e.text(low)}" for e in self.effects]
        p, t = self.product, self.total
        if p is not None and t is not None:
            verdict = ("they add up" if self.adds_up else
                       "they do not add up: the settings interact, so each one's effect depends on the others")
            both = self.combined or Ratio(p, (p, p))
            together = both.times(low) if self.combined else f"{(1.0 / p if low else p):.2f}x"
            out.append(f"  together {together}; the winner measured {t.times(low)} the defaults: {verdict}")
        if self.portable_error is not None:
            out.append(f"  portable export (changes kept: {', '.join(self.portable) or 'none'}): not measured "
                       f"({self.portable_error}), so exports keep every setting")
        elif self.portable_vs_winner is not None:
            kept = ", ".join(self.portable) or "none"
            out.append(f"  portable export (changes kept: {kept}): {self.portable_vs_winner.pct(low)} vs the full winner"
                       + ("" if self.portable_holds else ": distinguishably worse, so exports keep every setting"))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("objective", "winner", "baseline", "rounds", "portable", "contended",
                                            "dropped", "maximize", "portable_error")}
        d["effects"] = [e.to_dict() for e in self.effects]
        for k in ("total", "portable_vs_winner", "portable_vs_defaults", "combined"):
            r = getattr(self, k)
            d[k] = r.to_dict() if r else None
        d["product"], d["adds_up"] = self.product, self.adds_up
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Ablation | None:
        """Read back what ``to_dict`` stored; None for nothing or another version's shape."""
        if not d or "winner" not in d:
            return None
        try:
            return cls(str(d.get("objective") or ""), int(d["winner"]), int(d["baseline"]), int(d.get("rounds") or 0),
                       [SettingEffect.from_dict(e) for e in d.get("effects") or []],
                       Ratio.from_dict(d.get("total")), [str(x) for x in d.get("portable") or []],
                       Ratio.from_dict(d.get("portable_vs_winner")), Ratio.from_dict(d.get("portable_vs_defaults")),
                       int(d.get("contended") or 0), int(d.get("dropped") or 0), bool(d.get("maximize", True)),
                       Ratio.from_dict(d.get("combined")),
                       str(d["portable_error"]) if d.get("portable_error") else None)
        except (KeyError, TypeError, ValueError, IndexError):
            return None


def portable_settings(ablation: Ablation) -> list[str]:
    """The settings a portable export keeps (:attr:`SettingEffect.kept`)."""
    return [e.change.setting for e in ablation.effects if e.kept]


@dataclass(frozen=True)
class ContextChange:
    """A recommended num_ctx below the context the server gives this model by default."""

    default: int
    value: int
    #: num_ctx's measured effect in the winner (None: not measured).
    effect: SettingEffect | None = None
    lower_is_better: bool = False

    def lines(self) -> list[str]:
        """The trade in words: what is given up, what it buys, and how to keep the default."""
        out = [f"num_ctx {self.value} is below the {self.default} tokens of context the server gives this model "
               f"by default: prompts and replies longer than {self.value} tokens are cut"]
        r = self.effect.reverted if self.effect is not None else None
        if r is not None:
            out.append(f"lowering it measured {r.pct(self.lower_is_better)}: keeping {self.default} costs that much"
                       + ("" if r.distinguishable else ", which is not distinguishable from nothing"))
        else:
            out.append("what lowering it gains was not measured on its own")
        out.append(f"to keep {self.default}, run a new study with `--context {self.default}`")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default, "value": self.value,
                "effect": self.effect.to_dict() if self.effect is not None else None, "text": " ".join(self.lines())}


def context_change(record: Any, defaults: Any, ablation: Ablation | None) -> ContextChange | None:
    """The context ``record`` (a TrialRecord) gives up against ``defaults`` (the baseline's
    record); None when it gives up none or either is unknown. Each context is the one the
    engine reported it ran (/api/ps ``context_length``), else the one sent (``--context``,
    num_ctx)."""
    if record is None or defaults is None or record.baseline or record.number == defaults.number:
        return None
    value = record.ran.get("num_ctx", record.options.get("num_ctx"))
    default = defaults.ran.get("num_ctx", defaults.options.get("num_ctx"))
    if not isinstance(value, int) or not isinstance(default, int) or isinstance(value, bool) or not 0 < value < default:
        return None
    ours = ablation is not None and ablation.winner == record.number
    effect = ablation.effect("num_ctx") if ablation is not None and ours else None
    return ContextChange(default, value, effect, ablation is not None and ours and not ablation.maximize)
