"""Stored drift checks (``tune check``) and their wording: the read side of drift watch.

Every check is appended to the study attribute ``checks`` as :meth:`Check.to_dict`; the key
names are the fields of :class:`Check`, defined here only. Readers use :func:`checks_of`,
:func:`last_check` and :func:`drift_series`; :mod:`tuner.check` measures and stores them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from tuner import objectives, results
from tuner.record import StudyInfo, read_study_info
from tuner.stats import overlaps
from tuner.terminal import printable

#: The verdicts of a check and the exit code of each.
#: "inconclusive": no regression beyond the tolerance is shown, but the interval reaches beyond
#: it on the slow side, so none is ruled out either (more rounds narrow it).
EXIT_CODES = {"ok": 0, "faster": 0, "inconclusive": 0, "regression": 1, "unmeasured": 3}
#: The environment facts compared, as :func:`environment_summary` names them, and how they are shown.
ENV_LABELS = {"server_version": "", "gpus": "GPU", "driver": "driver", "model_digest": "model digest",
              "cpu": "CPU"}

Interval = tuple[float, float]


@dataclass
class Check:
    """One ``tune check``: the winner and the defaults measured now against the stored values.

    Rates are the objective's (its unit); ``*_now`` and ``*_stored`` are geometric means; the
    changes are in percent of the stored value with their 95% intervals ``[low, high]``.
    """

    #: When it ran (ISO 8601, UTC).
    at: str
    #: "ok", "inconclusive", "regression", "faster" or "unmeasured".
    verdict: str
    #: The exit code of ``tune check``: 0 ok or faster, 1 regression, 3 unmeasured.
    exit_code: int
    objective: str
    winner_trial: int | None = None
    winner_now: float | None = None
    winner_now_ci95: Interval | None = None
    winner_stored: float | None = None
    change_pct: float | None = None
    change_ci95: Interval | None = None
    #: The baseline trial (the engine's defaults); None when the study has none or it won.
    defaults_trial: int | None = None
    defaults_now: float | None = None
    defaults_stored: float | None = None
    defaults_change_pct: float | None = None
    defaults_change_ci95: Interval | None = None
    #: The environment now (:func:`environment_summary`) and what changed since the study
    #: stored its own, as "what: old -> new".
    environment: dict[str, Any] = field(default_factory=dict)
    environment_changes: list[str] = field(default_factory=list)
    #: Interleaved rounds that counted, and those contended (measured again) and dropped.
    rounds: int = 0
    contended: int = 0
    dropped: int = 0
    tolerance_pct: float = 5.0
    #: What the stored side is: "rounds" (the re-validation's), "requests" (the search's
    #: per-request samples) or "trial" (one stored value).
    compared: str = ""
    #: When the stored values were measured (ISO 8601), for the over-time view.
    stored_at: str | None = None
    #: The values measured now (per round or per request, as ``compared``).
    winner_values: list[float] = field(default_factory=list)
    defaults_values: list[float] = field(default_factory=list)
    host: str | None = None
    #: Why it could not measure (verdict "unmeasured").
    error: str | None = None
    #: The command that re-tunes the model in a new study (what a regression advises); "" in
    #: checks stored before it was kept.
    retune: str = ""
    #: The one-line verdict as printed.
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The stored form (one entry of the study attribute ``checks``): JSON values only."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Check:
        """Read back what :meth:`to_dict` stored, from any version (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("winner_now_ci95", "change_ci95", "defaults_change_ci95"):
            if kw.get(k) is not None:
                lo, hi = kw[k]
                kw[k] = (float(lo), float(hi))
        return cls(**kw)

    @property
    def when(self) -> dt.datetime | None:
        try:
            return dt.datetime.fromisoformat(self.at)
        except (TypeError, ValueError):
            return None


def checks_of(study: Mapping[str, Any] | StudyInfo) -> list[Check]:
    """The checks stored with a study (its record or user attributes), oldest first; unreadable
    ones skipped."""
    out = []
    for d in read_study_info(study).checks:
        try:
            out.append(Check.from_dict(d))
        except (TypeError, ValueError, KeyError, AttributeError):
            continue
    return out


def last_check(study: Mapping[str, Any] | StudyInfo) -> Check | None:
    """The latest check stored with a study (its record or user attributes), or None if it has none."""
    for d in reversed(read_study_info(study).checks):
        try:
            return Check.from_dict(d)
        except (TypeError, ValueError, KeyError, AttributeError):
            continue
    return None


# ---------------------------------------------------------------------------- environment


def environment_summary(env: Mapping[str, Any], server_version: str | None = None) -> dict[str, Any]:
    """What a check compares of a stored ``environment`` attribute (see :func:`tuner.machine.environment`):
    server version, GPU names, driver, model digest and CPU; None where it was not recorded."""
    gpus = env.get("gpus")
    gpu_list = [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else None
    host = env.get("host")
    host = host if isinstance(host, dict) else {}
    return {
        "server_version": env.get("server_version") or server_version or None,
        "gpus": sorted(str(g.get("name", "")) for g in gpu_list) if gpu_list is not None else None,
        "driver": next((str(g["driver_version"]) for g in gpu_list or [] if g.get("driver_version")), None),
        "model_digest": env.get("model_digest") or None,
        "cpu": host.get("cpu_model") or None,
    }


#: A digest is shown by this many hex digits (as `ollama list` shows it), more where two differ later.
DIGEST_SHOWN = 12


def env_text(key: str, v: Any, other: Any = None) -> str:
    """One fact of :func:`environment_summary` as shown; a digest compared with ``other`` is
    cut only where the two already differ."""
    if key == "gpus":
        return ", ".join(v) if v else "none"
    if key == "model_digest":
        return str(v).split(":", 1)[-1][:digest_width(v, other)]
    return str(v)


def digest_width(a: Any, b: Any = None) -> int:
    """How many digits of digest ``a`` to show beside ``b``: DIGEST_SHOWN, more when the two
    first differ later, all of them when they differ only in length or in the algorithm."""
    x = str(a).split(":", 1)[-1]
    if b is None:
        return DIGEST_SHOWN
    y = str(b).split(":", 1)[-1]
    first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
    return len(x) if first is None else max(DIGEST_SHOWN, first + 1)


def environment_changes(old: dict[str, Any], new: dict[str, Any], engine: str = "ollama") -> list[str]:
    """What differs between two :func:`environment_summary`, as "what: old -> new"; a fact
    unknown on either side is not compared."""
    out = []
    for key, label in ENV_LABELS.items():
        a, b = old.get(key), new.get(key)
        if a is None or b is None or a == b:
            continue
        what = label or results.engine_name(engine)
        out.append(f"{what}: {env_text(key, a, b)} -> {env_text(key, b, a)}")
    return out


# ---------------------------------------------------------------------------- words


def rate_text(v: float | None) -> str:
    """A rate as a check shows it: whole from 100 up, "-" when not measured."""
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}"


def pct_text(p: float, signed: bool = True, unit: str = "%") -> str:
    """A percentage as a check prints it, whole from 10% up: "-17%", "+4.2%"; ``signed=False``
    for a size ("17%"), ``unit=""`` for the low end of a range ("15-19%")."""
    return f"{p:{'+' if signed else ''}.{0 if abs(p) >= 9.95 else 1}f}{unit}"


def change_text(pct: float | None, ci: Interval | None) -> str:
    """"-17%, 95% CI -19%..-15%"."""
    if pct is None:
        return "not measured"
    return f"{pct_text(pct)}, 95% CI {pct_text(ci[0])}..{pct_text(ci[1])}" if ci is not None else pct_text(pct)


def changes_text(changes: Sequence[str]) -> str:
    """Environment changes ("what: old -> new") in words: "Ollama 0.12.3 -> 0.13.0, driver 550 -> 560"."""
    return ", ".join(x.replace(": ", " ", 1) for x in changes)


def since_text(changes: Sequence[str]) -> str:
    """What a verdict says of the environment: " since Ollama 0.12.3 -> 0.13.0" or " (environment unchanged)"."""
    return " since " + changes_text(changes) if changes else " (environment unchanged)"


def advice(c: Check) -> str:
    """What the verdict ends with: for a regression, re-tune (with :attr:`Check.retune`) or why
    re-tuning will not help; otherwise what the interval shows. "" for an unmeasured check."""
    tol = f"{c.tolerance_pct:g}%"
    if c.verdict == "regression":
        d = c.defaults_change_ci95
        alike = (d is not None and c.change_ci95 is not None and d[1] < -c.tolerance_pct
                 and overlaps(d, c.change_ci95))
        if alike:
            return (": the defaults slowed alike, so the server or machine changed, not the fit of the tuned "
                    "settings; re-tuning is unlikely to win it back")
        return f": re-tune with `{c.retune}`" if c.retune else ": re-tune"
    if c.verdict == "faster":
        return f": faster than stored by more than {tol}"
    if c.verdict == "inconclusive":
        return (f": no regression beyond {tol} shown, none ruled out either (the 95% interval reaches past "
                f"{tol}; more --rounds narrows it)")
    if c.verdict == "unmeasured":
        return ""
    return f": no regression beyond {tol} (the 95% interval rules one out)"


def verdict_text(c: Check, engine: str = "ollama") -> str:
    """The one-line verdict, e.g. "REGRESSION: winner #4 412 tok/s now vs 498 stored (-17%, 95% CI
    -19%..-15%) since Ollama 0.12.3 -> 0.13.0; defaults moved -2%: re-tune with `tune ...`"."""
    if c.verdict == "unmeasured":
        return printable(f"UNMEASURED: {c.error or 'could not measure'}")
    unit = objectives.get(c.objective).unit
    text = (f"{c.verdict.upper()}: winner #{c.winner_trial} {rate_text(c.winner_now)} {unit} now vs "
            f"{rate_text(c.winner_stored)} stored ({change_text(c.change_pct, c.change_ci95)})"
            f"{since_text(c.environment_changes)}")
    if c.defaults_change_pct is not None:
        text += f"; defaults moved {pct_text(c.defaults_change_pct)}"
    return printable(text + advice(c))



def check_line(c: Check) -> str:
    """One line of ``tune show``'s checks: date, verdict, winner now vs stored, environment changes."""
    when = c.when
    date = when.strftime("%Y-%m-%d %H:%M") if when is not None else c.at
    if c.verdict == "unmeasured":
        return printable(f"  {date}  {c.verdict:<10}  {c.error or ''}")
    env = "; ".join(c.environment_changes) or "environment unchanged"
    return printable(f"  {date}  {c.verdict:<10}  winner #{c.winner_trial} {rate_text(c.winner_now)} now vs "
                     f"{rate_text(c.winner_stored)} stored ({change_text(c.change_pct, c.change_ci95)})  {env}")



# ---------------------------------------------------------------------------- over time


@dataclass(frozen=True)
class DriftPoint:
    """The winner's speed at one time: the stored measurement, or a check."""

    at: str
    #: "stored" or the check's verdict.
    kind: str
    winner: float
    winner_ci95: Interval | None
    defaults: float | None
    #: Environment changes since the stored measurement, and those new since the previous point.
    changes: list[str]
    new_changes: list[str]


@dataclass(frozen=True)
class DriftSeries:
    """The winner's speed over time (stored first, then each check of the same winner)."""

    objective: str
    label: str
    winner_trial: int
    points: list[DriftPoint]
    #: Checks that could not measure (not drawn).
    unmeasured: int = 0

    @property
    def marked(self) -> list[DriftPoint]:
        """The points whose environment differs from the previous point's."""
        return [p for p in self.points if p.new_changes]


def drift_series(study: Mapping[str, Any] | StudyInfo) -> DriftSeries | None:
    """The over-time view of a study's checks (its record or user attributes); None without a
    measured check."""
    info = read_study_info(study)
    all_checks = checks_of(info)
    measured = [c for c in all_checks if c.verdict != "unmeasured" and c.winner_now is not None]
    if not measured:
        return None
    trial = measured[-1].winner_trial
    mine = [c for c in measured if c.winner_trial == trial]
    first = mine[0]
    points: list[DriftPoint] = []
    if first.winner_stored is not None:
        points.append(DriftPoint(first.stored_at or first.at, "stored", first.winner_stored, None,
                                 first.defaults_stored, [], []))
    # Each check is compared with the point before it (the first with the stored environment),
    # so a change marks every time the environment moves: an upgrade, a rollback, the upgrade again.
    engine = info.engine_or_default
    before = environment_summary(info.environment, info.server_version)
    previous: list[str] = []
    for c in mine:
        if c.environment:
            new = environment_changes(before, c.environment, engine)
            before = {**before, **{k: v for k, v in c.environment.items() if v is not None}}
        else:  # stored without its environment: only its changes since the stored one are known
            new = [x for x in c.environment_changes if x not in previous]
        previous = c.environment_changes
        points.append(DriftPoint(c.at, c.verdict, float(c.winner_now or 0.0), c.winner_now_ci95, c.defaults_now,
                                 list(c.environment_changes), new))
    return DriftSeries(first.objective, objectives.label(first.objective), int(trial or 0), points,
                       unmeasured=sum(1 for c in all_checks if c.verdict == "unmeasured"))
