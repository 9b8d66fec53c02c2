"""One trial's measurement: warm-up after a reload, then the workload, timed and sampled."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tuner.engines.base import Engine
from tuner.metrics import RequestSample
from tuner.record import TrialRecord, build_record
from tuner.workload import Workload, with_nonce

#: A measured request whose load time exceeds this reloaded the model unexpectedly
#: (e.g. keep-alive expired, another client changed the options).
UNEXPECTED_LOAD_MS = 250.0


class Sampler(Protocol):
    def start(self) -> None: ...
    def stop(self) -> Any: ...


def config_key(model: str, runner_options: dict[str, Any] | None, server: dict[str, Any]) -> tuple[Any, ...]:
    """What is loaded: a change of this key means a reload (so a warm-up) before measuring."""
    runner = None if runner_options is None else tuple(sorted(runner_options.items()))
    return (model, runner, tuple(sorted(server.items())))


@dataclass
class TrialMeasurement:
    """Everything one trial measured; ``samples`` are the raw per-request records."""

    samples: list[RequestSample]
    warmup: RequestSample | None
    reload_ms: float | None
    #: Tok/s over all simultaneous streams, one value per concurrent batch.
    aggregate_tps: list[float] = field(default_factory=list)
    concurrency: int = 1
    #: The telemetry sampler's summary (tuner.telemetry.TelemetrySummary), if one ran.
    telemetry: Any = None
    unexpected_reloads: int = 0
    stopped_early: bool = False

    def record(self, model: str, runner_options: dict[str, Any] | None, server: dict[str, Any],
               **extra: Any) -> TrialRecord:
        """The trial record of this measurement (statistics computed once, in the record)."""
        return build_record(model, runner_options, server, self.samples, warmup=self.warmup,
                            reload_ms=self.reload_ms, aggregate_tps=self.aggregate_tps,
                            concurrency=self.concurrency, unexpected_reloads=self.unexpected_reloads,
                            telemetry=self.telemetry, **extra)


def measure_config(
    engine: Engine,
    model: str,
    runner_options: dict[str, Any] | None,
    workload: Workload,
    *,
    reload: bool,
    sampler: Sampler | None = None,
    on_request: Callable[[int, RequestSample], bool] | None = None,
    on_sample: Callable[[int, RequestSample], None] | None = None,
) -> TrialMeasurement:
    """Measure one configuration.

    ``reload``: the config differs from what is loaded, so one discarded warm-up request
    loads it first; its load time is the reload cost. ``on_request(step, sample)`` is called
    after each measured request (step = repeat * len(prompts) + prompt index, the same for
    every trial) and may return True to stop early (pruning); it skips the last request, which
    leaves nothing to save. ``on_sample(step, sample)`` sees every measured request (``tune -v``).
    Raises LoadError (the config does not run) or ServerError (transport) from the engine.
    """
    predict = workload.predict_options()
    warmup = None
    reload_ms = None
    if reload:
        warm_predict = {**predict, "num_predict": min(workload.warmup_predict, workload.num_predict)}
        warmup = engine.generate(model, with_nonce(workload.prompts[0].text), runner_options, warm_predict)
        reload_ms = warmup.load_ms
    samples: list[RequestSample] = []
    aggregate: list[float] = []  # tok/s over all concurrent streams, one value per batch
    stopped = False
    summary: Any = None
    try:
        if sampler is not None:
            sampler.start()
        total = workload.repeats * len(workload.prompts)
        for r in range(workload.repeats):
            for i, p in enumerate(workload.prompts):
                if workload.concurrency > 1:
                    texts = [with_nonce(p.text) for _ in range(workload.concurrency)]
                    batch, wall_ms = engine.generate_concurrent(model, texts, runner_options, predict)
                    samples.extend(dataclasses.replace(b, prompt=p.name, repeat=r) for b in batch)
                    aggregate.append(sum(b.eval_tokens for b in batch) / wall_ms * 1e3 if wall_ms > 0 else 0.0)
                    s = batch[0]
                else:
                    s = engine.generate(model, with_nonce(p.text), runner_options, predict)
                    s = dataclasses.replace(s, prompt=p.name, repeat=r)
                    samples.append(s)
                step = r * len(workload.prompts) + i
                if on_sample is not None:
                    on_sample(step, s)
                if on_request is not None and step < total - 1 and on_request(step, s):
                    stopped = True
                    break
            if stopped:
                break
    finally:
        if sampler is not None:
            summary = sampler.stop()
    # With concurrent streams, load_duration also holds the time a request queued: not a reload.
    unexpected = 0 if workload.concurrency > 1 else sum(1 for s in samples if s.load_ms > UNEXPECTED_LOAD_MS)
    return TrialMeasurement(samples, warmup, reload_ms, aggregate, workload.concurrency, summary, unexpected, stopped)
