"""Drift watch (``tune check``): the stored winner and the defaults re-measured now, compared
with what the study stored, and the verdict kept with the study.

The stored check, its wording and the over-time view are :mod:`tuner.checks` (what ``tune
show`` and the report read); this module measures. It imports no engine at load time:
:func:`run_check` loads what it measures with.

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

import datetime as dt
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from tuner import objectives, results
from tuner.checks import (ENV_LABELS, EXIT_CODES, Check, change_text, env_text, environment_changes,
                          environment_summary, rate_text, verdict_text)
from tuner.errors import CheckUnmeasurable, StorageError, StudyError, TunerError, WorkloadError
from tuner.record import CHECKS, DEFAULT_OBJECTIVE, StudyInfo, TrialRecord, read_study_info
from tuner.stats import log_ci95, log_ratio_ci95
from tuner.terminal import command, printable, tune_command

#: At most this many checks are kept (the oldest go first): an hourly cron job for a month.
MAX_CHECKS = 720

Echo = Callable[[str], None]


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


def study_workload(study: Mapping[str, Any] | StudyInfo, prompts_file: str | None) -> Any:
    """The workload the study measured, rebuilt exactly (``Workload.from_dict``); ``prompts_file``
    supplies the text a study stored before prompts were kept, and must be the same prompts."""
    from tuner.workload import Workload, load_prompts

    stored = read_study_info(study).workload
    if stored is None:
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


def _retune(study: Mapping[str, Any] | StudyInfo, name: str, host: str | None, storage: str | None = None) -> str:
    """A command that tunes the same model on the same server, with the same limits, context and
    workload, in a new study in the same storage (the old one keeps its measurements, and the
    new one warm-starts from it)."""
    from tuner.engines.ollama import DEFAULT_HOST
    from tuner.options import TuneOptions
    from tuner.storage import storage_args

    info = read_study_info(study)
    words: list[Any] = ["tune", "--model", info.model or "MODEL"]
    engine = info.engine_or_default
    if engine != "ollama":
        words += ["--engine", engine]
    elif host is None and info.managed_server:
        words += ["--manage-server"]
    host = host or (None if info.managed_server else info.host)
    if engine == "ollama" and host and host != DEFAULT_HOST:
        words += ["--host", host]
    objective = list(info.objectives)
    if objective != [DEFAULT_OBJECTIVE]:
        words += ["--objectives", ",".join(objective)] if len(objective) > 1 else ["--objective", objective[0]]
    workload = info.workload or {}
    source = workload.get("source")
    if source and source != "builtin":
        words += ["--prompts", source]
    defaults = TuneOptions(model=[])
    for flag, key, default in (("--repeats", "repeats", defaults.repeats),
                               ("--num-predict", "num_predict", defaults.num_predict),
                               ("--concurrency", "concurrency", defaults.concurrency)):
        if workload.get(key) not in (None, default):
            words += [flag, workload[key]]
    if info.context:
        words += ["--context", info.context]
    for key, value in info.limits.items():
        words += ["--" + key.replace("_", "-"), f"{value:g}" if isinstance(value, float) else value]
    words += storage_args(storage)
    new = f"{name}-{dt.date.today().isoformat()}"
    # A name that starts with '-' must travel joined to its option, or it reads as an option.
    words += ["--trials", 20, *((f"--study={new}",) if new.startswith("-") else ("--study", new))]
    return command(*words)


def _engine(o: CheckOptions, info: StudyInfo, winner: TrialRecord, base_model: str) -> Any:
    from tuner.engines import get_engine

    name = info.engine_or_default
    if name == "ollama":
        managed = info.managed_server and o.host is None
        if o.host is not None and winner.effective_server:
            raise TunerError(
                f"the winner (#{winner.number}) runs server settings "
                f"({', '.join(f'{k}={v}' for k, v in winner.effective_server.items())}) that only a tuner-managed "
                "server applies: leave --host out to let tune check start one"
            )
        host = o.host or (None if managed else (info.host or None))
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
    info = st.info
    objective = info.objective
    winner = st.best()
    if winner is None:
        raise StudyError(f"study '{st.name}' has no feasible trial to check: run more trials first "
                         f"(`{tune_command('show', st.name, *storage_args(o.storage))}` says why)")
    defaults = st.baseline()
    if defaults is not None and defaults.number == winner.number:
        defaults = None
    workload = study_workload(info, o.prompts_file)
    base_model = info.model or winner.model
    engine_name = info.engine_or_default
    stored_env = environment_summary(info.environment, info.server_version)
    host_shown = o.host or (None if info.managed_server else info.host)
    retune = _retune(info, st.name, o.host, o.storage)
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
        where = host_shown or ("a managed `ollama serve`" if info.managed_server else "this machine")
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
        engine = _engine(o, info, winner, base_model)
    except ServerSetupError:
        raise
    except (ServerError, ModelNotFoundError) as e:
        raise unmeasured(str(e)) from None
    try:
        try:
            server = engine.server_info()
            model = engine.model_info(base_model)
            if winner.model and winner.model != base_model:
                engine.model_info(winner.model)
        except ServerSetupError:
            raise
        except (ServerError, ModelNotFoundError, LoadError) as e:
            raise unmeasured(str(e)) from None
        from tuner.machine import environment
        from tuner.telemetry import this_machine
        from tuner.validate import Interleaved, interleaved_rounds

        c.environment = environment_summary(environment(server, model, this_machine()))
        c.environment_changes = environment_changes(stored_env, c.environment, engine_name)
        if engine_name == "ollama" and o.host is not None:
            from tuner.engines.ollama import normalise_host

            then = info.host
            if then and normalise_host(o.host) != normalise_host(then):
                # Another server than the study's: a change in itself, whatever it reports.
                c.environment_changes.insert(0, f"server: {then} -> {normalise_host(o.host)}")
        engine.snapshot_loaded()
        configs = [winner, *([defaults] if defaults is not None else [])]
        meter = Interleaved(engine, workload, base_model, _sampler_factory(engine),
                            check=_output_kept(engine, workload, base_model, winner))
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


def _output_kept(engine: Any, workload: Any, base_model: str, winner: TrialRecord
                 ) -> Callable[[TrialRecord], str | None]:
    """A drafting winner's output-identity check run again now (another engine version can verify
    a batch with other kernels): why the winner may not be measured, or None."""
    from tuner import identity

    def check(t: TrialRecord) -> str | None:
        if t.number != winner.number or not winner.identity:
            return None
        draft = int(winner.identity.get("draft_num_predict") or 0)
        return identity.violation(identity.check(engine, workload, t.model or base_model, dict(t.options), draft))
    return check


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
        shown = env_text(key, old) if old is not None else "none" if no_gpu else "not recorded"
        if new is not None and new != old:
            shown = env_text(key, old, new) if old is not None else shown
            shown += f" -> {env_text(key, new, old)}" + ("  (changed)" if old is not None else "")
        lines.append(printable(f"  {what:<13} {shown}"))
    how = {"rounds": "the re-validation's rounds", "requests": "the search's requests",
           "trial": "the search's single value"}.get(c.compared, c.compared)
    lines.append(f"measured now ({c.rounds} interleaved rounds, {label}, geometric mean and 95% CI; stored: {how}):")
    if c.winner_now is not None and c.winner_now_ci95 is not None:
        lines.append(printable(f"  winner #{c.winner_trial}: {rate_text(c.winner_now)} "
                               f"(95% CI {rate_text(c.winner_now_ci95[0])}"
                               f" .. {rate_text(c.winner_now_ci95[1])}) vs {rate_text(c.winner_stored)} stored: "
                               f"{change_text(c.change_pct, c.change_ci95)}   {r.winner_config}"))
    if c.defaults_trial is not None:
        lines.append(printable(f"  defaults #{c.defaults_trial}: {rate_text(c.defaults_now)} vs "
                               f"{rate_text(c.defaults_stored)} stored: "
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


