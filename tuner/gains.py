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
from typing import Any, Mapping, Sequence

from tuner.stats import log_ci95, overlaps


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

    def pct(self) -> str:
        """e.g. ``+4.1% (95% CI +3.2 .. +5.0%)``."""
        lo, hi = ((x - 1.0) * 100 for x in self.ci95)
        return f"{(self.ratio - 1.0) * 100:+.1f}% (95% CI {lo:+.1f} .. {hi:+.1f}%)"


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

    def text(self) -> str:
        """e.g. ``num_batch 512->256: +4.1% (95% CI +3.2 .. +5.0%)`` (and alone, where measured)."""
        head = self.change.text()
        if self.error:
            return f"{head}: not measured, kept ({self.error})"
        if self.reverted is None:
            return f"{head}: not measured (fewer than 2 rounds), kept"
        text = f"{head}: {self.reverted.pct()}"
        if self.alone is not None:
            text += f"; alone on the defaults {self.alone.pct()}"
        return text + ("" if self.reverted.distinguishable else ", not distinguishable from no effect")

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
    #: The per-setting effects multiplied round by round (summed on the log scale), with an
    #: interval: what the settings give if each acts alone.
    combined: Ratio | None = None

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
        """The portable config is not distinguishably worse than the winner."""
        r = self.portable_vs_winner
        return r is None or r.ci95[1] >= 1.0

    def lines(self, label: str) -> list[str]:
        """What each setting is worth, in words, for every view."""
        out = [f"what each setting is worth ({label}, reverted alone from #{self.winner}, "
               f"{self.rounds} interleaved rounds):"]
        out += [f"  {e.text()}" for e in self.effects]
        p, t = self.product, self.total
        if p is not None and t is not None:
            verdict = ("they add up" if self.adds_up else
                       "they do not add up: the settings interact, so each one's effect depends on the others")
            both = self.combined
            together = f"{p:.2f}x" + (f" (95% CI {both.ci95[0]:.2f}-{both.ci95[1]:.2f}x)" if both else "")
            out.append(f"  together {together}; the winner measured {t.ratio:.2f}x the defaults "
                       f"(95% CI {t.ci95[0]:.2f}-{t.ci95[1]:.2f}x): {verdict}")
        if self.portable_vs_winner is not None:
            kept = ", ".join(self.portable) or "none (the defaults)"
            out.append(f"  portable export (only {kept}): {self.portable_vs_winner.pct()} vs the full winner"
                       + ("" if self.portable_holds else ": distinguishably worse, so exports keep every setting"))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("objective", "winner", "baseline", "rounds", "portable", "contended",
                                            "dropped")}
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
                       int(d.get("contended") or 0), int(d.get("dropped") or 0), Ratio.from_dict(d.get("combined")))
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

    def lines(self) -> list[str]:
        """The trade in words: what is given up, what it buys, and how to keep the default."""
        out = [f"num_ctx {self.value} is below the {self.default} tokens of context the server gives this model "
               f"by default: prompts and replies longer than {self.value} tokens are cut"]
        r = self.effect.reverted if self.effect is not None else None
        if r is not None:
            out.append(f"lowering it measured {r.pct()}: keeping {self.default} costs that much"
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
    effect = ablation.effect("num_ctx") if ablation is not None and ablation.winner == record.number else None
    return ContextChange(default, value, effect)
