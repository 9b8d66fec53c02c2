"""The report as one self-contained HTML page, rendered from a ReportData.

plotly.js is inlined once, so the file opens offline and can be mailed. Every text that came
from the study is escaped; every decision about what to say was made in :mod:`.data`.
"""

from __future__ import annotations

import html
import json
import re
from typing import TYPE_CHECKING, Any, Sequence

from tuner import objectives
from tuner.results import SearchSpeedup, Speedup, defaults_name, search_speedup_text
from tuner.report.data import FIGURE_ORDER, TOP_N, EmptyFigure, FirstScreen, NamedFigure, ReportData, ValidationRow

if TYPE_CHECKING:
    import plotly.graph_objects as go

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1300px;padding:1em 2em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}dl.facts dt{font-weight:600}dl.facts dd{margin:0}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.4em 0}
.warn{background:#fdecea;border-left:4px solid #d62728;padding:.4em .8em;margin:.4em 0}
.speedup{font-size:1.3em;font-weight:600;color:#2a7d2a}.caption{color:#555;font-size:.9em}
code{background:#f4f4f4;padding:0 .2em}.figure{min-height:420px}.figure.small{min-height:380px;max-width:800px}
.validated,.roofline{font-weight:600}
.first{border:2px solid #2a7d2a;border-radius:6px;padding:.2em 1.2em 1em;margin:1em 0}
.first h2{border:0;margin-top:.6em}
pre.paste{background:#f4f4f4;padding:.6em .8em;overflow-x:auto;margin:.3em 0}button.copy{margin:.2em 0;cursor:pointer}
.wide{overflow-x:auto}.wide td.n{white-space:nowrap}
.empty{color:#555;background:#f7f7f7;border-left:4px solid #bbb;padding:.6em .8em;margin:.4em 0}
"""
#: Copies the text of the element a button names; where the clipboard is refused or does not
#: answer within 1.5 s (no permission, a file:// page, an old browser) the text is shown
#: selected instead, for Ctrl+C.
_COPY_JS = (
    "function copyText(button){var el=document.getElementById(button.getAttribute('data-copy'));var done=false;"
    "function fallback(){if(done){return;}done=true;var d=el.closest('details');if(d){d.open=true;}"
    "var r=document.createRange();r.selectNodeContents(el);var sel=window.getSelection();sel.removeAllRanges();"
    "sel.addRange(r);button.textContent='Selected: press Ctrl+C';}"
    "var timer=setTimeout(fallback,1500);"
    "try{navigator.clipboard.writeText(el.textContent).then(function(){if(!done){done=true;clearTimeout(timer);"
    "button.textContent='Copied';}},fallback);}catch(e){fallback();}}"
)
#: The trial outcomes in the order the header lists them (the words of ``results.counts``).
_OUTCOME_ORDER = ("feasible", "infeasible", "pruned", "failed", "running", "waiting")


def escape(v: Any) -> str:
    """``v`` as text safe in HTML, quotes included (for attributes)."""
    return html.escape(str(v), quote=True)


def number(v: float | None, digits: int = 1) -> str:
    """``v`` with thousands separators and ``digits`` decimals; "-" for None."""
    return "-" if v is None else f"{v:,.{digits}f}"


def table(head: list[str], rows: list[list[tuple[str, bool]]]) -> str:
    """An HTML table; each cell is (escaped html, is_number)."""
    out = ["<table><thead><tr>", *(f"<th>{escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class=\"n\">{c}</td>" if num else f"<td>{c}</td>" for c, num in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def page(title: str, body: Sequence[str], head: Sequence[str] = ()) -> str:
    """One self-contained HTML page in the house style: ``head`` (scripts) and ``body`` (html
    parts), one a line."""
    return "\n".join([
        "<!DOCTYPE html>",
        "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{escape(title)}</title>",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<style>{_CSS}</style>",
        *head,
        "</head><body>",
        *body,
        "</body></html>",
        "",
    ])


def _values_text(values: list[Any]) -> str:
    if len(values) > 4 and all(isinstance(v, int) for v in values) and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _pruned_text(data: ReportData) -> str:
    return f"{_plural(len(data.pruned), 'trial')} pruned, about {data.pruned_saved_s:,.1f} s of measurement saved"


def _counts_text(data: ReportData) -> str:
    h = data.header
    c = h.counts
    order = [k for k in _OUTCOME_ORDER if k in c] + sorted(k for k in c if k not in _OUTCOME_ORDER)
    parts = []
    for k in order:
        extra = f" ({h.load_failed} failed to load)" if k == "infeasible" and h.load_failed else ""
        parts.append(f"{c[k]} {k}{extra}")
    return f"{h.total} in all" + (": " + ", ".join(parts) if parts else "")


def _header_html(data: ReportData) -> str:
    h = data.header
    facts = [
        ("Model", h.model), ("Engine", h.engine), ("Host", h.host), ("Server version", h.server_version),
        ("GPU", h.gpu), ("CPU", h.cpu), ("OS", h.os),
        ("Objective(s)", ", ".join(h.objectives)),
        ("Limits", ", ".join(f"{k} = {v:g}" for k, v in h.limits.items()) or "none"),
        ("Search space", "; ".join(f"{k}: {_values_text(v)}" for k, v in h.space.items()) or "not recorded"),
        ("Workload", h.workload),
        ("Created", h.created_at or "unknown"),
        ("Trials", _counts_text(data)),
    ]
    if data.pruned:
        facts.append(("Pruning", _pruned_text(data) + " (clearly worse trials stopped early)"))
    if h.contended or h.remeasured:
        facts.append(("Interference", f"{h.remeasured} measurement(s) redone because other processes competed; "
                                      f"{h.contended} trial(s) still contended, left out of the winner; "
                                      f"{h.contention_lost_s:.0f} s lost to contention"))
    html = "<dl class=\"facts\">" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts) + "</dl>"
    if h.only_contended:
        html += ("<p class=\"warn\">Every feasible trial was measured while other processes competed for the "
                 "machine: the best configuration below is uncertain; re-run when the machine is quiet.</p>")
    return html


def _best_html(data: ReportData) -> str:
    b = data.best
    if b is None:
        return "<h2>Best configuration</h2><p class=\"note\">No trial has completed yet: nothing to report.</p>"
    engine_defaults = defaults_name(data.header.engine)
    title = "Best feasible configuration" if b.feasible else "Least-violating configuration (nothing is feasible)"
    parts = [f"<h2>{escape(title)} &mdash; trial #{b.number}</h2>"]
    w = b.winner_speedup  # none shown when the defaults won: the first screen says why
    if isinstance(w, Speedup):
        parts.append(f"<p class=\"speedup\">{escape(w.describe(objectives.label(b.objective), engine_defaults))}</p>")
    elif isinstance(w, SearchSpeedup):
        text = search_speedup_text(w.ratio, objectives.label(b.objective), engine_defaults,
                                   (w.baseline, w.baseline_value), w.value, contended=w.contended,
                                   no_interval=w.no_interval)
        parts.append(f"<p class=\"speedup\">{escape(text)}</p>")
    elif b.baseline_number is None:
        parts.append("<p class=\"caption\">No baseline trial (study run with --no-baseline): no speedup to show.</p>")
    parts.extend(_winner_html(data))
    r = data.roofline
    if r is not None:
        of = "" if r.get("trial") in (None, b.number) else f" (measured on trial #{r.get('trial')})"
        parts.append(f"<p class=\"roofline\">Roofline: {escape(r['text'])}{escape(of)}</p>")
    if not b.feasible and b.violations:
        parts.append(f"<p class=\"warn\">Violates: {escape('; '.join(b.violations))}</p>")
    cfg: list[tuple[str, Any]] = [("model", b.model)]
    if b.baseline:
        cfg.append(("options", f"none ({engine_defaults})"))
    cfg += [(k, v) for k, v in b.options.items()]
    cfg += [(f"{k} (server)", v) for k, v in b.server.items()]
    parts.append(table(["setting", "value"], [[(escape(k), False), (escape(v), False)] for k, v in cfg]))
    if b.metrics:
        parts.append(table(
            ["metric", "mean", "± sd", "p50", "p95"],
            [[(escape(m.label), False), (number(m.mean), True), (number(m.sd), True), (number(m.p50), True), (number(m.p95), True)]
             for m in b.metrics],
        ))
    if b.telemetry:
        parts.append(table(["telemetry (measured requests)", "value"], [[(escape(k), False), (number(v, 2), True)] for k, v in b.telemetry]))
    return "".join(parts)


def _validated(r: ValidationRow, digits: int = 2) -> str:
    return (f"{number(r.mean, digits)} (95% CI {number(r.ci_low, digits)} .. {number(r.ci_high, digits)}, "
            f"sd {number(r.sd, digits)}, {_plural(r.n, 'round')})")


def _winner_html(data: ReportData) -> list[str]:
    """Lines for the best section: the re-validated winner, and whether it stands out."""
    win = data.winner_row
    if win is None:
        return []
    label = objectives.label(data.validation_objective)
    out = [f"<p class=\"validated\">Re-validated winner over {data.validation_rounds} interleaved rounds: "
           f"{escape(label)} {escape(_validated(win))}.</p>"]
    if data.top and data.top[0].number != win.number:
        out.append(f"<p class=\"caption\">Chosen over trial #{data.top[0].number}, which scored higher in its single "
                   "measurement during the search.</p>")
    if data.overlap_with_best and data.validation_interval:
        out.append(f"<p class=\"warn\">{escape(data.validation_verdict)}</p>")
    elif data.overlap_with_best:
        ok = [r for r in data.validation if r.mean is not None]
        out.append(f"<p class=\"warn\">The top two 95% intervals overlap (#{ok[0].number} and #{ok[1].number}): "
                   "they are not distinguishable at this precision; more --validate-rounds narrows the "
                   "intervals.</p>")
    return out


def _copy_button(target: str, label: str) -> str:
    return (f"<button type=\"button\" class=\"copy\" data-copy=\"{escape(target)}\" onclick=\"copyText(this)\">"
            f"{escape(label)}</button>")


def _warnings_html(f: FirstScreen) -> str:
    """The caveats, on the first screen under the winner: one warning each, with its code."""
    if not f.warnings:
        return ""
    items = "".join(f"<li data-code=\"{escape(c.code)}\">"
                    + re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(c.text[:1].upper() + c.text[1:])) + "</li>"
                    for c in f.warnings)
    return f"<div id=\"warnings\" class=\"warn\"><strong>Warnings</strong><ul>{items}</ul></div>"


def _first_html(data: ReportData) -> str:
    """The first screen: what to run, what it gains over the defaults, what it costs."""
    f = data.first
    if f is None:
        return ""
    if f.number is None:
        return (f"<section id=\"what-to-run\" class=\"first\"><h2>What to run</h2>"
                f"<p class=\"warn\">{escape(f.missing)}</p>{_warnings_html(f)}</section>")
    parts = ["<section id=\"what-to-run\" class=\"first\">", f"<h2>What to run: trial #{f.number}</h2>",
             f"<p><code>{escape(f.config)}</code></p>", _warnings_html(f)]
    if f.speedup_text:
        parts.append(f"<p class=\"speedup\">{escape(f.speedup_text)}</p>")
    # Why there is no interval, or no speedup, is among the warnings above when they say it.
    if f.speedup_note and not any(c.code in ("no_interval", "no_baseline") for c in f.warnings):
        parts.append(f"<p class=\"note\">{escape(f.speedup_note)}</p>")
    if f.check_note:
        parts.append(f"<p class=\"{'warn' if f.check_regression else 'note'}\">{escape(f.check_note)}</p>")
    if f.costs:
        base = f"defaults (#{f.baseline_number})" if f.baseline_number is not None else "defaults (not measured)"
        rows = [[(escape(c.label + (f" ({c.source})" if c.source else "")), False), (number(c.winner, c.digits), True),
                 (number(c.defaults, c.digits), True)] for c in f.costs]
        parts.append(table(["what it costs", f"winner (#{f.number})", base], rows))
    if f.effects:
        rows = [[(escape(e.change), False), (escape(e.effect), True), (escape(e.alone or "-"), True),
                 ("exported" if e.kept else "left to the server", False)] for e in f.effects]
        parts += ["<h3>What each setting is worth</h3>",
                  table(["setting", "reverted alone from the winner: the winner gains", "alone on the defaults",
                         "export"], rows)]
        parts += [f"<p class=\"note\">{escape(line)}</p>" for line in f.effects_notes]
    # The tight-fit warning is among the warnings at the top.
    parts += [f"<p class=\"note\">{escape(line)}</p>" for line in f.memory_lines if not line.startswith("WARNING:")]
    if f.modelfile:
        parts += ["<h3>Modelfile</h3>", _copy_button("modelfile", "Copy Modelfile"),
                  f"<pre id=\"modelfile\" class=\"paste\">{escape(f.modelfile)}</pre>",
                  "<p>Or write it from the study and create the model:</p>",
                  _copy_button("create-commands", "Copy commands"),
                  f"<pre id=\"create-commands\" class=\"paste\">{escape(f.export_command)}\n{escape(f.create_command)}</pre>"]
    else:
        parts.append(f"<p class=\"warn\">{escape(f.missing)}</p>")
    if f.env_command:
        parts.append("<p>The winner also sets server-level settings, which a Modelfile cannot carry; write them "
                     f"for <code>ollama serve</code> with:</p><pre class=\"paste\">{escape(f.env_command)}</pre>")
    parts.append("</section>")
    return "".join(parts)


def _validation_html(data: ReportData, figure: str) -> str:
    if not data.validation:
        return figure  # the reason there is none, in the section's place
    label = objectives.label(data.validation_objective)
    parts = [f"<h2>Re-validation of the top {len(data.validation)} configurations</h2>",
             f"<p class=\"caption\">{escape(label)} re-measured in {data.validation_rounds} interleaved rounds "
             f"after {data.validation_trials_at} trials, "
             + ("geometric mean and 95% confidence interval (Student t on the log scale, so it stays above 0)."
                if data.validation_interval else "mean and 95% confidence interval.") + "</p>"]
    rows = []
    listed = [*data.validation, *([data.validation_baseline] if data.validation_baseline else [])]
    for r in listed:
        if r.error:
            note = f"failed: {r.error}"
        elif r.winner:
            note = "winner" + ("" if data.validation_current else " (not current: later trials took the lead)")
        elif r is data.validation_baseline:
            note = "defaults (re-measured for the speedup)"
        else:
            note = ""
        rows.append([
            (str(r.rank or "-"), True), (f"#{r.number}", True), (escape(r.config), False), (str(r.n), True),
            (number(r.mean, 2), True), (number(r.sd, 2), True), (f"{number(r.ci_low, 2)} .. {number(r.ci_high, 2)}", True),
            (number(r.search_value, 2), True), (escape(note), False),
        ])
    parts.append(table(["rank", "trial", "configuration", "rounds", "mean", "± sd", "95% CI", "during search", ""], rows))
    if data.validation_overlap and not data.overlap_with_best and data.validation_interval:
        parts.append(f"<p class=\"warn\">{escape(data.validation_verdict)}</p>")
    elif data.validation_overlap and not data.overlap_with_best:
        parts.append("<p class=\"warn\">The top two intervals overlap: they are not distinguishable at this "
                     "precision (more --validate-rounds narrows the intervals).</p>")
    elif data.validation_verdict and not data.validation_overlap:
        parts.append(f"<p class=\"note\">{escape(data.validation_verdict)}</p>")
    if data.validation_contended:
        parts.append(f"<p class=\"warn\">{escape(data.validation_contended)}</p>")
    return "".join(parts) + figure


def _effects_html(data: ReportData) -> str:
    """The verdict on the parameter effects, and what was left out."""
    eff = data.effects
    if eff is None:
        return ""
    cls = "validated" if eff.top is not None else "warn"
    return (f"<p class=\"{cls} verdict\">{escape(eff.verdict)}</p>"
            + "".join(f"<p class=\"note\">{escape(n)}</p>" for n in eff.notes))


def _pruned_html(data: ReportData) -> str:
    if not data.pruned:
        return ""
    rows = [[
        (f"#{r.number}", True), (escape(r.config), False),
        (f"{r.requests} of {r.planned}" if r.planned else str(r.requests), True),
        (number(r.decode_tps_mean), True), (number(r.last_value, 2), True), (number(r.saved_s), True),
    ] for r in data.pruned]
    return (f"<h2>Pruned trials</h2><p>{escape(_pruned_text(data))}: each was stopped once it was clearly worse "
            "than the best trial on the same requests.</p>"
            + table(["trial", "configuration", "requests measured", "decode tok/s so far", "last request value",
                      "saved s"], rows))


def _top_html(data: ReportData) -> str:
    parts = [f"<h2>Top {TOP_N} feasible configurations</h2>"]
    if not data.top:
        return parts[0] + "<p class=\"note\">No feasible configuration yet.</p>"
    b = data.bench
    if b is not None and b.rows:
        parts.append("<p class=\"caption\">As llama-bench lists them: decode and prefill tok/s are the mean ± sd "
                     "over the measured requests; the backend is where the server reported the model ran; "
                     "\"default\" is a setting the config left to the engine.</p>")
        parts.append("<div class=\"wide\">"
                     + table(b.columns, [[(escape(c), n) for c, n in zip(line, b.numeric)] for line in b.cells])
                     + "</div>")
        parts.append(_copy_button("top-markdown", "Copy as markdown"))
        parts.append(f"<details><summary>Markdown</summary><pre id=\"top-markdown\" class=\"paste\">{escape(b.markdown)}"
                     "</pre></details>")
        return "".join(parts)
    head = ["rank", "trial", "search stage", "objective", "configuration", f"{data.tps_label} mean ± sd",
            "p95 TTFT ms", "p95 latency ms", "VRAM peak MiB", "power W", "tokens/J", "speedup"]
    rows = [[
        (str(r.rank), True), (f"#{r.number}", True), (escape(r.stage or "-"), False), (number(r.value, 2), True),
        (escape(r.config), False),
        (f"{number(r.tps_mean)} ± {number(r.tps_sd)}", True), (number(r.ttft_ms_p95, 0), True), (number(r.latency_ms_p95, 0), True),
        (number(r.vram_mib, 0), True), (number(r.power_w), True), (number(r.tokens_per_joule, 2), True),
        ("-" if r.speedup is None else f"{r.speedup:.2f}×", True),
    ] for r in data.top]
    return "".join(parts) + table(head, rows)


def _memory_html(data: ReportData) -> str:
    """Every trial's predicted GPU memory beside what the server reported, and the model's error."""
    if not data.memory:
        return ""
    rows = [[(f"#{m.number}", True), (escape(m.config), False), (number(m.predicted_mib, 0), True),
             (number(m.observed_mib, 0) if m.observed_mib is not None else
              ("skipped (predicted not to fit)" if m.skipped else "did not load" if m.failed else "-"), True),
             (f"{m.error_pct:+.1f}%" if m.error_pct is not None else "-", True), (escape(m.verdict), False)]
            for m in data.memory]
    return ("<h2 id=\"gpu-memory\">GPU memory: predicted and reported</h2>"
            f"<p class=\"note\">{escape(data.memory_note)}</p>"
            + table(["trial", "configuration", "predicted MiB", "reported MiB", "error", "verdict before"], rows))


def _imported_html(data: ReportData) -> str:
    if not data.imported:
        return ""
    rows = [[(f"#{r.number} &#8599;", True), (number(r.value), True), (escape(r.config), False),
             (escape(r.tests), False), (escape(r.source), False)] for r in data.imported]
    return ("<h2>Imported results</h2><p class=\"note\">&#8599; another tool's numbers (<code>tune import</code>), "
            "not measured by the tuner: never the winner; a warm start from this study measures them first.</p>"
            + table(["trial", escape(data.objective_label), "configuration", "tests", "source"], rows))


def _failures_html(data: ReportData) -> str:
    if not data.failures:
        return "<h2>Failures</h2><p>No trial failed or broke a limit.</p>"
    rows = [[(f"#{f.number}", True), (escape(f.kind), False), (escape(f.config), False), (escape(f.message), False)]
            for f in data.failures]
    return "<h2>Failures and infeasible trials</h2>" + table(["trial", "kind", "configuration", "error or violation"], rows)


def _in_order(data: ReportData) -> list[NamedFigure | EmptyFigure]:
    """The drawn figures with each empty one in its place (``FIGURE_ORDER``); a figure the
    order does not name keeps its place among the drawn ones."""
    order = {k: i for i, k in enumerate(FIGURE_ORDER)}
    pending = sorted(data.empty, key=lambda e: order.get(e.key, len(order)))
    out: list[NamedFigure | EmptyFigure] = []
    for nf in data.figures:
        at = order.get(nf.key)
        while pending and at is not None and order.get(pending[0].key, len(order)) < at:
            out.append(pending.pop(0))
        out.append(nf)
    return out + pending


def _empty_html(data: ReportData, e: EmptyFigure) -> str:
    head = "" if e.key == "validation" and data.validation else f"<h2>{escape(e.title)}</h2>"
    return f"{head}<p class=\"empty\" data-figure=\"{escape(e.key)}\">{escape(e.reason)}</p>"


def _figure_json(fig: go.Figure) -> str:
    import plotly.io as pio

    text = pio.to_json(fig, validate=False)
    # Plotly already escapes these; doing it here too keeps "</script>" from ever ending the tag.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(data: ReportData) -> str:
    """One self-contained HTML page (plotly.js inlined once in <head>)."""
    from plotly.offline import get_plotlyjs

    h = data.header
    scripts = []
    figures: list[tuple[str, str]] = []  # (key, html)
    drawn = 0
    for nf in _in_order(data):
        if isinstance(nf, EmptyFigure):
            figures.append((nf.key, _empty_html(data, nf)))
            continue
        div = f"fig-{drawn}-{re.sub(r'[^a-z0-9_-]', '', nf.key.lower())}"
        drawn += 1
        # The re-validation figure sits in its own section, under its table.
        part = "" if nf.key == "validation" else f"<h2>{escape(nf.title)}</h2>"
        if nf.caption:
            part += f"<p class=\"caption\">{escape(nf.caption)}</p>"
        if nf.key == "effects":
            part += _effects_html(data)
        cls = "figure small" if nf.key == "validation" else "figure"
        part += f"<div id=\"{div}\" class=\"{cls}\"></div>"
        figures.append((nf.key, part))
        scripts.append(f"drawFigure({json.dumps(div)}, {_figure_json(nf.figure)});")
    body = [
        f"<h1>ollama-tuner report: {escape(h.study_name)}</h1>",
        f"<p class=\"caption\">Generated {escape(data.generated_at)}</p>",
        _first_html(data),
        _header_html(data),
        _best_html(data),
        _validation_html(data, "".join(p for k, p in figures if k == "validation")),
        _top_html(data),
    ]
    body += [f"<p class=\"note\">{escape(n)}</p>" for n in data.notes]
    body += [p for k, p in figures if k != "validation"]
    body.append(_pruned_html(data))
    body.append(_memory_html(data))
    body.append(_imported_html(data))
    body.append(_failures_html(data))
    body.append("<script type=\"text/javascript\">" + "\n".join(scripts) + "</script>")
    return page("ollama-tuner report: " + h.study_name, body, head=[
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>",
        # One figure failing to draw must not stop the others; the error stays visible.
        "<script type=\"text/javascript\">function drawFigure(id, fig){"
        "function fail(e){console.error('figure ' + id + ': ' + e);"
        "document.getElementById(id).textContent = 'This figure could not be drawn: ' + e;}"
        "try {Plotly.newPlot(id, fig.data, fig.layout, {responsive: true, displaylogo: false}).catch(fail);}"
        " catch (e) {fail(e);}}" + _COPY_JS + "</script>",
    ])
