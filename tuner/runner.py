"""The trial runner: Optuna's objective, measuring one trial (or skipping it, reusing an
earlier measurement, storing a failed load) and waiting for a quiet machine or the server."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import TYPE_CHECKING, Any, Callable

from tuner import identity, objectives, record
from tuner.errors import LoadError, ServerError, ServerHungError, StoppedError, TrialFailedError
from tuner.leaderboard import Leaderboard, TrialCache
from tuner.machine import hardware_fingerprint
from tuner.measure import config_key, measure_config
from tuner.memory import Evidence
from tuner.options import TuneOptions
from tuner.record import TrialRecord
from tuner.space import RUNNER_PARAMS, SERVER_PARAMS
from tuner.stats import log_ci95, overlaps
from tuner.terminal import printable

if TYPE_CHECKING:
    from tuner.study import Echo, OnSample, OnTrialStart, _Prepared

#: A failed load scores this (for maximised objectives) so the sampler learns to avoid it.
FAILED_SCORE = {"maximize": 0.0, "minimize": 1e12}


class _Runner:
    """The objective and its per-process state (what is loaded now)."""

    def __init__(self, o: TuneOptions, p: _Prepared, echo: Echo, on_sample: OnSample | None = None,
                 on_trial_start: OnTrialStart | None = None) -> None:
        self.o, self.p, self.echo, self.on_sample = o, p, echo, on_sample
        self.on_trial_start = on_trial_start
        self.loaded_key: Any = None
        #: The machine stayed busy through a whole --quiet-wait: flag without waiting.
        self.stays_busy = False
        #: Trials of this run whose requests got no answer in --timeout, and those answered.
        self.hung, self.answered = 0, 0
        hw = hardware_fingerprint(p.environment)
        self.worker = {"hostname": platform.node(), "pid": os.getpid(), "gpus": hw["gpus"],
                       "server": p.server.get("host", "")}
        self.directions = [objectives.get(x).direction for x in o.objectives]
        # The study's finished trials, each read once (the memory model and _settled read them
        # before every trial), and the best of them kept as they arrive.
        self._board = Leaderboard(self.directions[0])
        self._finished = TrialCache(("COMPLETE", "PRUNED"), self._board)
        self._evidence = Evidence(p.memory) if p.memory is not None else None
        #: The output-identity check of each drafting config run so far (once per config).
        self._identities: dict[Any, dict[str, Any] | None] = {}

    def _sampler(self) -> Any:
        from tuner.telemetry import TelemetrySampler

        return TelemetrySampler(
            interval_s=self.o.telemetry_interval_s,
            gpu_indices=self.o.gpus,
            server_pids=self.p.engine.server_pids(),
            gpus=self.p.gpu_telemetry,
            # A remote server's competitors are not on this machine: nothing to measure here.
            interference=self.p.engine.local and self.o.measure_interference,
        )

    def __call__(self, trial: Any) -> Any:
        o, p = self.o, self.p
        # One read: each read of a running trial's attributes is a query (the stage was set at ask).
        attrs = trial.user_attrs
        baseline = bool(attrs.get(record.BASELINE))
        if baseline:
            model = p.model
            # The defaults, except a context the application needs (else the "winner" could be
            # a config that silently truncates its prompts).
            runner: dict[str, Any] | None = {"num_ctx": o.context} if o.context else None
            server: dict[str, Any] = {}
        else:
            config = p.space.suggest(trial)
            model = config.pop("variant", p.model)
            runner = {k: config[k] for k in RUNNER_PARAMS if k in config}
            server = {k: config[k] for k in SERVER_PARAMS if k in config}
        # What is tried, stored before measuring: a trial that dies still says what it was.
        # The baseline's stage is named as its flag (tuner.staged.BASELINE; that module loads optuna).
        stage = record.BASELINE if baseline else attrs.get(record.STAGE)
        rec = TrialRecord(model=model, options=runner or {}, server=server, baseline=baseline, worker=self.worker,
                          stage=stage, seeded_from=attrs.get(record.SEEDED_FROM))
        rec.memory = self._predict(trial, rec)
        record.write_record(trial, rec)
        if rec.skipped:
            return self._skip(trial, rec)
        prior = None if baseline else self._settled(trial, rec)
        if prior is not None:
            return self._reuse(trial, rec, prior)
        self._started(trial.number)
        try:
            restarted = p.engine.prepare(server)
            rec.server_effective = getattr(p.engine, "effective_server_settings", lambda s: None)(server)
            key = config_key(model, runner, server)
            reload = restarted or key != self.loaded_key
            t0 = time.monotonic()
            m = measure_config(p.engine, model, runner, p.workload, reload=reload,
                               sampler=self._sampler(), on_request=self._reporter(trial, baseline),
                               on_sample=self._sample_hook(trial.number))
            lost_s, tries = 0.0, 0
            # A measurement other processes competed with is not a measurement: measure again
            # once the machine is quiet (bounded), and keep what it cost.
            while (not m.stopped_early and tries < o.remeasure_contended and not self.stays_busy
                   and m.record(model, runner, server).contended):
                tries += 1
                lost_s += time.monotonic() - t0
                waited, quiet = self._wait_for_quiet(trial.number)
                lost_s += waited
                if not quiet:
                    # Busy for the whole wait: waiting again for every trial would only multiply
                    # the study's time; flag the rest until a trial runs quiet.
                    self.stays_busy = True
                    self.echo(f"  the machine stayed busy for {waited:.0f} s: measuring on without waiting; "
                              "contended trials are flagged and kept out of the winner")
                    break
                self._started(trial.number)
                t0 = time.monotonic()
                m = measure_config(p.engine, model, runner, p.workload, reload=False, sampler=self._sampler(),
                                   on_sample=self._sample_hook(trial.number))
            if m.record(model, runner, server).contended is False:
                self.stays_busy = False
            identity = self._identity(model, runner, server)
        except LoadError as e:
            self.loaded_key = None
            self.answered += 1
            return self._failed_load(trial, rec, str(e))
        except ServerError as e:
            self.loaded_key = None
            rec.error = str(e)
            record.write_record(trial, rec)
            if isinstance(e, ServerHungError):
                self.hung += 1
                if not self.answered and self.hung >= min(2, o.trials):
                    raise StoppedError(
                        f"the server is not generating: none of the {self.hung} trials run got an answer "
                        f"within --timeout {o.timeout_s:g} s, though it answers /api/version; check the "
                        "server's log (a hung runner, a stuck GPU), then run the same command again to resume"
                    ) from None
            self._wait_for_server()
            raise TrialFailedError(str(e)) from None
        except KeyboardInterrupt:
            self.loaded_key = None
            rec.error = "interrupted (Ctrl-C)"
            record.write_record(trial, rec)
            raise
        self.loaded_key = key
        self.answered += 1
        predicted = rec.memory
        server_memory = p.engine.server_memory(model)
        rec = m.record(model, runner, server, server_effective=rec.server_effective, baseline=baseline,
                       worker=self.worker, server_memory=server_memory)
        rec.memory = _observed(predicted, server_memory)
        rec.ran = p.engine.ran_options(model)
        rec.remeasured, rec.contention_lost_s = tries, round(lost_s, 2) if tries else None
        rec.stage = stage
        rec.identity = identity
        rec.constraints, rec.violations = self._limits(rec, load_failed=False)
        if m.stopped_early:
            import optuna

            total = p.workload.repeats * len(p.workload.prompts)
            done = len(m.samples) // max(1, p.workload.concurrency)
            mean_s = sum(s.latency_ms for s in m.samples) / len(m.samples) / 1e3
            rec.pruned_saved_s = round(max(0, total - done) * mean_s, 3)
            record.write_record(trial, rec)
            raise optuna.TrialPruned(f"worse than the best after {done} of {total} requests")
        values = []
        for name in o.objectives:
            v = objectives.get(name).value(rec)
            if v is None:
                rec.error = f"objective '{name}' could not be measured"
                record.write_record(trial, rec)
                raise TrialFailedError(
                    f"objective '{name}' could not be measured (no GPU energy counter?): "
                    "choose another --objective"
                )
            values.append(v)
        record.write_record(trial, rec)
        return values[0] if len(values) == 1 else values

    def _started(self, number: int) -> None:
        if self.on_trial_start is not None:
            self.on_trial_start(number, self.p.workload.repeats * len(self.p.workload.prompts))

    def _settled(self, trial: Any, rec: TrialRecord) -> TrialRecord | None:
        """An earlier quiet measurement of this very config in this study (same workload by
        the study's identity) whose 95% interval lies clear of the current best's: measuring
        it again would not change the answer. None when there is none, or it is the best or
        close to it (then a new measurement does add evidence)."""
        field = objectives.get(self.o.objectives[0]).per_request if len(self.o.objectives) == 1 else None
        if field is None:
            return None
        from optuna.trial import TrialState

        finished = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        params = trial.params
        # The params alone say whether this config ran before (the usual answer: no).
        if not any(t.params == params for t in finished):
            return None
        done = self._finished.records(finished)
        same = [r for r in done if not r.baseline and r.reused_from is None and r.measured and r.contended is not True
                and (r.model, r.options, r.server) == (rec.model, rec.options, rec.server) and len(r.samples) > 1]
        if not same:
            return None
        # Every complete trial is on the board (pruned ones never rank): the best of ``done``.
        best = self._board.best()
        if best is None or best.number == same[0].number or len(best.samples) < 2:
            return None
        try:
            mine = log_ci95(same[0].per_request_values(field))
            theirs = log_ci95(best.per_request_values(field))
        except (ValueError, TypeError):
            return None
        return None if overlaps(mine[1:], theirs[1:]) else same[0]

    def _reuse(self, trial: Any, rec: TrialRecord, prior: TrialRecord) -> Any:
        """Record ``prior``'s measurement for this trial, measuring nothing."""
        # No load and no warm-up happened for this trial: those stay empty.
        reused = dataclasses.replace(prior, stage=rec.stage, seeded_from=rec.seeded_from, worker=self.worker,
                                     reused_from=prior.number, remeasured=0, contention_lost_s=None,
                                     reload_ms=None, warmup=None)
        reused.constraints, reused.violations = self._limits(reused, load_failed=False)
        record.write_record(trial, reused)
        values = [objectives.get(name).value(reused) for name in self.o.objectives]
        return values[0] if len(values) == 1 else values

    def _sample_hook(self, number: int) -> Callable[[int, Any], None] | None:
        hook = self.on_sample
        return None if hook is None else (lambda step, sample: hook(number, step, sample))

    def _reporter(self, trial: Any, baseline: bool) -> Callable[[int, Any], bool] | None:
        """Report each request's objective value; ask the pruner whether to stop."""
        field = objectives.get(self.o.objectives[0]).per_request if len(self.o.objectives) == 1 else None
        if field is None:
            return None

        def on_request(step: int, sample: Any) -> bool:
            trial.report(float(getattr(sample, field)), step)
            return bool(self.o.prune and not baseline and trial.should_prune())

        return on_request

    def _limits(self, rec: TrialRecord, load_failed: bool) -> tuple[dict[str, float], list[str]]:
        """Every constraint (the same keys on every trial) and the violations in words."""
        o = self.o
        out: list[str] = []
        values: dict[str, float] = {"load": 1.0 if load_failed else 0.0}
        checks = (
            ("ttft_p95_ms", o.max_ttft_ms, rec.stat(record.TTFT_MS, "p95"), "p95 TTFT", "ms"),
            ("latency_p95_ms", o.max_latency_ms, rec.stat(record.LATENCY_MS, "p95"), "p95 latency", "ms"),
            ("vram_mib", o.max_vram_mib, rec.vram_peak_mib, "VRAM peak", "MiB"),
            ("power_w", o.max_power_w, rec.power_mean_w, "mean power", "W"),
        )
        for key, limit, value, label, unit in checks:
            if limit is None:
                continue
            # NaN counts as unmeasured: stored, it would read as feasible and break the dashboard's JSON.
            if load_failed or value is None or value != value:
                values[key] = 0.0 if not load_failed else 1.0
                continue
            excess = float(value) - limit
            # Normalised so that limits in ms and in W weigh alike in the sampler.
            values[key] = excess / limit
            if excess > 0:
                out.append(f"{label} {value:.0f} {unit} > {limit:g} {unit}")
        if "draft_num_predict" in self.p.space:
            # Same keys on every trial of a drafting study: 1 where drafting changed the output.
            values[record.OUTPUT_IDENTITY] = 1.0 if load_failed or rec.output_changed else 0.0
            if rec.output_changed and not load_failed:
                out.append(identity.text(rec.identity or {}))
        return values, out

    def _identity(self, model: str, runner: dict[str, Any] | None, server: dict[str, Any]) -> dict[str, Any] | None:
        """The output-identity check of a drafting config, once per config (the defaults too
        where the engine drafts by default); None: the config does not draft."""
        if "draft_num_predict" not in self.p.space:
            return None
        # No option sent (the baseline): the engine's own default (Ollama drafts 4 with MTP heads).
        default = (self.p.environment.get("drafting") or {}).get("engine_default", 0)
        draft = (runner or {}).get("draft_num_predict", default)
        if not isinstance(draft, int) or draft <= 0:
            return None
        key = config_key(model, runner, server)
        if key not in self._identities:
            self._identities[key] = identity.check(self.p.engine, self.p.workload, model, dict(runner or {}), draft)
        return self._identities[key]

    def identity_violation(self, t: TrialRecord) -> str | None:
        """Why the config of ``t`` (one the search did not run, e.g. the ablation's) may not be
        measured: its drafting changes the greedy output; None when it keeps it or does not draft.
        The engine must have ``t``'s server settings in place."""
        return identity.violation(self._identity(t.model or self.p.model, t.sent_options, t.effective_server))

    def _predict(self, trial: Any, rec: TrialRecord) -> dict[str, Any] | None:
        """The memory model's prediction for this config from the evidence so far (None
        without a GPU); ``skipped`` when a config at least as large did not load."""
        mem = self.p.memory
        if mem is None:
            return None
        pred = mem.predict(rec.model, rec.options, rec.server)
        if pred is None:
            return None
        assert self._evidence is not None
        cal = self._evidence.calibrate(self._finished.update(trial.study))
        auto = rec.options.get("num_gpu") is None or int(rec.options["num_gpu"]) < 0
        out: dict[str, Any] = {"prior_mib": round(pred.total_mib, 1), "predicted_mib": round(cal.need(pred.total_mib), 1),
                               "layers": None if auto else pred.layers, "weights_mib": round(pred.weights_mib, 1),
                               "kv_mib": round(pred.kv_mib, 1), "compute_mib": round(pred.compute_mib, 1),
                               "verdict": mem.verdict(cal, rec.model, rec.options, rec.server),
                               "capacity": cal.to_dict()}
        # Auto placement never fails for lack of GPU memory: the server places what fits.
        if not auto and not rec.baseline and cal.skip(pred.total_mib):
            out["skipped"] = True
        return out

    def _skip(self, trial: Any, rec: TrialRecord) -> Any:
        """Store a config predicted not to fit as infeasible without loading it."""
        m = rec.memory or {}
        cap = m.get("capacity") or {}
        which = (f"#{cap['fails_trial']} needing {cap['fails_mib']:,.0f} MiB did not load"
                 if cap.get("fails_trial") is not None else f"the GPU has {cap.get('total_mib') or 0:,.0f} MiB")
        error = f"skipped: predicted to need {m.get('predicted_mib', 0):,.0f} MiB of GPU memory, and {which}"
        return self._not_loaded(trial, rec, error, error)

    def _failed_load(self, trial: Any, rec: TrialRecord, error: str) -> Any:
        return self._not_loaded(trial, rec, error, f"failed to load: {error}")

    def _not_loaded(self, trial: Any, rec: TrialRecord, error: str, violation: str) -> Any:
        """Store a config that did not run (it failed to load, or was skipped) as infeasible."""
        rec.error = error
        rec.constraints, _ = self._limits(rec, load_failed=True)
        rec.violations = [violation]
        record.write_record(trial, rec)
        vals = [FAILED_SCORE[d] for d in self.directions]
        return vals[0] if len(vals) == 1 else vals

    def _wait_for_quiet(self, number: int) -> tuple[float, bool]:
        """Wait (up to --quiet-wait) until other processes leave the CPU alone; return the
        seconds waited and whether the machine is quiet now."""
        from tuner.telemetry import machine_busy

        t0 = time.monotonic()
        deadline = t0 + self.o.quiet_wait_s
        said = False
        while True:
            busy = machine_busy(1.0, exclude_pids=sorted({os.getpid(), *self.p.engine.server_pids()}))
            if busy.interference_pct is None or busy.interference_pct < record.CONTENDED_PCT:
                return time.monotonic() - t0, True
            if not said:
                self.echo(printable(
                    f"  #{number} was measured while other processes competed ({_busy_text(busy)}): waiting up to "
                    f"{self.o.quiet_wait_s:.0f} s for a quiet machine, then measuring it again"))
                said = True
            if time.monotonic() >= deadline:
                return time.monotonic() - t0, False

    def _wait_for_server(self) -> None:
        deadline = time.monotonic() + self.o.server_wait_s
        first = True
        while time.monotonic() < deadline:
            try:
                self.p.engine.server_info()
                return
            except ServerError:
                if first:
                    self.echo(f"  server not answering; waiting up to {self.o.server_wait_s:.0f} s for it ...")
                    first = False
                time.sleep(1.0)


def _observed(predicted: dict[str, Any] | None, mem: Any) -> dict[str, Any] | None:
    """The prediction with what the server reported beside it (size_vram, its error)."""
    if predicted is None:
        return None
    out = dict(predicted)
    if mem is not None:
        out["observed_mib"] = mem.vram_mib
        if out.get("predicted_mib") and mem.vram_mib and out.get("layers") is not None:
            out["error_pct"] = round(100.0 * (out["predicted_mib"] - mem.vram_mib) / mem.vram_mib, 1)
    return out


def _busy_text(busy: Any) -> str:
    """'other processes use 98% of a core (busiest: python3 at 97%)'."""
    text = f"other processes use {busy.interference_pct or 0:.0f}% of a core"
    if busy.busiest:
        text += f" (busiest: {busy.busiest} at {busy.busiest_pct or 0:.0f}%)"
    return text


def _machine_check(p: _Prepared) -> str:
    """One line before the study: how busy the machine is, and which process is the busiest."""
    if not p.engine.local:
        return (f"machine check: interference is not measured: the server at {p.server.get('host')} "
                "is not on this machine")
    from tuner.telemetry import machine_busy

    busy = machine_busy(1.0, exclude_pids=sorted({os.getpid(), *p.engine.server_pids()}))
    if busy.interference_pct is None:
        return "machine check: other processes' CPU use cannot be measured here (psutil missing?)"
    if busy.interference_pct >= record.CONTENDED_PCT:
        return (f"machine check: BUSY: {_busy_text(busy)}; trials measured while it competes are flagged "
                "and measured again")
    return f"machine check: quiet ({_busy_text(busy)})"


