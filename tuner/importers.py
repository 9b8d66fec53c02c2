"""Results other tools wrote, read into one shape: llama-bench (JSON, JSONL, CSV, Markdown),
Ollama's bench tool (CSV and benchstat text), and ad-hoc JSON or CSV through a mapping file.

The format is recognised by content, not by the file name. Every row becomes an
:class:`ImportedRow`: the settings in the tuner's names, one measured rate with its samples,
the environment the tool recorded, every other field kept in ``raw`` (nothing dropped), and a
content hash so that importing a file twice adds nothing. Bad input raises ImportFileError
naming the file, the row and what is wrong. Pure: reading files is the only I/O.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from tuner.errors import TunerError
from tuner.record import DECODE_TPS, E2E_TPS, LOAD_MS, METRICS, PREFILL_TPS

MIB = 1 << 20
#: The largest file read (a llama-bench run or a folder's JSON file is kilobytes).
MAX_IMPORT_BYTES = 64 * MIB
#: The largest number of files a folder import reads.
MAX_FILES = 10_000

LLAMA_BENCH_JSON, LLAMA_BENCH_JSONL = "llama-bench-json", "llama-bench-jsonl"
LLAMA_BENCH_CSV, LLAMA_BENCH_MD = "llama-bench-csv", "llama-bench-md"
OLLAMA_BENCH_CSV, OLLAMA_BENCHSTAT = "ollama-bench-csv", "ollama-benchstat"
TUNER_CSV, TUNER_PARQUET = "tuner-csv", "tuner-parquet"
MAPPED = "mapped"
FORMATS = (LLAMA_BENCH_JSON, LLAMA_BENCH_JSONL, LLAMA_BENCH_CSV, LLAMA_BENCH_MD, OLLAMA_BENCH_CSV,
           OLLAMA_BENCHSTAT, TUNER_CSV, TUNER_PARQUET, MAPPED)
#: The first columns of `tune export --format csv|parquet` (tuner/export.py).
_TUNER_LEAD = ["number", "state", "feasible", "baseline", "model"]


class ImportFileError(TunerError):
    """A file cannot be imported as it is (exit 2): the message names the file and the row."""


@dataclass(frozen=True)
class ImportedRow:
    """One measured result another tool wrote, in the tuner's vocabulary."""

    source: str
    #: 1-based line of the row in its file (the line a JSON object starts on).
    line: int
    fmt: str
    model: str
    #: Settings by the tuner's names (num_batch, num_thread, num_gpu, kv_cache_type, ...).
    settings: dict[str, Any]
    #: The tool's name of the test ("pp512", "tg128", "pp512+tg128 @ d512", "generate").
    test: str
    #: The metric key the rate measures (decode, prefill or end-to-end tok/s; load ms).
    metric: str
    mean: float
    sd: float | None = None
    samples: tuple[float, ...] = ()
    tokens: int | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    #: Every field not mapped above, as the tool wrote it.
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """The row's content hash: the same result imported again is recognised."""
        body = {k: v for k, v in self.__dict__.items() if k not in ("source", "line")}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_file(path: str | Path, mapping: Mapping[str, Any] | None = None) -> tuple[str, list[ImportedRow]]:
    """The format and rows of one file; ImportFileError names what is wrong."""
    p = Path(path)
    if _is_parquet(p):
        return TUNER_PARQUET, list(_tuner_table(_parquet_rows(p), str(p), TUNER_PARQUET))
    text = _read(p)
    fmt = detect(text, p)
    if fmt is None:
        if mapping is None:
            raise ImportFileError(
                f"{p}: not a format the tuner recognises (llama-bench json/jsonl/csv/md, Ollama bench csv or "
                "benchstat text): for your own JSON or CSV pass a mapping file with --map (see the README)")
        fmt = MAPPED
    if fmt == MAPPED:
        assert mapping is not None
        return fmt, list(_mapped(text, p, mapping))
    return fmt, list(_PARSERS[fmt](text, str(p)))


def files_in(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and every .json, .jsonl, .csv, .md and .txt file under named folders,
    sorted; ImportFileError for a path that does not exist."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in
                           (".json", ".jsonl", ".csv", ".md", ".txt", ".bench"))
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise ImportFileError(f"{p}: no such file or folder")
        if len(out) > MAX_FILES:
            raise ImportFileError(f"more than {MAX_FILES:,} files to import: import a smaller folder at a time")
    return out


def detect(text: str, path: Path | None = None) -> str | None:
    """The format of ``text`` by its content; None when it is none the tuner knows."""
    head = text.lstrip()[:4096]
    if head.startswith("["):
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if isinstance(data, list) and data and all(isinstance(x, dict) for x in data) and _is_llama_bench(data[0]):
            return LLAMA_BENCH_JSON
        return None
    if head.startswith("{"):
        first = head.splitlines()[0]
        try:
            obj = json.loads(first)
        except ValueError:
            return None
        return LLAMA_BENCH_JSONL if isinstance(obj, dict) and _is_llama_bench(obj) else None
    first = head.splitlines()[0] if head else ""
    if first.startswith("|"):
        cells = _md_cells(first)
        return LLAMA_BENCH_MD if "test" in cells and "t/s" in cells else None
    if first.startswith("BenchmarkModel/") or re.search(r"^BenchmarkModel/", head, re.M):
        return OLLAMA_BENCHSTAT
    cols = [c.strip().strip('"') for c in first.split(",")]
    if {"avg_ts", "n_prompt", "n_gen"} <= set(cols):
        return LLAMA_BENCH_CSV
    if [c.upper() for c in cols[:5]] == ["NAME", "STEP", "COUNT", "NS_PER_COUNT", "TOKEN_PER_SEC"]:
        return OLLAMA_BENCH_CSV
    if cols[:5] == _TUNER_LEAD:
        return TUNER_CSV
    return None


# ------------------------------------------------------------------------ llama-bench

#: llama-bench field -> the tuner's setting.
_LB_SETTINGS = {"n_batch": "num_batch", "n_threads": "num_thread", "n_gpu_layers": "num_gpu"}
#: llama-bench fields that describe the machine and the build.
_LB_ENV = ("build_commit", "build_number", "cpu_info", "gpu_info", "backends", "devices")
#: llama-bench fields that describe the model.
_LB_MODEL = ("model_filename", "model_type", "model_size", "model_n_params")
#: llama-bench fields that are the measurement.
_LB_MEASURED = ("n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns",
                "samples_ts")


def _is_llama_bench(obj: Mapping[str, Any]) -> bool:
    return {"avg_ts", "n_prompt", "n_gen"} <= set(obj)


def _llama_bench_row(obj: Mapping[str, Any], source: str, line: int, fmt: str) -> ImportedRow:
    where = f"{source} row {line}"
    try:
        n_prompt, n_gen = int(obj["n_prompt"]), int(obj["n_gen"])
        depth = int(obj.get("n_depth") or 0)
        mean = float(obj["avg_ts"])
    except (TypeError, ValueError) as e:
        raise ImportFileError(f"{where}: n_prompt, n_gen and avg_ts must be numbers ({e})") from None
    if not math.isfinite(mean) or mean <= 0:
        raise ImportFileError(f"{where}: avg_ts must be a positive rate (got {obj['avg_ts']!r})")
    if n_prompt > 0 and n_gen > 0:
        test, metric = f"pp{n_prompt}+tg{n_gen}", E2E_TPS
    elif n_gen > 0:
        test, metric = f"tg{n_gen}", DECODE_TPS
    elif n_prompt > 0:
        test, metric = f"pp{n_prompt}", PREFILL_TPS
    else:
        raise ImportFileError(f"{where}: neither n_prompt nor n_gen is above 0: not a test llama-bench runs")
    if depth:
        test += f" @ d{depth}"
    settings: dict[str, Any] = {}
    for field_, name in _LB_SETTINGS.items():
        # "auto": a value the tool left to the runtime (our own llama-bench tables print it).
        if obj.get(field_) not in (None, "", "auto"):
            settings[name] = _int(obj[field_], where, field_)
    type_k, type_v = obj.get("type_k"), obj.get("type_v")
    if type_k and type_k == type_v:
        settings["kv_cache_type"] = str(type_k)
    fa = obj.get("flash_attn")
    if fa not in (None, ""):
        settings["flash_attention"] = _flash(fa, where)
    model_file = str(obj.get("model_filename") or "")
    samples = _floats(obj.get("samples_ts"), where, "samples_ts")
    sd = obj.get("stddev_ts")
    used = {*_LB_SETTINGS, "type_k", "type_v", "flash_attn", *_LB_ENV, *_LB_MEASURED, "model_filename"}
    raw = {k: v for k, v in obj.items() if k not in used}
    if type_k and type_k != type_v:
        raw.update(type_k=type_k, type_v=type_v)
    return ImportedRow(
        source=source, line=line, fmt=fmt, model=model_file or str(obj.get("model_type") or ""),
        settings=settings, test=test, metric=metric, mean=mean,
        sd=float(sd) if sd not in (None, "") else None, samples=samples,
        tokens=n_gen if metric == DECODE_TPS else n_prompt if metric == PREFILL_TPS else n_prompt + n_gen,
        environment={k: obj[k] for k in _LB_ENV if obj.get(k) not in (None, "")}, raw=raw)


def _llama_bench_json(text: str, source: str) -> Iterator[ImportedRow]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ImportFileError(f"{source}: not valid JSON ({e})") from None
    # The line each object starts on, for messages and the source of each trial.
    starts = [m.start() for m in re.finditer(r"^\s*\{", text, re.M)]
    for i, obj in enumerate(data):
        line = text.count("\n", 0, starts[i]) + 1 if i < len(starts) else i + 1
        if not isinstance(obj, dict) or not _is_llama_bench(obj):
            raise ImportFileError(f"{source} row {line}: not a llama-bench result (needs n_prompt, n_gen, avg_ts)")
        yield _llama_bench_row(obj, source, line, LLAMA_BENCH_JSON)


def _llama_bench_jsonl(text: str, source: str) -> Iterator[ImportedRow]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise ImportFileError(f"{source} row {line}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not _is_llama_bench(obj):
            raise ImportFileError(f"{source} row {line}: not a llama-bench result (needs n_prompt, n_gen, avg_ts)")
        yield _llama_bench_row(obj, source, line, LLAMA_BENCH_JSONL)


def _llama_bench_csv(text: str, source: str) -> Iterator[ImportedRow]:
    for line, row in _csv_rows(text, source):
        yield _llama_bench_row(_typed(row), source, line, LLAMA_BENCH_CSV)


#: llama-bench's Markdown column -> its JSON field (the columns it prints are those that vary).
_MD_FIELDS = {"ngl": "n_gpu_layers", "threads": "n_threads", "n_batch": "n_batch", "n_ubatch": "n_ubatch",
              "type_k": "type_k", "type_v": "type_v", "fa": "flash_attn", "backend": "backends",
              "model": "model_type", "mmap": "use_mmap", "sm": "split_mode", "mg": "main_gpu",
              "dev": "devices", "embd": "embeddings", "nkvo": "no_kv_offload", "ts": "tensor_split"}


def _llama_bench_md(text: str, source: str) -> Iterator[ImportedRow]:
    lines = text.splitlines()
    header: list[str] | None = None
    for line, raw in enumerate(lines, 1):
        if not raw.strip().startswith("|"):
            header = None if not raw.strip() else header
            continue
        cells = _md_cells(raw)
        if header is None:
            header = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        if len(cells) != len(header):
            raise ImportFileError(f"{source} row {line}: {len(cells)} cells under a header of {len(header)}")
        row = dict(zip(header, cells))
        obj: dict[str, Any] = {}
        for col, value in row.items():
            if col in ("test", "t/s", "size", "params"):
                continue
            obj[_MD_FIELDS.get(col, col)] = _scalar(value)
        m = re.fullmatch(r"(pp|tg)\s*(\d+)(?:\s*\+\s*tg\s*(\d+))?(?:\s*@\s*d(\d+))?", row.get("test", "").strip())
        if m is None:
            raise ImportFileError(f"{source} row {line}: test '{row.get('test')}' is not ppN, tgN or ppN+tgM")
        kind, n, extra, depth = m.groups()
        obj["n_prompt"] = int(n) if kind == "pp" else 0
        obj["n_gen"] = int(extra) if extra else (int(n) if kind == "tg" else 0)
        obj["n_depth"] = int(depth or 0)
        rate = re.fullmatch(r"([\d.eE+-]+)\s*(?:±|\+/-)\s*([\d.eE+-]+)", row.get("t/s", "").strip())
        if rate is None:
            raise ImportFileError(f"{source} row {line}: t/s '{row.get('t/s')}' is not 'MEAN ± SD'")
        obj["avg_ts"], obj["stddev_ts"] = float(rate.group(1)), float(rate.group(2))
        if row.get("size"):
            obj["model_size_text"] = row["size"]
        if row.get("params"):
            obj["model_params_text"] = row["params"]
        yield _llama_bench_row(obj, source, line, LLAMA_BENCH_MD)


# ------------------------------------------------------------------------ Ollama bench

_OLLAMA_STEPS = {"prefill": PREFILL_TPS, "generate": DECODE_TPS}


def _ollama_bench_csv(text: str, source: str) -> Iterator[ImportedRow]:
    for line, row in _csv_rows(text, source):
        row = {k.upper(): v for k, v in row.items()}
        yield from _ollama_step(row.get("NAME", ""), row.get("STEP", ""), row.get("COUNT", ""),
                                row.get("NS_PER_COUNT", ""), row.get("TOKEN_PER_SEC", ""), source, line,
                                OLLAMA_BENCH_CSV,
                                {k: v for k, v in row.items()
                                 if k not in ("NAME", "STEP", "COUNT", "NS_PER_COUNT", "TOKEN_PER_SEC")})


_BENCHSTAT = re.compile(r"^BenchmarkModel/name=(?P<name>[^/\s]+)/step=(?P<step>\w+)\s+(?P<count>\d+)\s+"
                        r"(?P<ns>[\d.eE+-]+)\s+ns/(?:token|request)(?:\s+(?P<tps>[\d.eE+-]+)\s+token/sec)?\s*$")


def _ollama_benchstat(text: str, source: str) -> Iterator[ImportedRow]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.startswith("Benchmark"):
            continue  # benchstat files carry goos/goarch/cpu header lines: kept out of the rows
        m = _BENCHSTAT.match(raw)
        if m is None:
            raise ImportFileError(f"{source} row {line}: not a BenchmarkModel/name=.../step=... line")
        yield from _ollama_step(m["name"], m["step"], m["count"], m["ns"], m["tps"] or "", source, line,
                                OLLAMA_BENCHSTAT, {})


def _ollama_step(name: str, step: str, count: str, ns: str, tps: str, source: str, line: int, fmt: str,
                 raw: dict[str, Any]) -> Iterator[ImportedRow]:
    where = f"{source} row {line}"
    if not name:
        raise ImportFileError(f"{where}: no model NAME")
    step = step.strip().lower()
    if step == "load":
        value = _float(ns, where, "NS_PER_COUNT") / 1e6
        yield ImportedRow(source, line, fmt, name, {}, "load", LOAD_MS, value, samples=(value,), raw=raw)
        return
    if step not in _OLLAMA_STEPS:
        return  # "total" is the sum of the others: nothing of its own to import
    rate = _float(tps, where, "TOKEN_PER_SEC")
    if rate <= 0:
        raise ImportFileError(f"{where}: TOKEN_PER_SEC must be a positive rate (got {tps!r})")
    yield ImportedRow(source, line, fmt, name, {}, step, _OLLAMA_STEPS[step], rate, samples=(rate,),
                      tokens=_int(count, where, "COUNT"), raw=raw)


# ------------------------------------------------------------------------ our own export


def _tuner_csv(text: str, source: str) -> Iterator[ImportedRow]:
    yield from _tuner_table(((line, _typed(row)) for line, row in _csv_rows(text, source)), source, TUNER_CSV)


def _tuner_table(table: Iterable[tuple[int, dict[str, Any]]], source: str, fmt: str) -> Iterator[ImportedRow]:
    """`tune export --format csv|parquet` rows: each complete, error-free trial's metrics (their
    statistics as exported) with its searched settings; the rest of the row kept raw."""
    from tuner.record import METRICS, STATS

    for line, row in table:
        if row.get("state") != "COMPLETE" or row.get("error") not in (None, "") or _missing(row.get("value")):
            continue
        settings = {k[len("params_"):]: v for k, v in row.items() if k.startswith("params_") and not _missing(v)}
        stat_cols = {f"{m}_{st}" for m in METRICS for st in STATS}
        raw = {k: v for k, v in row.items()
               if k not in stat_cols and not k.startswith("params_") and k != "model" and not _missing(v)}
        for metric in METRICS:
            mean = row.get(f"{metric}_mean")
            if _missing(mean):
                continue
            sd = row.get(f"{metric}_sd")
            yield ImportedRow(source, line, fmt, str(row.get("model") or ""), settings, metric, metric,
                              _float(mean, f"{source} row {line}", f"{metric}_mean"),
                              sd=None if _missing(sd) else float(sd), raw=raw)


def _missing(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def _is_parquet(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def _parquet_rows(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    from tuner._imports import require

    require("pyarrow", "reading a Parquet export")
    import pandas as pd

    if p.stat().st_size > MAX_IMPORT_BYTES:
        raise ImportFileError(f"{p} is larger than the {MAX_IMPORT_BYTES // MIB} MiB limit: import a smaller file")
    try:
        df = pd.read_parquet(p)
    except Exception as e:  # pyarrow's errors for a damaged file
        raise ImportFileError(f"{p}: not a readable Parquet file ({e.__class__.__name__}: {e})") from None
    cols = [str(c) for c in df.columns]
    if cols[:5] != _TUNER_LEAD:
        raise ImportFileError(f"{p}: a Parquet file the tuner did not write (`tune export --format parquet` writes "
                              f"{', '.join(_TUNER_LEAD)} first)")
    for i, rec in enumerate(df.to_dict(orient="records"), 2):
        yield i, {str(k): _plain(v) for k, v in rec.items()}


def _plain(v: Any) -> Any:
    """A Parquet cell as plain JSON: timestamps as ISO text, numpy scalars and arrays as Python."""
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return v


# ------------------------------------------------------------------------ mapped (ad-hoc)


def _mapped(text: str, path: Path, mapping: Mapping[str, Any]) -> Iterator[ImportedRow]:
    """Rows of an ad-hoc JSON object, JSON array, JSONL or CSV file through ``mapping``: a
    ``[metrics]`` table (metric key -> dotted path such as ``results[1].tokens_s``), optional
    ``model`` and ``rows`` (path to the list of results inside one document) keys and a
    ``[settings]`` table (setting -> path)."""
    source = str(path)
    docs: list[tuple[int, Any]]
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            docs = [(1, json.loads(text))]
        except ValueError:
            docs = []
            for line, raw in enumerate(text.splitlines(), 1):
                if raw.strip():
                    try:
                        docs.append((line, json.loads(raw)))
                    except ValueError as e:
                        raise ImportFileError(f"{source} row {line}: not valid JSON ({e})") from None
    else:
        docs = [(line, _typed(row)) for line, row in _csv_rows(text, source)]
    rows_path = mapping.get("rows")
    for line, doc in docs:
        items = [doc]
        if rows_path:
            found = lookup(doc, str(rows_path))
            if not isinstance(found, list):
                raise ImportFileError(f"{source} row {line}: '{rows_path}' is not a list in this file")
            items = found
        elif isinstance(doc, list):
            items = doc
        for i, item in enumerate(items):
            yield from _mapped_item(item, mapping, source, line + (i if len(docs) > 1 else 0))


def _mapped_item(item: Any, mapping: Mapping[str, Any], source: str, line: int) -> Iterator[ImportedRow]:
    where = f"{source} row {line}"
    metrics = dict(mapping.get("metrics") or {})
    if not metrics:
        raise ImportFileError(f"the mapping file has no [metrics] table: map at least one metric, e.g. "
                              f"{DECODE_TPS} = \"overall_tokens_per_second\"")
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ImportFileError(f"the mapping file names unknown metrics ({', '.join(unknown)}): use "
                              f"{', '.join(METRICS)}")
    model = lookup(item, str(mapping["model"])) if mapping.get("model") else mapping.get("model_name", "")
    settings = {name: lookup(item, str(p)) for name, p in dict(mapping.get("settings") or {}).items()}
    settings = {k: v for k, v in settings.items() if v is not None}
    paths = [*metrics.values(), *dict(mapping.get("settings") or {}).values(),
             *([mapping["model"]] if mapping.get("model") else [])]
    used = {str(p).split(".")[0].split("[")[0] for p in paths}
    raw = {k: v for k, v in item.items() if k not in used} if isinstance(item, dict) else {}
    got = 0
    for metric, p in metrics.items():
        value = lookup(item, str(p))
        if value is None:
            continue
        rate = _float(value, where, str(p))
        got += 1
        yield ImportedRow(source, line, MAPPED, str(model or ""), settings, metric, metric, rate, samples=(rate,),
                          raw=raw)
    if not got:
        raise ImportFileError(f"{where}: none of the mapped metrics ({', '.join(map(str, metrics.values()))}) is there")


_STEP = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def lookup(doc: Any, path: str) -> Any:
    """The value at a dotted path with list indexes (``metrics[0].gpu[0].fan_speed``); None
    when any step is missing."""
    cur = doc
    for name, index in _STEP.findall(path):
        if name:
            if not isinstance(cur, dict) or name not in cur:
                return None
            cur = cur[name]
        else:
            if not isinstance(cur, list) or not -len(cur) <= int(index) < len(cur):
                return None
            cur = cur[int(index)]
    return cur


# ------------------------------------------------------------------------ helpers


def _read(p: Path) -> str:
    from tuner.inputs import read_text

    return read_text(p, "results file", MAX_IMPORT_BYTES, ImportFileError, "tune import")


def _csv_rows(text: str, source: str) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        for row in reader:
            if None in row:
                raise ImportFileError(f"{source} row {reader.line_num}: more cells than the header has columns")
            yield reader.line_num, {k: (v or "") for k, v in row.items()}
    except csv.Error as e:
        raise ImportFileError(f"{source} row {reader.line_num}: {e}") from None


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _scalar(text: str) -> Any:
    t = text.strip()
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def _typed(row: Mapping[str, str]) -> dict[str, Any]:
    """A CSV row with numbers as numbers and JSON lists as lists (llama-bench CSV quotes all)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        t = v.strip()
        if t.startswith("[") and t.endswith("]"):
            try:
                out[k] = json.loads(t)
                continue
            except ValueError:
                pass
        out[k] = _scalar(t) if t else ""
    return out


def _int(v: Any, where: str, name: str) -> int:
    if isinstance(v, bool):
        return int(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ImportFileError(f"{where}: {name} must be a whole number (got {v!r})") from None
    if not f.is_integer():
        raise ImportFileError(f"{where}: {name} must be a whole number (got {v!r})")
    return int(f)


def _float(v: Any, where: str, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ImportFileError(f"{where}: {name} must be a number (got {v!r})") from None
    if not math.isfinite(f):
        raise ImportFileError(f"{where}: {name} must be a finite number (got {v!r})")
    return f


def _floats(v: Any, where: str, name: str) -> tuple[float, ...]:
    if v in (None, ""):
        return ()
    if not isinstance(v, list):
        raise ImportFileError(f"{where}: {name} must be a list of numbers")
    return tuple(_float(x, where, name) for x in v)


def _flash(v: Any, where: str) -> str:
    # llama-bench writes -1 (auto), 0, 1; older builds true/false.
    table: dict[Any, str] = {-1: "auto", 0: "off", 1: "on", True: "on", False: "off", "auto": "auto",
                             "true": "on", "false": "off", "on": "on", "off": "off"}
    key = v.lower() if isinstance(v, str) else v
    if isinstance(key, str) and re.fullmatch(r"-?\d+", key):
        key = int(key)
    if key not in table:
        raise ImportFileError(f"{where}: flash_attn must be -1, 0, 1, true or false (got {v!r})")
    return table[key]


_PARSERS: dict[str, Callable[[str, str], Iterator[ImportedRow]]] = {
    LLAMA_BENCH_JSON: _llama_bench_json,
    LLAMA_BENCH_JSONL: _llama_bench_jsonl,
    LLAMA_BENCH_CSV: _llama_bench_csv,
    LLAMA_BENCH_MD: _llama_bench_md,
    OLLAMA_BENCH_CSV: _ollama_bench_csv,
    OLLAMA_BENCHSTAT: _ollama_benchstat,
    TUNER_CSV: _tuner_csv,
}
