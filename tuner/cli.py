"""The ``tune`` command line: parse, call one core function, print."""

from __future__ import annotations

import difflib
import os
from typing import Any

import click

from tuner import __version__
from tuner.errors import TunerError
from tuner.objectives import SINGLE
from tuner.options import SAMPLERS, TuneOptions, default
from tuner.record import AGGREGATE, DECODE_TPS
from tuner.settings import SERVER_PARAMS, SETTINGS, or_list
from tuner.terminal import printable

DEFAULT_COMMAND = "run"


class DefaultGroup(click.Group):
    """A group that runs ``run`` when no subcommand is named: ``tune --model gemma3:1b``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:
            args = ["--help"]
        elif args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            # Only options go to `run`: a mistyped command must not read as `run` lacking --model.
            if not args[0].startswith("-"):
                raise TunerClickError(_no_such_command(args[0], list(self.commands)), 2)
            args = [DEFAULT_COMMAND, *args]
        try:
            return super().parse_args(ctx, args)
        except click.ClickException as e:
            raise _neutralised(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TunerError as e:
            if os.environ.get("TUNER_DEBUG"):
                raise
            raise _click_error(e) from None
        except click.ClickException as e:
            raise _neutralised(e) from None
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            sub = ctx.invoked_subcommand or DEFAULT_COMMAND
            if sub in ("run", "demo"):
                msg = ("Interrupted: the running trial is marked failed and every completed trial is kept; "
                       "run the same command again to resume.")
            elif sub == "check":
                msg = "Interrupted: this check was not stored and the study is unchanged; run it again."
            else:
                msg = "Interrupted."
            click.echo("\n" + msg, err=True)
            ctx.exit(130)
        except Exception as e:
            from tuner.storage import write_failure

            full = write_failure(e)
            if full is not None and not os.environ.get("TUNER_DEBUG"):
                raise _click_error(full) from None
            # A bug, not bad input: tests and TUNER_DEBUG=1 want the traceback.
            if os.environ.get("TUNER_DEBUG") or os.environ.get("PYTEST_CURRENT_TEST"):
                raise
            click.echo(
                f"Error: internal error ({e.__class__.__name__}: {e}); rerun with TUNER_DEBUG=1 "
                "for the traceback and report it",
                err=True,
            )
            ctx.exit(1)


class TunerClickError(click.ClickException):
    """A TunerError shown as one line, ``Error: ...``, with the error's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(printable(message))
        # click types exit_code as a ClassVar; here it is the TunerError's own.
        self.exit_code = exit_code  # type: ignore[misc]


def _neutralised(e: click.ClickException) -> click.ClickException:
    """Click's own usage errors quote what was typed: shown with its control characters escaped."""
    e.message = printable(e.message)
    return e


def _click_error(e: TunerError) -> TunerClickError:
    # The one place a TunerError's exit code is read: 2 rejected input, 1 runtime failure.
    return TunerClickError(str(e), e.exit_code)


def _no_such_command(name: str, commands: list[str]) -> str:
    close = difflib.get_close_matches(name, commands, n=1)
    if close:
        return f"No such command '{name}'. Did you mean '{close[0]}'?"
    return f"No such command '{name}': the commands are {', '.join(commands)} (see `tune --help`)"


def _echo(msg: str) -> None:
    click.echo(msg)


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def _print_json(doc: Any) -> None:
    import json

    click.echo(json.dumps(doc, indent=2, allow_nan=False))


def _json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on standard output (human text goes to standard "
                             "error); the schema is in the README, Machine-readable output.")(f)


def _verbosity_options(f: Any) -> Any:
    f = click.option("--verbose", "-v", is_flag=True,
                     help="Also print a line per measured request (tok/s, TTFT, latency).")(f)
    return click.option("--quiet", "-q", is_flag=True,
                        help="Print only errors and the one-line verdict (best config and speedup).")(f)


def _split(values: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tune")
def cli() -> None:
    """Find the fastest runtime settings for a local LLM, measured on this machine.

    Without a subcommand, runs a study (the `run` command):

        tune --model gemma3:1b --trials 50

    Then look at it and take the winner into production:

        tune report; tune show; tune export --format modelfile

    Errors are one line, `Error: ...`, naming the fix. Exit codes: 0 done; 2 rejected input
    (a bad option or file, an unknown study, trial or model name; nothing was measured);
    1 runtime failure (server down or failing, storage cannot be opened or written, disk
    full, a stop after consecutive failed trials); 130 interrupted (Ctrl-C; re-run to resume).
    `tune check` adds its own: 1 a regression, 3 could not measure.
    """


def _storage_option(f: Any) -> Any:
    return click.option(
        "--storage",
        envvar="TUNER_STORAGE",
        show_envvar=True,
        help="Optuna storage URL [default: $TUNER_STORAGE, else sqlite:///studies/tuner.db]; "
        "postgresql://... for many workers, journal:///path.log for shared file systems.",
    )(f)


def _complete_study(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of STUDY: the study names in the storage the command line points at."""
    from click.shell_completion import CompletionItem

    from tuner.show import study_names

    try:
        # --warm-start-from names a study in --warm-start-storage when one is given.
        url = (ctx.params.get("warm_start_storage") if param.name == "warm_start_from" else None) \
            or ctx.params.get("storage") or os.environ.get("TUNER_STORAGE")
        names = study_names(url)
    except Exception:  # completion must never print a traceback into the user's shell
        return []
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


@cli.command("run")
@click.option("--model", "-m", "model", multiple=True, required=True,
              help="Ollama model tag (e.g. gemma3:1b); with --engine llama-cpp, GGUF path(s) or a "
                   "directory of them (several make the quantization-variant axis).")
@click.option("--trials", "-n", type=int, default=default("trials"), show_default=True,
              help="Trials to run now (a re-run adds this many).")
@click.option("--max-time", "max_time", metavar="DURATION",
              help="Wall-clock budget of this run (90s, 10m, 1h30m): sampling stops in time to re-validate "
                   "within it; a re-run continues the search.")
@click.option("--engine", type=click.Choice(["ollama", "llama-cpp"]), default=default("engine"), show_default=True,
              help="Inference engine.")
@click.option("--host", envvar="OLLAMA_HOST", help="Ollama server URL [default: $OLLAMA_HOST or http://127.0.0.1:11434].")
@click.option("--param", "-p", "params", multiple=True, metavar="NAME=V1,V2",
              help="Narrow or fix a parameter: num_ctx=2048,4096  num_gpu=27  num_thread=2..8  variant=TAG,TAG. "
                   f"Repeatable. One value fixes it. Parameters: {', '.join(SETTINGS)}.")
@click.option("--space", "space_file", type=click.Path(dir_okay=False),
              help="TOML space file with a [params] table (see studies/*.toml).")
@click.option("--variants", multiple=True, metavar="TAG,TAG",
              help="Extra quantization variants to include (pulled first if missing).")
@click.option("--context", type=int, help="Context length your application needs: num_ctx never goes below it.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="Your prompts: a text file with prompts separated by '---' lines, or .jsonl with "
                   '{"name", "prompt"}, or builtin:copy (a code edit that mostly copies its prompt) or '
                   'builtin:chat [default: a short chat prompt and a ~1k-token document].')
@click.option("--repeats", "-r", type=int, default=default("repeats"), show_default=True, help="Measured repeats of each prompt per trial.")
@click.option("--num-predict", type=int, default=default("num_predict"), show_default=True, help="Tokens generated per request.")
@click.option("--concurrency", type=int, default=default("concurrency"), show_default=True,
              help="Simultaneous streams per measured request (measures num_parallel under load; "
                   f"adds {AGGREGATE}, the objective for serving many users).")
@click.option("--objective", "objective", default=default("objectives")[0], show_default=True,
              type=click.Choice(SINGLE),
              help="What to maximise (mean over the trial's requests).")
@click.option("--objectives", "objectives", metavar="A,B",
              help=f"Multi-objective study, e.g. {DECODE_TPS},ttft_p95: prints the Pareto set.")
@click.option("--max-ttft-ms", type=float, help="Limit on p95 time to first token (ms).")
@click.option("--max-latency-ms", type=float, help="Limit on p95 request latency (ms).")
@click.option("--max-vram-mib", type=float, help="Limit on peak GPU memory used (MiB).")
@click.option("--vram-headroom-mib", type=float,
              help="GPU memory the winner should leave free (MiB); a winner with less is flagged "
                   "[default: 5% of the GPU, at least 256 MiB].")
@click.option("--max-power-w", type=float, help="Limit on mean GPU power (W).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=default("sampler"), show_default=True,
              help="staged: screen every variant at full GPU offload, then TPE inside the best "
                   "(partial offload only when full offload does not fit); tpe: plain TPE over "
                   "the whole space; random and grid are baselines.")
@click.option("--seed", type=int, help="Sampler seed, for reproducible searches.")
@_storage_option
@click.option("--study", "study_name", help="Study name [default: MODEL@HOST].")
@click.option("--no-baseline", "baseline", flag_value=False, default=True, help="Skip trial 0 (the model as Ollama runs it by default).")
@click.option("--gpu", "gpus", metavar="0,1", help="GPU indices to sample telemetry from [default: all].")
@click.option("--timeout", "timeout_s", type=float, default=default("timeout_s"), show_default=True,
              help="Seconds to wait for one request (model loads included).")
@click.option("--retry-failed", is_flag=True, help="Re-queue once a trial whose worker died (RDB heartbeats).")
@click.option("--heartbeat-interval", "heartbeat_s", type=int, default=default("heartbeat_s"), show_default=True,
              help="Seconds between a running trial's heartbeats in the storage.")
@click.option("--grace-period", "grace_s", type=int, default=default("grace_s"), show_default=True,
              help="Seconds without a heartbeat after which another worker marks a trial FAIL.")
@click.option("--manage-server", is_flag=True,
              help=f"Start and manage our own `ollama serve` (implied when the space has {or_list(SERVER_PARAMS)}).")
@click.option("--ollama-bin", type=click.Path(dir_okay=False), help="The `ollama` executable [default: on PATH].")
@click.option("--models-dir", type=click.Path(file_okay=False),
              help="Model store for the managed server [default: $OLLAMA_MODELS or ~/.ollama/models].")
@click.option("--no-warm-start", "warm_start", flag_value=False, default=True,
              help="Start from nothing instead of the best configs of earlier studies of this model on the nearest hardware.")
@click.option("--warm-start-from", metavar="STUDY", shell_complete=_complete_study,
              help="Start from this study's best configs (whatever its hardware) instead of searching the storage.")
@click.option("--warm-start-storage", metavar="URL",
              help="Look for warm-start studies in this storage instead of --storage.")
@click.option("--allow-mixed-hardware", is_flag=True,
              help="Let a worker on different hardware add trials to an existing study.")
@click.option("--prune/--no-prune", default=default("prune"), show_default=True,
              help="Stop trials whose first requests are clearly worse than the best (Wilcoxon test "
                   "plus a 2% margin); they are stored as PRUNED with what they measured.")
@click.option("--validate", type=int, default=default("validate"), show_default=True,
              help="Re-measure the top K feasible configs interleaved at the end (0 turns it off).")
@click.option("--validate-rounds", type=int, default=default("validate_rounds"), show_default=True,
              help="Interleaved rounds of the re-validation at least (more rounds, narrower intervals).")
@click.option("--validate-max-rounds", type=int, default=default("validate_max_rounds"), show_default=True,
              help="Rounds of the re-validation at most: rounds are added until the best config's 95% "
                   "interval overlaps no other's.")
@click.option("--ablation/--no-ablation", default=default("ablation"), show_default=True,
              help="After the re-validation, measure what each of the winner's settings is worth: each one "
                   "reverted alone, interleaved with the winner (the portable export keeps those that count).")
@click.option("--remeasure-contended", type=int, default=default("remeasure_contended"), show_default=True,
              help="Measure a trial again (this many times at most) when other processes used a quarter of a "
                   "core or more while it ran; 0 keeps such trials, flagged and left out of the winner.")
@click.option("--quiet-wait", "quiet_wait_s", type=float, default=default("quiet_wait_s"), show_default=True,
              help="Seconds to wait for the machine to quiet down before measuring a contended trial again.")
@click.option("--no-roofline", "roofline", flag_value=False, default=True, help="Skip the memory-bandwidth measurement for the roofline.")
@_json_option
@_verbosity_options
def run_cmd(**kw: Any) -> None:
    """Run (or resume) a measured study and print the best feasible configuration.

    Example: tune run --model gemma3:1b --trials 50 --max-ttft-ms 500
    """
    from tuner.space import parse_param_option
    from tuner.study import run_study

    as_json, quiet, verbose = kw.pop("as_json"), kw.pop("quiet"), kw.pop("verbose")
    if quiet and verbose:
        raise TunerClickError("--quiet and --verbose contradict each other: pass one of them", 2)

    kw["params"] = dict(parse_param_option(text) for text in kw["params"])
    max_time = kw.pop("max_time")
    if max_time is not None:
        from tuner.study import parse_duration

        kw["max_time_s"] = parse_duration(max_time)
    objective = kw.pop("objective")
    kw["objectives"] = _split((kw["objectives"],)) if kw["objectives"] else [objective]
    try:
        kw["gpus"] = [int(x) for x in _split((kw["gpus"],))] if kw["gpus"] else None
    except ValueError:
        raise TunerClickError(f"invalid --gpu '{kw['gpus']}': give GPU indices like 0 or 0,1", 2) from None
    kw["model"], kw["variants"] = list(kw["model"]), _split(kw["variants"])
    opts = TuneOptions(**kw)
    # With --json, stdout holds the document alone: progress goes to stderr.
    echo = (lambda msg: None) if quiet else _echo_err if as_json else _echo
    from tuner.show import format_request, format_summary, summary_json, verdict
    from tuner.statusline import StatusLine

    # A terminal gets a live status line for the running trial, on the stream of the progress lines.
    with StatusLine(err=as_json, enabled=not quiet) as live:
        echo = live.wrap(echo)

        def on_sample(number: int, step: int, sample: Any) -> None:
            if verbose:
                echo(format_request(number, step, sample))
            live.sample(number, step, sample)

        summary = run_study(opts, echo=echo, on_sample=on_sample, on_trial_start=live.start)
    if as_json:
        _print_json(summary_json(summary))
    elif quiet:
        click.echo(verdict(summary))
    else:
        click.echo(format_summary(summary))


@cli.command("studies")
@_storage_option
@click.option("--by-hardware", is_flag=True,
              help="The fleet view: per model and hardware, the best config, its value, speedup over the "
                   "defaults and last check (the best of several studies of the same pair).")
@_json_option
def studies_cmd(storage: str | None, by_hardware: bool, as_json: bool) -> None:
    """List the studies in a storage: name, model, trials, best feasible value, last update.

    Example: tune studies --storage sqlite:///studies/tuner.db

    Example: tune studies --by-hardware --storage postgresql://tuner@db-host/tuner
    """
    from tuner.show import format_studies, studies_json

    if by_hardware:
        from tuner.fleet import fleet_json, format_fleet, read_fleet

        fleet = read_fleet(storage)
        if as_json:
            _print_json(fleet_json(fleet))
        else:
            click.echo(format_fleet(fleet))
    elif as_json:
        _print_json(studies_json(storage))
    else:
        click.echo(format_studies(storage))


@cli.command("show")
@click.argument("study", required=False, shell_complete=_complete_study)
@_storage_option
@click.option("--top", "-k", type=int, default=10, show_default=True, help="Rows in the top-k table.")
@click.option("--format", "fmt", type=click.Choice(["text", "md", "csv", "json", "jsonl"]), default="text",
              show_default=True,
              help="md, csv, json, jsonl: every measured config as llama-bench prints its results (one row per "
                   "config and test, llama-bench's column names), to compare with a llama-bench run.")
@_json_option
def show_cmd(study: str | None, storage: str | None, top: int, fmt: str, as_json: bool) -> None:
    """Print STUDY's best configuration and its top-k table [default: the latest study].

    Example: tune show 'gemma3:1b@127.0.0.1:11434' --top 5

    Example: tune show --format md   (a llama-bench table of the study)
    """
    from tuner.show import format_show, show_json

    if fmt != "text":
        if as_json:
            raise TunerClickError("--json and --format contradict each other: pass one of them", 2)
        from tuner.llamabench import study_table

        click.echo(study_table(storage, study, fmt), nl=False)
    elif as_json:
        _print_json(show_json(storage, study, top))
    else:
        click.echo(format_show(storage, study, top))


@cli.command("demo")
@click.option("--trials", "-n", type=int, default=8, show_default=True, help="Trials to run.")
@_storage_option
@click.option("--out", "out_dir", default="reports", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the HTML report and the exported winner.")
@click.option("--quiet", "-q", is_flag=True,
              help="Print only errors and the one-line verdict (best config and speedup).")
def demo_cmd(trials: int, storage: str | None, out_dir: str, quiet: bool) -> None:
    """Run a short real study of Gemma 3 270M on this CPU (llama.cpp), then report and export it.

    Needs `pip install -e '.[demo]'`. Example: tune demo --trials 8
    """
    from tuner.demo import run_demo
    from tuner.statusline import StatusLine

    with StatusLine(enabled=not quiet) as live:
        r = run_demo(trials=trials, storage=storage, out_dir=out_dir,
                     echo=(lambda msg: None) if quiet else live.wrap(_echo),
                     on_sample=live.sample, on_trial_start=live.start)
    if quiet:
        click.echo(r.verdict)
        return
    click.echo(r.summary_text)
    click.echo(f"report:    {r.report}")
    click.echo(f"Modelfile: {r.modelfile}")
    click.echo(f"options:   {r.options_json}")


@cli.command("report")
@click.argument("study", required=False, shell_complete=_complete_study)
@_storage_option
@click.option("--output", "-o", type=click.Path(),
              help="HTML file or folder, or - for standard output [default: reports/<study>.html].")
@click.option("--open", "open_browser", is_flag=True, help="Open the report in the browser.")
@click.option("--fleet", is_flag=True,
              help="Report every model x hardware in the storage instead of one study [default file: "
                   "reports/fleet.html].")
def report_cmd(study: str | None, storage: str | None, output: str | None, open_browser: bool, fleet: bool) -> None:
    """Write a self-contained HTML report of STUDY [default: the latest study].

    Example: tune report 'gemma3:1b@127.0.0.1:11434' --open

    Example: tune report --fleet --storage postgresql://tuner@db-host/tuner -o fleet.html

    Example: tune report -o - | gzip > report.html.gz
    """
    if open_browser and output == "-":
        raise TunerClickError("--open needs a file to open: pass -o FILE instead of -o -, or drop --open", 2)
    if fleet:
        if study is not None:
            raise TunerClickError("--fleet reports every study in the storage: drop STUDY, or drop --fleet", 2)
        from tuner.report.fleet import write_fleet_report

        path = write_fleet_report(storage, output)
    else:
        from tuner.report import write_report

        path = write_report(storage, study, output)
    if output != "-":  # else standard output holds the page alone
        click.echo(printable(path))
    if open_browser:
        click.launch(str(path))
    if _PROCESS_ENDS_AFTER and not fleet:
        _skip_last_collections()


@cli.command("export")
@click.argument("study", required=False, shell_complete=_complete_study)
@click.option("--format", "-f", "fmt", type=click.Choice(["modelfile", "json", "env", "csv", "parquet"]),
              default="modelfile", show_default=True,
              help="modelfile: FROM + PARAMETER lines; json: request options; env: server settings; "
                   "csv/parquet: every trial.")
@_storage_option
@click.option("--trial", "trial_number", type=int, help="Export this trial instead of the best feasible one.")
@click.option("--output", "-o", type=click.Path(),
              help="Write to this file (a folder gets <study>.<format>) instead of standard output; - is "
                   "standard output.")
@click.option("--allow-infeasible", is_flag=True,
              help="Export even when no trial meets the limits (the least-violating one).")
@click.option("--all-settings", is_flag=True,
              help="Export every setting of the trial; by default only those whose measured effect (the "
                   "ablation after the re-validation) is distinguishable from none, and those the study fixed.")
@click.option("--keep", "keep", metavar="SETTING", multiple=True,
              help="Export this setting even when its effect was not distinguishable (repeatable: --keep num_ctx).")
@click.option("--create", "create_name", metavar="NAME",
              help="Create Ollama model NAME with the tuned settings (`ollama run NAME`).")
@click.option("--host", help="Ollama server for --create [default: the study's host; for a managed-server "
                            "study $OLLAMA_HOST or http://127.0.0.1:11434].")
def export_cmd(study: str | None, fmt: str, storage: str | None, trial_number: int | None, output: str | None,
               allow_infeasible: bool, all_settings: bool, keep: tuple[str, ...], create_name: str | None,
               host: str | None) -> None:
    """Export STUDY's winner (or --trial N) for production, or every trial as a table.

    STUDY defaults to the latest study in the storage.

    Example: tune export --format modelfile -o Modelfile && ollama create gemma3-tuned -f Modelfile
    """
    from tuner.export import create_plan, export

    if create_name:
        from tuner.engines.ollama import create_model

        plan = create_plan(storage, study, create_name, host=host, trial_number=trial_number,
                           allow_infeasible=allow_infeasible, all_settings=all_settings, keep=keep)
        # The server's progress lines and its address are its text: made printable.
        said = create_model(plan.name, plan.source, plan.parameters, lambda msg: click.echo(printable(msg)),
                            host=plan.host, announce=plan.announce(), note=plan.note)
        click.echo(printable(said))
        return
    r = export(storage, study, fmt, trial_number=trial_number, output=output, allow_infeasible=allow_infeasible,
               all_settings=all_settings, keep=keep)
    if not output and r.text is not None:
        click.echo(r.text, nl=not r.text.endswith("\n"))
    else:  # written (to standard output too): stdout holds the document alone
        click.echo(r.message, err=True)


@cli.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--study", "study_name", required=True, help="The study the results go into (created if new).")
@_storage_option
@click.option("--map", "map_file", type=click.Path(dir_okay=False),
              help="TOML mapping for your own JSON/CSV: which key holds each metric, the model and each "
                   "setting (see the README, Importing results).")
@click.option("--objective", type=click.Choice(SINGLE),
              help="The metric the imported trials are ranked by [default: decode tok/s when the files have it].")
def import_cmd(paths: tuple[str, ...], study_name: str, storage: str | None, map_file: str | None,
               objective: str | None) -> None:
    """Import the results in PATHS (files or folders) that other tools wrote: llama-bench (-o
    json, jsonl, csv, md), Ollama's bench tool (CSV, benchstat text), `tune export --format
    csv|parquet`, or your own JSON/CSV with --map. The format is recognised by content. Imported trials are marked as such, never win unmeasured, and
    seed a warm start (`tune --warm-start-from STUDY`); importing a file again adds nothing.

    Example: tune import llama-bench.json --study llama-bench-4080
    """
    from tuner.importing import import_results

    import_results(paths, study_name, storage, map_file=map_file, objective=objective, echo=_echo)


@cli.command("check")
@click.argument("study", required=False, shell_complete=_complete_study)
@_storage_option
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Interleaved rounds of the winner and the defaults (more rounds, narrower intervals).")
@click.option("--tolerance", "tolerance_pct", type=float, default=5.0, show_default=True,
              help="Percent: a regression is a change whose whole 95% interval lies beyond it.")
@click.option("--host", help="Ollama server to measure on [default: the study's host; for a managed-server "
                            "study, a managed `ollama serve` again].")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="The study's prompts file, for studies stored before the prompt text was kept.")
@click.option("--timeout", "timeout_s", type=float, default=default("timeout_s"), show_default=True,
              help="Seconds to wait for one request (model loads included).")
@click.option("--ollama-bin", type=click.Path(dir_okay=False),
              help="The `ollama` executable for a managed-server study [default: on PATH].")
@click.option("--models-dir", type=click.Path(file_okay=False),
              help="Model store for a managed-server study [default: $OLLAMA_MODELS or ~/.ollama/models].")
@click.option("--dry-run", is_flag=True,
              help="Say what would be measured and where, then stop: nothing is measured or stored.")
@_json_option
@click.option("--quiet", "-q", is_flag=True, help="Print only errors and the one-line verdict.")
def check_cmd(as_json: bool, quiet: bool, **kw: Any) -> None:
    """Re-measure STUDY's winner and the defaults now and compare with what the study stored.

    Prints what changed (server version, GPU, driver, model digest, CPU) and the verdict, and
    keeps the check with the study (`tune show`, the report). Exit codes, for cron and CI:
    0 no regression, 1 a regression beyond --tolerance, 2 rejected input, 3 could not measure
    (server down, model gone).

    Example: tune check 'gemma3:1b@127.0.0.1:11434' --rounds 5 || echo 'the tuned speed is gone'
    """
    from tuner.check import CheckOptions, check_json, format_check, run_check

    echo = (lambda msg: None) if quiet else _echo_err if as_json else _echo
    r = run_check(CheckOptions(**kw), echo=echo)
    if kw["dry_run"] and not as_json:
        click.echo(r.check.text)
    elif as_json:
        if not quiet:
            click.echo(r.check.text, err=True)
        _print_json(check_json(r))
    elif quiet:
        click.echo(r.check.text)
    else:
        click.echo(format_check(r))
    click.get_current_context().exit(r.check.exit_code)


#: Set by :func:`main`: the command is the whole process (not one of many in a test's process).
_PROCESS_ENDS_AFTER = False


def _skip_last_collections() -> None:
    """Leave every object alive now out of the interpreter's garbage collections at exit.

    `tune report` ends here; walking the hundreds of thousands of objects it read (plotly's,
    SQLAlchemy's, optuna's, the records) only to free memory the OS takes back was 0.2 s of a
    1,000-trial report. Nothing is left open: :func:`tuner.report.write_report` has closed its
    storage's connections, and the output is written and closed.
    """
    import gc

    gc.freeze()


def main() -> None:
    """Console-script entry point."""
    global _PROCESS_ENDS_AFTER
    _PROCESS_ENDS_AFTER = True
    cli(prog_name="tune")


if __name__ == "__main__":
    main()
