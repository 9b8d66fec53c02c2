"""Drift watch (``tune check``): the stored winner and the defaults re-measured now, compared
with what the study stored, and the verdict kept with the study.

Every check is appended to the study attribute ``checks`` as :meth:`Check.to_dict`; the key
names are the fields of :class:`Check`, defined here only. Readers use :func:`checks_of` and
:func:`last_check`. This module imports no engine at load time (``tune show`` and the report
read checks); :func:`run_check` loads what it measures with.

How "now vs stored" is compared (:func:`tuner.stats.log_ratio_ci95`): the ratio of the
geometric means of the values measured now and the values stored, with a 95% Welch interval
on the log scale,
``exp(d +- t(0.975, df) * sqrt(s1^2/n1 + s2^2/n2))`` where ``d`` is the difference of the
mean logs and ``df`` the Welch-Satterthwaite degrees of freedom. Rates are positive and their
noise multiplies, as in the re-validation (:mod:`tuner.validate`); Welch because the two sides
are independent samples of different sizes and spreads (a bootstrap of a 3-round side would
under-cover). Like is compared with like: when the stored re-validation re-measured the config,
its per-round values against the per-round values now (both the workload once per round);
otherwise the search's per-request samples against the per-request samples of every round now
(each prompt equally often on both sides). An objective without per-request values and no
re-validation has a single stored value: the interval then holds only the spread measured now.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tuner import objectives, results
from tuner.errors import CheckUnmeasurable, StorageError, StudyError, TunerError, WorkloadError
from tuner.record import TrialRecord
from tuner.stats import log_ci95, log_ratio_ci95, overlaps
from tuner.terminal import command, printable, tune_command

#: The study attribute that holds the checks, oldest first.
CHECKS = "checks"
#: At most this many checks are kept (the oldest go first): an hourly cron job for a month.
MAX_CHECKS = 720
#: The verdicts of a check and the exit code of each.
#: "inconclusive": no regression beyond the tolerance is shown, but the interval reaches beyond
#: it on the slow side, so none is ruled out either (more rounds narrow it).
EXIT_CODES = {"ok": 0, "faster": 0, "inconclusive": 0, "regression": 1, "unmeasured": 3}
#: The environment facts compared, as :func:`environment_summary` names them, and how they are shown.
ENV_LABELS = {"server_version": "", "gpus": "GPU", "driver": "driver", "model_digest": "model digest",
              "cpu": "CPU"}

Echo = Callable[[str], None]
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


def checks_of(attrs: dict[str, Any]) -> list[Check]:
    """The checks stored with a study (its user attributes), oldest first; unreadable ones skipped."""
    out = []
    for d in attrs.get(CHECKS) or []:
        try:
            out.append(Check.from_dict(d))
        except (TypeError, ValueError, KeyError, AttributeError):
            continue
    return out


def last_check(attrs: dict[str, Any]) -> Check | None:
    """The latest check stored with a study (its user attributes), or None if it has none."""
    stored = attrs.get(CHECKS)
    if not isinstance(stored, list):
        return None
    for d in reversed(stored):
        try:
            return Check.from_dict(d)
        except (TypeError, ValueError, KeyError, AttributeError):
            continue
    return None


# ---------------------------------------------------------------------------- environment


def environment_summary(env: dict[str, Any], server_version: str | None = None) -> dict[str, Any]:
    """What a check compares of a stored ``environment`` attribute (see ``tuner.study.environment``):
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


def _env_text(key: str, v: Any) -> str:
    if key == "gpus":
        return ", ".join(v) if v else "none"
    if key == "model_digest":
        return str(v).split(":", 1)[-1][:12]
    return str(v)


def environment_changes(old: dict[str, Any], new: dict[str, Any], engine: str = "ollama") -> list[str]:
    """What differs between two :func:`environment_summary`, as "what: old -> new"; a fact
    unknown on either side is not compared."""
    out = []
    for key, label in ENV_LABELS.items():
        a, b = old.get(key), new.get(key)
        if a is None or b is None or a == b:
            continue
        what = label or results.engine_name(engine)
        out.append(f"{what}: {_env_text(key, a)} -> {_env_text(key, b)}")
    return out


# ---------------------------------------------------------------------------- statistics


def _gmean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def _pct(ratio: float) -> float:
    return round((ratio - 1.0) * 100.0, 4)


def _positive(values: Any) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            out.append(float(v))
    return out


def stored_values(st: results.StoredStudy, r: TrialRecord, objective: str) -> tuple[list[float], str]:
    """The stored measurements of trial ``r`` and what they are (see the module docstring):
    the re-validation's per-round values when it re-measured ``r``, else the search's
    per-request samples, else its one value."""
    val = st.validation
    if val is not None and val.objective == objective:
        for e in [*val.entries, *([val.baseline] if val.baseline is not None else [])]:
            if e.number == r.number and not e.error and len(_positive(e.values)) >= 2:
                return _positive(e.values), "rounds"
    per_request = objectives.get(objective).per_request if objective in objectives.OBJECTIVES else None
    if per_request is not None:
        values = _positive(r.per_request_values(per_request))
        if values:
            return values, "requests"
    return _positive([r.value]), "trial"


def _now_values(recs: Sequence[TrialRecord], objective: str, compared: str) -> list[float]:
    """The values measured now that compare with the stored ones of kind ``compared``."""
    per_request = objectives.get(objective).per_request
    if compared == "requests" and per_request is not None:
        return _positive(v for rec in recs for v in rec.per_request_values(per_request))
    return _positive(objectives.get(objective).value(rec) for rec in recs)


# ---------------------------------------------------------------------------- running


@dataclass
class CheckOptions:
    """What ``tune check`` takes."""

    study: str | None = None
    storage: str | None = None
    #: The server to measure on [default: the study's].
    host: str | None = None
    rounds: int = 3
    #: A change smaller than this (percent) is no regression.
    tolerance_pct: float = 5.0
    #: The prompts file, for studies stored before the prompt text was kept.
    prompts_file: str | None = None
    timeout_s: float = 600.0
    ollama_bin: str | None = None
    models_dir: str | None = None
    #: Say what would be measured, and where; measure and store nothing.
    dry_run: bool = False


@dataclass
class CheckReport:
    """A check and what it was compared with: the study, the stored environment, the configs."""

    study: str
    storage: str
    check: Check
    stored_environment: dict[str, Any]
    engine: str
    winner_config: str
    defaults_config: str | None
    #: The command that starts a new study of the same model (for a regression).
    retune: str


def _validate(o: CheckOptions) -> None:
    if o.rounds < 2:
        raise TunerError(f"--rounds must be at least 2 (got {o.rounds}): one round gives no confidence interval")
    if not (math.isfinite(o.tolerance_pct) and 0 <= o.tolerance_pct < 100):
        raise TunerError(f"--tolerance must be a percentage from 0 to 100 (got {o.tolerance_pct:g}), e.g. 5")
    if not (math.isfinite(o.timeout_s) and o.timeout_s > 0):
        raise TunerError(f"--timeout must be a positive number of seconds (got {o.timeout_s:g}): e.g. --timeout 600")


def study_workload(attrs: dict[str, Any], prompts_file: str | None) -> Any:
    """The workload the study measured, rebuilt exactly (``Workload.from_dict``); ``prompts_file``
    supplies the text a study stored before prompts were kept, and must be the same prompts."""
    from tuner.workload import Workload, load_prompts

    stored = attrs.get("workload")
    if not isinstance(stored, dict):
        raise StudyError("the study stored no workload (prompts, repeats, num_predict): it cannot be re-measured")
    if prompts_file is None:
        return Workload.from_dict(stored)
    prompts = load_prompts(prompts_file)
    items = list(stored.get("prompts") or [])
    mine = Workload(prompts=prompts).to_dict()["prompts"]
    if len(items) != len(mine) or any(a.get("sha256") not in (None, b["sha256"]) for a, b in zip(items, mine)):
        raise WorkloadError(
            f"the prompts in {prompts_file} are not the ones the study measured (their number or text differs "
            f"from the {len(items)} it stored): pass the original prompts file, or leave --prompts out"
        )
    return Workload.from_dict({**stored, "prompts": [{**a, "text": b["text"]} for a, b in zip(items, mine)]})


def _retune(attrs: dict[str, Any], name: str, host: str | None, storage: str | None = None) -> str:
    """A command that tunes the same model on the same server, with the same limits, context and
    workload, in a new study in the same storage (the old one keeps its measurements, and the
    new one warm-starts from it)."""
    from tuner.engines.ollama import DEFAULT_HOST
    from tuner.options import TuneOptions
    from tuner.storage import storage_args

    words: list[Any] = ["tune", "--model", attrs.get("model", "MODEL")]
    engine = str(attrs.get("engine", "ollama"))
    if engine != "ollama":
        words += ["--engine", engine]
    elif host is None and attrs.get("managed_server"):
        words += ["--manage-server"]
    host = host or (None if attrs.get("managed_server") else attrs.get("host"))
    if engine == "ollama" and host and host != DEFAULT_HOST:
        words += ["--host", host]
    objective = list(attrs.get("objectives") or ["decode_tps"])
    if objective != ["decode_tps"]:
        words += ["--objectives", ",".join(objective)] if len(objective) > 1 else ["--objective", objective[0]]
    workload = attrs.get("workload") or {}
    source = workload.get("source")
    if source and source != "builtin":
        words += ["--prompts", source]
    defaults = TuneOptions(model=[])
    for flag, key, default in (("--repeats", "repeats", defaults.repeats),
                               ("--num-predict", "num_predict", defaults.num_predict),
                               ("--concurrency", "concurrency", defaults.concurrency)):
        if workload.get(key) not in (None, default):
            words += [flag, workload[key]]
    if attrs.get("context"):
        words += ["--context", attrs["context"]]
    for key, value in dict(attrs.get("limits") or {}).items():
        words += ["--" + key.replace("_", "-"), f"{value:g}" if isinstance(value, float) else value]
    words += storage_args(storage)
    new = f"{name}-{dt.date.today().isoformat()}"
    # A name that starts with '-' must travel joined to its option, or it reads as an option.
    words += ["--trials", 20, *((f"--study={new}",) if new.startswith("-") else ("--study", new))]
    return command(*words)


def _engine(o: CheckOptions, attrs: dict[str, Any], winner: TrialRecord, base_model: str) -> Any:
    from tuner.engines import get_engine

    name = str(attrs.get("engine", "ollama"))
    if name == "ollama":
        managed = bool(attrs.get("managed_server")) and o.host is None
        if o.host is not None and winner.effective_server:
            raise TunerError(
                f"the winner (#{winner.number}) runs server settings "
                f"({', '.join(f'{k}={v}' for k, v in winner.effective_server.items())}) that only a tuner-managed "
                "server applies: leave --host out to let tune check start one"
            )
        host = o.host or (None if managed else (attrs.get("host") or None))
        # `tune check` reads no OLLAMA_HOST: it measures the study's server unless --host says otherwise.
        return get_engine("ollama", host=host, timeout_s=o.timeout_s, manage_server=managed,
                          ollama_bin=o.ollama_bin, models_dir=o.models_dir, host_hint="--host")
    if name == "llama-cpp":
        return get_engine("llama-cpp", models=list(dict.fromkeys(m for m in (base_model, winner.model) if m)))
    raise TunerError(f"the study was measured with the {name} engine: tune check re-measures ollama and "
                     "llama-cpp studies only")


def _sampler_factory(engine: Any) -> Callable[[], Any] | None:
    """Telemetry for each measurement, so a contended one is measured again (as in the re-validation)."""
    from tuner.telemetry import TelemetrySampler, probe_gpus

    pids = engine.server_pids()
    # NVML sees this machine's GPUs only: they are the server's only if it runs here.
    gpus = engine.local and probe_gpus().available
    return lambda: TelemetrySampler(server_pids=pids, gpus=gpus, interference=engine.local)


def _append(study: Any, c: Check) -> None:
    from tuner.storage import write_failure

    try:
        kept = list(study.user_attrs.get(CHECKS) or [])
        study.set_user_attr(CHECKS, [*kept, c.to_dict()][-MAX_CHECKS:])
    except Exception as e:
        raise write_failure(e) or StorageError(f"cannot store the check with study '{study.study_name}': {e}") from None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_check(o: CheckOptions, echo: Echo = lambda s: None) -> CheckReport:
    """Re-measure the study's winner and the defaults now, compare, store and return the check.

    Raises StudyError/TunerError (exit 2) for bad input, and CheckUnmeasurable (exit 3, after
    storing an "unmeasured" check) when the server, the model or the winner cannot be measured.
    """
    from tuner.errors import LoadError, ModelNotFoundError, ServerError, ServerSetupError
    from tuner.storage import open_storage, shown_url, storage_args

    _validate(o)
    # Not created, checked to be a tuner storage, written: the check is stored with the study.
    study = results.load_study(open_storage(o.storage, create=False, writable=not o.dry_run), o.study)
    st = results.read_study(study)
    attrs = st.attrs
    objective = str(list(attrs.get("objectives") or ["decode_tps"])[0])
    winner = st.best()
    if winner is None:
        raise StudyError(f"study '{st.name}' has no feasible trial to check: run more trials first "
                         f"(`{tune_command('show', st.name, *storage_args(o.storage))}` says why)")
    defaults = st.baseline()
    if defaults is not None and defaults.number == winner.number:
        defaults = None
    workload = study_workload(attrs, o.prompts_file)
    base_model = str(attrs.get("model") or winner.model)
    engine_name = str(attrs.get("engine", "ollama"))
    stored_env = environment_summary(dict(attrs.get("environment") or {}), attrs.get("server_version"))
    host_shown = o.host or (None if attrs.get("managed_server") else attrs.get("host"))
    retune = _retune(attrs, st.name, o.host, o.storage)
    w_stored, compared = stored_values(st, winner, objective)
    d_stored, d_compared = stored_values(st, defaults, objective) if defaults is not None else ([], "")
    stored_at = max((r.datetime_complete for r in st.records if r.datetime_complete), default=None) \
        if compared == "rounds" else winner.datetime_complete
    c = Check(at=_now(), verdict="unmeasured", exit_code=EXIT_CODES["unmeasured"], objective=objective,
              winner_trial=winner.number, winner_stored=round(_gmean(w_stored), 4) if w_stored else None,
              defaults_trial=defaults.number if defaults is not None else None,
              defaults_stored=round(_gmean(d_stored), 4) if d_stored else None,
              tolerance_pct=o.tolerance_pct, compared=compared, host=host_shown, retune=retune,
              # Optuna keeps local times without a zone; checks are in UTC.
              stored_at=stored_at.astimezone(dt.timezone.utc).isoformat(timespec="seconds")
              if stored_at is not None else None)
    report = CheckReport(st.name, shown_url(o.storage), c, stored_env, engine_name, winner.config_text(),
                         defaults.config_text() if defaults is not None else None, retune)
    if o.dry_run:
        c.verdict, c.exit_code = "dry-run", 0
        where = host_shown or ("a managed `ollama serve`" if attrs.get("managed_server") else "this machine")
        c.text = printable(
            f"DRY RUN: would re-measure the winner (#{winner.number}: {winner.config_text()})"
            + (f" and the defaults (#{defaults.number})" if defaults is not None else "")
            + f" interleaved over {o.rounds} rounds on {where}, each round {len(workload.prompts)} prompt(s) x "
            f"{workload.repeats} repeat(s) of {workload.num_predict} tokens; "
            "nothing was measured or stored")
        return report

    def unmeasured(why: str) -> CheckUnmeasurable:
        c.error = why
        c.text = printable(f"UNMEASURED: {why}")
        _append(study, c)
        return CheckUnmeasurable(f"could not measure study '{st.name}' now: {why}")

    try:
        engine = _engine(o, attrs, winner, base_model)
    except ServerSetupError:
        raise
    except (ServerError, ModelNotFoundError) as e:
        raise unmeasured(str(e)) from None
    try:
        try:
            server = engine.server_info()
            info = engine.model_info(base_model)
            if winner.model and winner.model != base_model:
                engine.model_info(winner.model)
        except ServerSetupError:
            raise
        except (ServerError, ModelNotFoundError, LoadError) as e:
            raise unmeasured(str(e)) from None
        from tuner.study import environment
        from tuner.validate import Interleaved, interleaved_rounds

        c.environment = environment_summary(environment(engine, server, info))
        c.environment_changes = environment_changes(stored_env, c.environment, engine_name)
        if engine_name == "ollama" and o.host is not None:
            from tuner.engines.ollama import normalise_host

            then = str(attrs.get("host") or "")
            if then and normalise_host(o.host) != normalise_host(then):
                # Another server than the study's: a change in itself, whatever it reports.
                c.environment_changes.insert(0, f"server: {then} -> {normalise_host(o.host)}")
        engine.snapshot_loaded()
        configs = [winner, *([defaults] if defaults is not None else [])]
        meter = Interleaved(engine, workload, base_model, _sampler_factory(engine))
        recs: dict[int, list[TrialRecord]] = {t.number: [] for t in configs}

        def measure() -> dict[int, TrialRecord] | None:
            got = meter.round(configs)
            if winner.number in meter.errors:
                raise unmeasured(f"the winner (#{winner.number}) did not run: {meter.errors[winner.number]}")
            return got

        extra = f" and the defaults (#{defaults.number})" if defaults is not None else ""
        echo(printable(f"re-measuring the winner (#{winner.number}){extra} of study '{st.name}' over "
                       f"{o.rounds} interleaved rounds ..."))
        counted, c.contended, c.dropped = interleaved_rounds(measure, o.rounds, o.rounds, echo, "check")
        for got in counted:
            for number, rec in got.items():
                recs[number].append(rec)
        c.rounds = len(counted)
        w_now = _now_values(recs[winner.number], objective, compared)
        c.winner_values = [round(v, 4) for v in w_now]
        if c.rounds < 2 or len(w_now) < 2 or not w_stored:
            why = ("no stored value of the winner to compare with" if not w_stored else
                   f"only {c.rounds} uncontended round(s): other processes kept competing for the machine; "
                   "re-run when it is quiet")
            raise unmeasured(why)
        _compare(c, w_now, w_stored, defaults, d_stored, d_compared, recs, meter.errors)
        c.text = verdict_text(c, engine_name)
        _append(study, c)
        return report
    finally:
        try:
            for name in engine.restore_loaded():
                echo(printable(f"unloaded {name}: it was not loaded before the check"))
        except TunerError:
            pass
        finally:
            engine.close()


def _compare(c: Check, w_now: list[float], w_stored: list[float], defaults: TrialRecord | None,
             d_stored: list[float], d_compared: str, recs: dict[int, list[TrialRecord]],
             errors: dict[int, str]) -> None:
    """Fill the numbers and the verdict of ``c`` from the values measured now and stored."""
    g, lo, hi = log_ci95(w_now)
    c.winner_now, c.winner_now_ci95 = round(g, 4), (round(lo, 4), round(hi, 4))
    ratio, rlo, rhi = log_ratio_ci95(w_now, w_stored)
    c.change_pct, c.change_ci95 = _pct(ratio), (_pct(rlo), _pct(rhi))
    if defaults is not None and d_stored and defaults.number not in errors:
        d_now = _now_values(recs[defaults.number], c.objective, d_compared)
        c.defaults_values = [round(v, 4) for v in d_now]
        if d_now:
            c.defaults_now = round(_gmean(d_now), 4)
            dr, dlo, dhi = log_ratio_ci95(d_now, d_stored)
            c.defaults_change_pct, c.defaults_change_ci95 = _pct(dr), (_pct(dlo), _pct(dhi))
    maximize = objectives.get(c.objective).direction == "maximize"
    lo_pct, hi_pct = c.change_ci95
    worse = hi_pct < -c.tolerance_pct if maximize else lo_pct > c.tolerance_pct
    better = lo_pct > c.tolerance_pct if maximize else hi_pct < -c.tolerance_pct
    reaches = lo_pct < -c.tolerance_pct if maximize else hi_pct > c.tolerance_pct
    c.verdict = "regression" if worse else "faster" if better else "inconclusive" if reaches else "ok"
    c.exit_code = EXIT_CODES[c.verdict]


# ---------------------------------------------------------------------------- words


def _rate(v: float | None) -> str:
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
    text = (f"{c.verdict.upper()}: winner #{c.winner_trial} {_rate(c.winner_now)} {unit} now vs "
            f"{_rate(c.winner_stored)} stored ({change_text(c.change_pct, c.change_ci95)})"
            f"{since_text(c.environment_changes)}")
    if c.defaults_change_pct is not None:
        text += f"; defaults moved {pct_text(c.defaults_change_pct)}"
    return printable(text + advice(c))


def format_check(r: CheckReport) -> str:
    """What ``tune check`` prints: the environment then and now, the measurements, the verdict."""
    c = r.check
    label = objectives.label(c.objective)
    lines = [printable(f"study '{r.study}' in {r.storage}")]
    lines.append("environment (stored -> now):")
    for key, what in ENV_LABELS.items():
        what = what or results.engine_name(r.engine)
        old, new = r.stored_environment.get(key), c.environment.get(key)
        no_gpu = key == "driver" and r.stored_environment.get("gpus") == []
        shown = _env_text(key, old) if old is not None else "none" if no_gpu else "not recorded"
        if new is not None and new != old:
            shown += f" -> {_env_text(key, new)}" + ("  (changed)" if old is not None else "")
        lines.append(printable(f"  {what:<13} {shown}"))
    how = {"rounds": "the re-validation's rounds", "requests": "the search's requests",
           "trial": "the search's single value"}.get(c.compared, c.compared)
    lines.append(f"measured now ({c.rounds} interleaved rounds, {label}, geometric mean and 95% CI; stored: {how}):")
    if c.winner_now is not None and c.winner_now_ci95 is not None:
        lines.append(printable(f"  winner #{c.winner_trial}: {_rate(c.winner_now)} (95% CI {_rate(c.winner_now_ci95[0])}"
                               f" .. {_rate(c.winner_now_ci95[1])}) vs {_rate(c.winner_stored)} stored: "
                               f"{change_text(c.change_pct, c.change_ci95)}   {r.winner_config}"))
    if c.defaults_trial is not None:
        lines.append(printable(f"  defaults #{c.defaults_trial}: {_rate(c.defaults_now)} vs "
                               f"{_rate(c.defaults_stored)} stored: "
                               f"{change_text(c.defaults_change_pct, c.defaults_change_ci95)}"))
    if c.contended:
        lines.append(f"  {c.contended} round(s) contended (other processes competed) and measured again; "
                     f"{c.dropped} dropped")
    lines.append(c.text)
    return "\n".join(lines)


def check_json(r: CheckReport) -> dict[str, Any]:
    """``tune check --json``: the study, the storage, the stored environment and the check."""
    return {"study": r.study, "storage": r.storage, "stored_environment": r.stored_environment,
            **r.check.to_dict()}


def check_line(c: Check) -> str:
    """One line of ``tune show``'s checks: date, verdict, winner now vs stored, environment changes."""
    when = c.when
    date = when.strftime("%Y-%m-%d %H:%M") if when is not None else c.at
    if c.verdict == "unmeasured":
        return printable(f"  {date}  {c.verdict:<10}  {c.error or ''}")
    env = "; ".join(c.environment_changes) or "environment unchanged"
    return printable(f"  {date}  {c.verdict:<10}  winner #{c.winner_trial} {_rate(c.winner_now)} now vs "
                     f"{_rate(c.winner_stored)} stored ({change_text(c.change_pct, c.change_ci95)})  {env}")


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


def drift_series(attrs: dict[str, Any]) -> DriftSeries | None:
    """The over-time view of a study's checks (its user attributes); None without a measured check."""
    all_checks = checks_of(attrs)
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
    engine = str(attrs.get("engine", "ollama"))
    before = environment_summary(dict(attrs.get("environment") or {}), attrs.get("server_version"))
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
