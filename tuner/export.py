"""Taking a winner into production: Modelfile, request JSON, server env file, CSV/Parquet.

``export`` loads the study and dispatches; the ``*_text`` functions are pure (trial + study
in, text out) so they can be tested and reused without storage.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tuner import results
from tuner.record import DECODE_TPS, PREFILL_TPS, TTFT_MS, TrialRecord, read_study_info, user_fixed
from tuner import gains, settings
from tuner.errors import ExportError, SpaceError
from tuner.terminal import printable, tune_command
from tuner.memory import fit_of

FORMATS = ("modelfile", "json", "env", "csv", "parquet")
#: The file name ending of each format, for ``<study>.<ext>`` when --output is a folder.
EXTENSIONS = {"modelfile": "Modelfile", "json": "json", "env": "env", "csv": "csv", "parquet": "parquet"}
#: Ollama's Options (api/types.go Options + Runner) with the JSON type each one takes.
OLLAMA_OPTIONS: dict[str, type] = {
    "num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float, "min_p": float,
    "typical_p": float, "repeat_last_n": int, "temperature": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "stop": list,
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "use_mmap": bool, "num_thread": int,
    # Ollama >= 0.31 (docs/drafting.md).
    "draft_num_predict": int,
}
#: Values that mean "let Ollama decide": exported as absent, which is the same setting.
DEFAULT_EQUIVALENT = {n: s.auto for n, s in settings.SETTINGS.items() if s.auto is not None}
_TOKEN = re.compile(r"^[A-Za-z0-9_.:/@+-]+$")


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` produced: the ``text`` (None for binary formats), the file written (None
    for none or standard output) and a printable ``message`` saying so."""

    fmt: str
    text: str | None
    path: Path | None
    trial_number: int | None
    message: str


TrialLike = Any  # a FrozenTrial or its TrialRecord


def _view(trial: TrialLike) -> TrialRecord:
    return trial if isinstance(trial, TrialRecord) else results.view(trial)


def _check_value(key: str, value: Any, number: int) -> None:
    kind = OLLAMA_OPTIONS.get(key)
    if kind is None:
        raise ExportError(
            f"trial #{number} sets '{key}', which is not an Ollama option: export another trial with --trial N"
        )
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        list: isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        raise ExportError(
            f"trial #{number} has {key}={value!r} but Ollama needs a {kind.__name__}: "
            "export another trial with --trial N"
        )


def runtime_options(trial: TrialLike) -> dict[str, Any]:
    """The runner options a trial used, minus those equal to Ollama's automatic default.

    Raises ExportError when a key is not an Ollama option or has the wrong type.
    """
    v = _view(trial)
    out = {}
    for key, value in v.options.items():
        _check_value(key, value, v.number)
        if DEFAULT_EQUIVALENT.get(key) == value and not isinstance(value, bool):
            continue
        out[key] = value
    return out


@dataclass(frozen=True)
class Selection:
    """What an export of a trial carries: the settings whose measured effect earns their place
    (the portable config, from the study's ablation), or every setting of the trial."""

    record: TrialRecord
    #: Why these settings, one comment line.
    note: str
    #: Measured effect of each kept setting, by name (where the ablation measured one).
    effects: dict[str, str]
    #: Settings of the trial left to the server, each with why.
    left: list[str]


def select(trial: TrialLike, study: Any, all_settings: bool = False, keep: tuple[str, ...] = ()) -> Selection:
    """The settings to export from ``trial``: by default only those the study's ablation found
    worth something (or the user ``keep``s, or the study fixed); ``all_settings`` takes them all.

    Without an ablation of this trial there is nothing to choose by: every setting is kept and
    the note says why.
    """
    unknown = [k for k in keep if k not in settings.SETTINGS]
    if unknown:
        raise ExportError(f"--keep {unknown[0]}: not a setting; choose from {', '.join(settings.SETTINGS)}")
    v = _view(trial)
    s = _stored(study)
    ab = s.ablation
    why = ""
    if all_settings:
        why = "every setting of the trial (--all-settings)"
    elif v.baseline:
        why = "the defaults: nothing to choose"
    elif ab is None:
        why = ("every setting of the trial: what each one is worth was not measured (it needs the "
               "re-validation and the ablation: --validate 2 or more, --ablation)")
    elif ab.winner != v.number:
        why = f"every setting of the trial: what each one is worth was measured for #{ab.winner}, not this trial"
    elif ab.portable_error is not None:
        why = ("every setting of the trial: the config with only the settings that count alone was not measured: "
               + ab.portable_error)
    elif not ab.portable_holds:
        why = ("every setting of the trial: with only the settings that count alone it measured "
               "distinguishably slower (the settings interact)")
    if why:
        return _without_lookup(Selection(v, why, {}, []), s)
    assert ab is not None
    kept = [*ab.portable, *(k for k in keep if k not in ab.portable)]
    changes = [e.change for e in ab.effects]
    rec, out = gains.portable_record(v, s.baseline(), changes, kept, user_fixed(s.info))
    effects = {e.change.setting: e.text(not ab.maximize) for e in ab.effects if e.change.setting in kept}
    by = {e.change.setting: e for e in ab.effects}
    left = [f"{k}={_show_value(val)} ({by[k].short(not ab.maximize)})" if how == "reverted"
            else f"{k}={_show_value(val)} (what the server gives by default)" for k, val, how in out]
    note = ("only the settings with a measured effect (or none measured: kept to be safe) and what the study "
            "fixed" + (f", and {', '.join(sorted(set(keep)))} (--keep)" if keep else "")
            + " (--all-settings exports every one)")
    return _without_lookup(Selection(rec, note, effects, left), s)


def _without_lookup(sel: Selection, s: results.StoredStudy) -> Selection:
    """A llama-cpp study's drafting is llama.cpp's prompt lookup, which Ollama has no option for
    (its ``draft_num_predict`` drafts with a model's own MTP heads): said, never exported."""
    v = sel.record
    if s.info.engine != "llama-cpp" or not any(k in v.options for k in settings.DRAFT_PARAMS):
        return sel
    lookup = {k: v.options[k] for k in settings.DRAFT_PARAMS if k in v.options}
    text = ", ".join(f"{k}={val}" for k, val in lookup.items())
    left = [*sel.left, f"{text} (llama.cpp prompt-lookup drafting: Ollama has no option for it; with "
                       "llama-cpp-python pass Llama(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=N)))"]
    rec = dataclasses.replace(v, options={k: val for k, val in v.options.items() if k not in lookup})
    return Selection(rec, sel.note, {k: e for k, e in sel.effects.items() if k not in lookup}, left)


def _show_value(v: Any) -> str:
    return v.rsplit("/", 1)[-1] if isinstance(v, str) and v.endswith(".gguf") else str(v)


def _model_tag(v: TrialRecord) -> str:
    # Refused rather than escaped: a name with control characters (or spaces) is no model
    # Ollama has, and the FROM line must stay one valid token.
    if not v.model or not _TOKEN.match(v.model):
        raise ExportError(
            f"trial #{v.number} has no usable model name ({v.model!r}): export another trial with --trial N"
        )
    return v.model


def _document(lines: list[str]) -> str:
    """The lines as a file, every comment made printable: study and server text (names,
    errors, host) in a comment can neither start a new line (a forged FROM, PARAMETER or
    KEY=value) nor carry terminal escapes to whoever `cat`s the file."""
    return "".join((printable(line) if line.startswith("#") else line) + "\n" for line in lines)


def _fmt(x: Any, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _stored(study: Any) -> results.StoredStudy:
    """The study read once; one already read (the report's) is used as it is."""
    return study if isinstance(study, results.StoredStudy) else results.read_study(study)


def _defaults(s: results.StoredStudy) -> str:
    return results.defaults_name(s.info.engine_or_default)


def _engine_label(s: results.StoredStudy) -> str:
    """'Ollama', or 'llama.cpp (llama-cpp-python)' for a study of the llama-cpp engine."""
    if s.info.engine == "llama-cpp":
        return f"{results.engine_name('llama-cpp')} (llama-cpp-python)"
    return results.engine_name("ollama")


def _comment_header(trial: TrialLike, s: results.StoredStudy, what: str) -> list[str]:
    v = _view(trial)
    objectives = s.info.objectives
    lines = [
        f"# {what} exported by ollama-tuner on {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"# study '{s.name}', trial #{v.number}"
        + (f" (baseline: {_defaults(s)})" if v.baseline else "")
        + f"; measured on {_engine_label(s)} {s.info.server_version or '?'}"
        + f" at {s.info.host or '?'}",
    ]
    if v.values:
        lines.append("# objective " + ", ".join(f"{o} = {_fmt(x, 2)}" for o, x in zip(objectives, v.values)))
    if DECODE_TPS in v.stats:
        lines.append(
            f"# decode {_fmt(v.stat(DECODE_TPS))} ± {_fmt(v.stat(DECODE_TPS, 'sd'))} tok/s "
            f"(p50 {_fmt(v.stat(DECODE_TPS, 'p50'))}), prefill {_fmt(v.stat(PREFILL_TPS), 0)} tok/s, "
            f"TTFT p50 {_fmt(v.stat(TTFT_MS, 'p50'), 0)} / p95 {_fmt(v.stat(TTFT_MS, 'p95'), 0)} ms"
        )
    w = s.winner_speedup(v)
    if isinstance(w, results.Speedup):
        lines.append(f"# {w.ratio:.2f}x the baseline ({_defaults(s)}) on {objectives[0]} (95% CI "
                     f"{w.ci95[0]:.2f}-{w.ci95[1]:.2f}x, re-measured interleaved over "
                     f"{len(w.ratios)} rounds)")
    elif isinstance(w, results.SearchSpeedup):
        lines.append(f"# {w.ratio:.2f}x the baseline ({_defaults(s)}) on {objectives[0]} ({results.search_only(w.no_interval)})")
    fit = fit_of(v, s.attrs, s.records)
    if fit is not None:
        lines += [f"# {line}" for line in fit.lines()]
    if not v.feasible:
        why = v.error or "; ".join(v.violations) or v.state.lower()
        lines.append(f"# WARNING: this trial is not feasible ({why})")
    return lines


def _selection_lines(sel: Selection) -> list[str]:
    lines = [f"# settings: {sel.note}"]
    lines += [f"# left to the server: {x}" for x in sel.left]
    return lines


def modelfile_text(trial: TrialLike, study: Any, all_settings: bool = False, keep: tuple[str, ...] = ()) -> str:
    """A Modelfile: ``FROM`` the trial's model and a ``PARAMETER`` line per exported runtime
    option (:func:`select`), each with its measured effect as a comment.

    ``study`` is an Optuna study or a :class:`~tuner.results.StoredStudy` (then nothing is read).
    """
    s = _stored(study)
    sel = select(trial, s, all_settings, keep)
    v = sel.record
    lines = _comment_header(trial, s, "Modelfile") + _selection_lines(sel) + _context_lines(sel, s)
    options = runtime_options(v)
    skipped = [k for k, val in v.options.items() if k not in options]
    if skipped:
        lines.append("# left to Ollama (automatic): " + ", ".join(f"{k}={v.options[k]}" for k in skipped))
    if v.effective_server:
        lines.append("# server-level settings cannot go in a Modelfile; set them on `ollama serve`: "
                     + ", ".join(f"{k}={val}" for k, val in v.effective_server.items()))
        lines.append(f"# (see: {tune_command('export', s.name, '--format', 'env', '--trial', v.number)})")
    if "variant" in sel.effects:
        lines.append(f"# {sel.effects['variant']}")
    lines.append(f"FROM {_model_tag(v)}")
    for key, value in options.items():
        if key in sel.effects:
            lines.append(f"# {sel.effects[key]}")
        if isinstance(value, list):
            lines += [f"PARAMETER {key} {json.dumps(item)}" for item in value]
        elif isinstance(value, bool):
            lines.append(f"PARAMETER {key} {'true' if value else 'false'}")
        else:
            lines.append(f"PARAMETER {key} {value}")
    return _document(lines)


def _context_lines(sel: Selection, s: results.StoredStudy) -> list[str]:
    """Context honesty: a num_ctx below the context the server gives this model by default."""
    from tuner.gains import context_change

    c = context_change(sel.record, s.baseline(), s.ablation)
    return [f"# {line}" for line in c.lines()] if c is not None else []


def json_text(trial: TrialLike, study: Any, all_settings: bool = False, keep: tuple[str, ...] = ()) -> str:
    """The body fields for /api/generate or /api/chat: ``{"model": ..., "options": {...}}``."""
    v = select(trial, study, all_settings, keep).record
    return json.dumps({"model": _model_tag(v), "options": runtime_options(v)}, indent=2) + "\n"


def _server_env(v: TrialRecord) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    notes: list[str] = []
    for key, value in v.effective_server.items():
        var = settings.ENV_VARS.get(key)
        if var is None:
            raise ExportError(f"trial #{v.number} sets server setting '{key}', which this tuner cannot export: "
                              "export another trial with --trial N")
        try:
            text = settings.env_value(key, settings.normalise(key, value))
        except SpaceError:
            raise ExportError(f"trial #{v.number} has {key}={value!r}: expected {settings.expected(key)}") from None
        if text is None:
            notes.append(f"{var} left unset: {key.replace('_', ' ')} on auto (the server decides)")
            continue
        env[var] = text
    return env, notes


def env_text(trial: TrialLike, study: Any, all_settings: bool = False, keep: tuple[str, ...] = ()) -> str:
    """The server-level settings as a ``KEY=value`` env file for ``ollama serve``."""
    s = _stored(study)
    sel = select(trial, s, all_settings, keep)
    v = sel.record
    lines = _comment_header(trial, s, "Ollama server environment") + _selection_lines(sel)
    env, notes = _server_env(v)
    lines.append("# use with systemd (EnvironmentFile=), docker (--env-file) or `set -a; . FILE; set +a`,")
    lines.append("# then restart `ollama serve`: these settings only apply at server start")
    if not v.effective_server and not _view(trial).effective_server:
        lines.append(f"# study '{s.name}' tuned no server-level setting "
                     f"({', '.join(settings.SERVER_PARAMS)}): nothing to set, keep the server's defaults")
    elif not v.effective_server:
        lines.append("# no server-level setting made a measured difference: nothing to set, keep the server's defaults")
    lines += [f"# {n}" for n in notes]
    for k, val in env.items():
        name = next((n for n, var in settings.ENV_VARS.items() if var == k), None)
        if name in sel.effects:
            lines.append(f"# {sel.effects[name]}")
        lines.append(f"{k}={val}")
    return _document(lines)


_LEAD = ("number", "state", "feasible", "baseline", "model", "datetime_start", "datetime_complete", "duration_s")


def _frame(study: Any) -> Any:
    df = results.trials_frame(study)
    if df.empty:
        raise ExportError(f"study '{study.study_name}' has no trials yet: run `tune --model MODEL` first")
    # The baseline (first row) has no params, so without this they would come after the metrics.
    cols = list(df.columns)
    lead = [c for c in _LEAD if c in cols]
    values = [c for c in cols if c == "value" or c.startswith("value_")]
    params = [c for c in cols if c.startswith("params_")]
    tail = [c for c in cols if c.startswith("constraint_")] + [c for c in ("violations", "error") if c in cols]
    rest = [c for c in cols if c not in {*lead, *values, *params, *tail}]
    return df[lead + values + params + rest + tail]


def csv_text(study: Any) -> str:
    """Every trial as one CSV row: state, values, params_*, metrics and telemetry, constraints."""
    return str(_frame(study).to_csv(index=False))


def parquet_bytes(study: Any) -> bytes:
    """Every trial as one row of a Parquet table (same columns as ``csv_text``)."""
    from tuner._imports import require

    require("pyarrow", "parquet export")
    import io

    df = _frame(study)
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {type(x) for x in df[col] if x is not None and x == x}
            # Arrow wants one type per column; a column mixing e.g. str and int becomes text.
            if len(kinds) > 1:
                df[col] = df[col].map(lambda x: None if x is None or x != x else str(x))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False, engine="pyarrow")
    return buf.getvalue()


_RENDERERS: dict[str, Callable[[Any, Any, bool, tuple[str, ...]], str]] = {
    "modelfile": modelfile_text,
    "json": json_text,
    "env": env_text,
}


def _load(storage_url: str | None, study_name: str | None) -> Any:
    from tuner.storage import open_storage

    return results.load_study(open_storage(storage_url, create=False), study_name)


def export(
    storage_url: str | None,
    study_name: str | None,
    fmt: str,
    *,
    trial_number: int | None = None,
    output: str | None = None,
    allow_infeasible: bool = False,
    all_settings: bool = False,
    keep: tuple[str, ...] = (),
) -> ExportResult:
    """Export the best feasible trial (or ``trial_number``) of a study as ``fmt``.

    modelfile, json, env and csv return their text, and write it to ``output`` when given;
    parquet is binary and is written to ``output`` or ``<study>.parquet`` in the current
    folder. ``output`` follows :func:`tuner.files.write_output`: ``-`` is standard output, a
    folder gets ``<study>.<ext>``. Raises StudyError when no trial is feasible and
    ``allow_infeasible`` is off, ExportError for a bad format or an unwritable file.
    """
    from tuner.files import STDOUT, output_path, safe_name, stdout_is_terminal, write_output

    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}': choose from {', '.join(FORMATS)}")
    output = output or None  # -o '' is no file: standard output, as without -o
    if fmt == "parquet" and output == STDOUT and stdout_is_terminal():
        raise ExportError(
            "parquet is binary and standard output is a terminal: pass -o FILE, or pipe it into a program")
    if fmt in ("csv", "parquet") and trial_number is not None:
        raise ExportError(f"--trial does not apply to {fmt}, which exports every trial: drop --trial")
    study = _load(storage_url, study_name)
    default = Path(f"{safe_name(study.study_name)}.{EXTENSIONS[fmt]}")
    if output is None and fmt == "parquet":  # binary: it needs a file
        output = str(default)
    path = output_path(output, default) if output is not None else None
    number: int | None = None
    if fmt in ("csv", "parquet"):
        n = len(study.get_trials(deepcopy=False))
        text: str | None = csv_text(study) if fmt == "csv" else None
        data = parquet_bytes(study) if text is None else text.encode("utf-8")
        said = f"exported {n} trials of '{study.study_name}' as {fmt}"
    else:
        trial = results.pick_trial(study, trial_number, allow_infeasible)
        text = _RENDERERS[fmt](trial, study, all_settings, keep)
        data = text.encode("utf-8")
        feasible = "" if trial.feasible else " (not feasible)"
        said = f"exported trial #{trial.number}{feasible} of '{study.study_name}' as {fmt}"
        number = trial.number
    if output is not None:
        write_output(path, data, f"{fmt} export", ExportError)
        said += f" to {path}" if path is not None else " to standard output"
    return ExportResult(fmt, text, path, number, printable(said))


@dataclass(frozen=True)
class CreatePlan:
    """What ``tune export --create NAME`` creates, and where (read from the study alone)."""

    name: str
    #: The server to create it on: the study's, or --host; None means $OLLAMA_HOST / the default.
    host: str | None
    source: str
    parameters: dict[str, Any]
    trial_number: int
    #: The equivalent Modelfile, for the record.
    modelfile: str
    #: Said after creating (printable): server-level settings a model cannot carry.
    note: str = ""

    def announce(self) -> str:
        """The line said before creating, printable (a ``stop`` string is the study's text)."""
        opts = ", ".join(f"{k}={val}" for k, val in self.parameters.items())
        return printable(f"creating '{self.name}' from {self.source} (trial #{self.trial_number})" + (
            f": {opts}" if opts else " with no options"))


def create_plan(
    storage_url: str | None,
    study_name: str | None,
    name: str,
    host: str | None = None,
    trial_number: int | None = None,
    allow_infeasible: bool = False,
    all_settings: bool = False,
    keep: tuple[str, ...] = (),
) -> CreatePlan:
    """Plan creating Ollama model ``name`` from the winner's variant with its runtime options
    as PARAMETERs, on ``host`` or else the server the study was tuned on."""
    if not name or not _TOKEN.match(name):
        raise ExportError(f"invalid model name '{name}': use letters, digits and - _ . : / (e.g. gemma3-tuned)")
    study = _load(storage_url, study_name)
    info = read_study_info(study)
    engine_name = info.engine_or_default
    if engine_name != "ollama":
        raise ExportError(
            f"study '{study.study_name}' was tuned with the {engine_name} engine: creating an Ollama model "
            "needs an Ollama study; use --format modelfile and `ollama create` instead"
        )
    picked = results.pick_trial(study, trial_number, allow_infeasible)
    v = select(picked, study, all_settings, keep).record
    # A managed server's address died with the run that started it: use OLLAMA_HOST then.
    tuned_on = None if info.managed_server else info.host
    note = ""
    if v.effective_server:
        settings_text = ", ".join(f"{k}={val}" for k, val in v.effective_server.items())
        note = printable(f"the server-level settings ({settings_text}) "
                         f"need `{tune_command('export', study.study_name, '--format', 'env')}`")
    return CreatePlan(name, host or tuned_on or None, _model_tag(v), runtime_options(v), v.number,
                      modelfile_text(picked, study, all_settings, keep), note)
