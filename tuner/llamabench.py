"""A study as llama-bench prints its results: one row per config and test, the columns named
as llama-bench names them where the meaning is the same, so a user can paste our table next to
a llama-bench run and compare line by line (``tune show --format md|csv|json|jsonl``).

Tests: ``tgN`` is decode over the N generated tokens of each request; ``ppN`` the prefill of
one workload prompt of N tokens (one row per prompt). t/s is the mean ± sample sd over the
trial's requests, as llama-bench's is over its repetitions. Read side: records only.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from tuner.record import DECODE_TPS, PREFILL_TPS, PROMPT_TOKENS, TrialRecord

FORMATS = ("md", "csv", "json", "jsonl")
_MIB, _GIB = 1 << 20, 1 << 30


@dataclass(frozen=True)
class BenchRow:
    """One config and test, in llama-bench's field names."""

    trial: int
    model_filename: str
    model_type: str
    model_size: int | None
    model_n_params: int | None
    backends: str
    n_gpu_layers: str
    n_batch: str
    n_threads: str
    type_k: str
    type_v: str
    flash_attn: str
    n_prompt: int
    n_gen: int
    avg_ts: float
    stddev_ts: float
    samples_ts: list[float]

    @property
    def test(self) -> str:
        return f"pp{self.n_prompt}" if self.n_gen == 0 else f"tg{self.n_gen}"


def rows(records: list[TrialRecord], attrs: dict[str, Any]) -> list[BenchRow]:
    """The measured trials of a study as llama-bench rows: prefill then decode per trial."""
    env = dict(attrs.get("environment") or {})
    models = dict(env.get("models") or {})
    num_predict = int(dict(attrs.get("workload") or {}).get("num_predict") or 0)
    offloads = (env.get("gpu_offload") or {}).get("offloads")
    out: list[BenchRow] = []
    for r in records:
        if not r.measured or DECODE_TPS not in r.stats:
            continue
        ran = {**r.ran, **r.options}
        server = r.effective_server
        info = dict(models.get(r.model) or {})
        ngl = ran.get("num_gpu")
        backend = "CPU" if ngl == 0 or offloads is False else "GPU"
        kv = str(server.get("kv_cache_type") or "f16")
        common = dict(
            trial=r.number, model_filename=r.model, model_type=_model_type(r, info),
            model_size=info.get("size_bytes"), model_n_params=_params(info.get("parameter_size")),
            backends=backend, n_gpu_layers=_setting(ngl, -1), n_batch=_setting(ran.get("num_batch"), None),
            n_threads=_setting(ran.get("num_thread"), 0), type_k=kv, type_v=kv,
            flash_attn=str(server.get("flash_attention") or "auto"))
        per_request = [s for s in r.samples if isinstance(s, dict)]
        # Prefill per prompt, each at its own fixed length, as llama-bench's ppN is.
        by_prompt: dict[str, list[dict[str, Any]]] = {}
        for x in per_request:
            by_prompt.setdefault(str(x.get("prompt", "")), []).append(x)
        for group in by_prompt.values():
            rates = [float(x[PREFILL_TPS]) for x in group if x.get(PREFILL_TPS)]
            if rates:
                out.append(BenchRow(**common, n_prompt=int(group[0].get(PROMPT_TOKENS) or 0), n_gen=0,
                                    avg_ts=statistics.fmean(rates), stddev_ts=_sd(rates), samples_ts=rates))
        rates = [float(x[DECODE_TPS]) for x in per_request if x.get(DECODE_TPS)]
        s = r.stats[DECODE_TPS]
        out.append(BenchRow(**common, n_prompt=0, n_gen=num_predict,
                            avg_ts=statistics.fmean(rates) if rates else s.mean,
                            stddev_ts=_sd(rates) if rates else s.sd, samples_ts=rates))
    return out


def render(bench: list[BenchRow], fmt: str) -> str:
    """``bench`` as llama-bench's printer ``fmt`` would write it."""
    if fmt == "md":
        return _markdown(bench)
    docs = [{**{k: v for k, v in asdict(r).items() if k != "trial"}, "test": r.test, "tuner_trial": r.trial}
            for r in bench]
    if fmt == "json":
        return json.dumps(docs, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(d) + "\n" for d in docs)
    buf = io.StringIO()
    cols = [k for k in (docs[0] if docs else {}) if k != "samples_ts"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for d in docs:
        w.writerow([d[c] for c in cols])
    return buf.getvalue()


_MD = (("model", 30, "<"), ("size", 10, ">"), ("params", 10, ">"), ("backend", 10, "<"), ("ngl", 4, ">"),
       ("n_batch", 10, ">"), ("threads", 10, ">"), ("type_k", 6, "<"), ("fa", 4, "<"), ("test", 10, "<"),
       ("t/s", 16, ">"))


def _markdown(bench: list[BenchRow]) -> str:
    def cells(r: BenchRow) -> list[str]:
        return [r.model_type, _size(r.model_size), _count(r.model_n_params), r.backends, r.n_gpu_layers,
                r.n_batch, r.n_threads, r.type_k, r.flash_attn, r.test, f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}"]

    body = [cells(r) for r in bench]
    widths = [max([w, len(name), *(len(c[i]) for c in body)]) for i, (name, w, _) in enumerate(_MD)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(f"{v:{a}{w}}" for v, w, (_, _, a) in zip(values, widths, _MD)) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if a == ">" else "-" * w
                             for w, (_, _, a) in zip(widths, _MD)) + " |"
    return "\n".join([line([name for name, _, _ in _MD]), rule, *(line(c) for c in body)]) + "\n"


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _model_type(r: TrialRecord, info: dict[str, Any]) -> str:
    parts = [r.model_label, str(info.get("parameter_size") or ""), str(info.get("quantization") or "")]
    return " ".join(p for p in parts if p)


def _setting(value: Any, auto: Any) -> str:
    return "auto" if value is None or value == auto else str(value)


def _params(text: Any) -> int | None:
    """Ollama's "999.89M" / "7.6B" as a count."""
    if not isinstance(text, str) or not text:
        return None
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(text[-1].upper())
    try:
        return round(float(text[:-1]) * scale) if scale else round(float(text))
    except ValueError:
        return None


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / _GIB:.2f} GiB" if n >= _GIB else f"{n / _MIB:.2f} MiB"


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def study_table(storage_url: str | None, study_name: str | None, fmt: str) -> str:
    """``tune show --format FMT``: the study at ``storage_url`` (read-only) as llama-bench prints."""
    from tuner import results
    from tuner.storage import open_storage

    st = results.read_study(results.load_study(open_storage(storage_url, create=False), study_name))
    return render(rows(st.records, st.attrs), fmt)
