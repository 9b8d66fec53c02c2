"""The report's plotly figures, drawn from a :class:`~tuner.report.data.ReportData` only.

Nothing here reads the study: each figure is a function of the data object, in the look of
optuna's own plots (same trace names, feasible and infeasible apart) but linear in trials.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any, Sequence

from tuner import objectives
from tuner.checks import changes_text
from tuner.effects import MARGINAL, MIN_TRIALS_FOR_IMPORTANCES
from tuner.results import defaults_name
from tuner.report.data import (
    NamedFigure, ParamAxis, ReportData, TelemetryView, TradeoffPoint, TrialPoint, ValidationRow, best_so_far,
)

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: Feasible, infeasible and pruned markers, as optuna draws them.
INFEASIBLE = "#cccccc"
PRUNED = "#999999"
#: A numeric setting with at most this many values is drawn as categories (num_ctx 2048 .. 32768).
MAX_NUMERIC_CATEGORIES = 8
#: The width of a figure's plot area in the report (px, less plotly's side margins), the subplot
#: title font size, and a character's mean width in it (em): titles are wrapped to their panel's
#: width so that neighbours never overlap.
PLOT_WIDTH_PX = 940
TITLE_FONT_PX = 12
CHAR_EM = 0.55


def wrap_title(text: str, panels: int, spacing: float = 0.0, width_px: int = PLOT_WIDTH_PX) -> list[str]:
    """``text`` in lines that fit one of ``panels`` side by side, ``spacing`` (of the plot's
    width) between them."""
    import textwrap

    panel_px = width_px * (1 - spacing * (panels - 1)) / max(panels, 1) + width_px * spacing
    return textwrap.wrap(text, max(12, int(panel_px / (TITLE_FONT_PX * CHAR_EM))), break_on_hyphens=False) or [""]


def _text(number: int, config: str) -> str:
    # Plotly renders hover text as pseudo-HTML: escape what came from the study.
    return html.escape(f"#{number} {config}")


def history_figure(data: ReportData) -> go.Figure:
    """Every complete trial by number, infeasible ones apart, the best-feasible line, and the
    pruned trials at the value they stopped at."""
    import plotly.graph_objects as go

    pts = data.history
    feas = [p for p in pts if p.feasible]
    infeas = [p for p in pts if not p.feasible]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[p.number for p in feas], y=[p.value for p in feas], mode="markers", name="Objective Value",
        marker={"color": "#1f77b4"}, text=[_text(p.number, p.config) for p in feas],
        hovertemplate="%{text}<br>%{y:.2f}<extra></extra>",
    ))
    fig.add_trace(go.Scatter(x=[p.number for p in pts], y=best_so_far(pts, data.maximize), mode="lines",
                             name="Best Value", line={"color": "#d62728"}, hoverinfo="skip"))
    if infeas:
        fig.add_trace(go.Scatter(
            x=[p.number for p in infeas], y=[p.value for p in infeas], mode="markers", name="Infeasible Trial",
            marker={"color": INFEASIBLE}, text=[_text(p.number, p.config) for p in infeas],
            hovertemplate="%{text}<br>%{y:.2f} (infeasible)<extra></extra>",
        ))
    pruned = [r for r in data.pruned if r.last_value is not None]
    if pruned:
        fig.add_trace(go.Scatter(
            x=[r.number for r in pruned], y=[r.last_value for r in pruned], mode="markers", name="Pruned Trial",
            marker={"color": PRUNED, "symbol": "x", "size": 8},
            text=[html.escape(f"#{r.number} pruned: {r.config}") for r in pruned],
            hovertemplate="%{text}<br>last request: %{y:.2f}<extra></extra>",
        ))
    fig.update_layout(title=f"Optimisation history: {data.objective_label}", xaxis_title="trial",
                      yaxis_title=data.objective_label, legend={"orientation": "h", "y": -0.2})
    return fig


def importances_figure(data: ReportData) -> go.Figure:
    """The importances as horizontal bars, the largest on top."""
    import plotly.graph_objects as go

    rows = list(reversed(data.importances))
    fig = go.Figure(go.Bar(
        x=[v for _, v in rows], y=[k for k, _ in rows], orientation="h", name=data.objective_label,
        text=["<0.01" if v < 0.01 else f"{v:.2f}" for _, v in rows], textposition="outside", cliponaxis=False,
        hovertemplate="%{y}: %{x:.3f}<extra></extra>",
    ))
    fig.update_layout(title=f"Setting importances for {data.objective_label}", xaxis_title="importance",
                      yaxis_title="setting")
    return fig


def effects_figure(data: ReportData) -> go.Figure:
    """Per searched setting, the objective's mean per value with its 95% interval (one panel a
    setting, the y axis shared so the panels compare); a value measured once has no bar."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    eff = data.effects
    params = eff.params if eff is not None else []
    if eff is None or not params:
        fig = go.Figure()
        fig.add_annotation(text="No parameter effects: no measured trial with searched parameters.",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
        fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False})
        return fig
    # The setting on the first line, its effect wrapped below: titles side by side never overlap.
    spacing = min(0.04, 0.4 / max(len(params) - 1, 1))
    lines = [[p.name, *wrap_title(p.effect_text(eff.log_scale), len(params), spacing)] for p in params]
    titles = ["<br>".join(html.escape(x) for x in t) for t in lines]
    fig = make_subplots(rows=1, cols=len(params), shared_yaxes=True, subplot_titles=titles,
                        horizontal_spacing=spacing)
    fig.update_annotations(font_size=TITLE_FONT_PX)
    mean = "geometric mean" if eff.log_scale else "mean"
    for col, p in enumerate(params, start=1):
        color = "#d62728" if p.name == eff.top else "#1f77b4"
        for with_ci in (True, False):
            sel = [v for v in p.values if (v.ci_low is not None) == with_ci]
            if not sel:
                continue
            fig.add_trace(go.Scatter(
                x=[str(v.value) for v in sel], y=[v.mean for v in sel], mode="markers", showlegend=False,
                marker={"color": color, "size": 10, "symbol": "circle" if with_ci else "circle-open"},
                error_y={"type": "data", "symmetric": False, "color": color, "thickness": 2, "width": 8,
                         "array": [(v.ci_high or v.mean) - v.mean for v in sel],
                         "arrayminus": [v.mean - (v.ci_low or v.mean) for v in sel]} if with_ci else None,
                text=[html.escape(eff.value_text(v) + (" trials" if v.n > 1 else " trial, no interval"))
                      for v in sel],
                hovertemplate=f"{html.escape(p.name)}=%{{text}}<extra></extra>",
            ), row=1, col=col)
        fig.update_xaxes(title_text=html.escape(p.name), type="category", categoryorder="array",
                         categoryarray=[str(v.value) for v in p.values], row=1, col=col)
    fig.update_yaxes(title_text=f"{data.objective_label} ({mean})", row=1, col=1)
    # The figure's own title at the very top, then room for the tallest panel title under it.
    top = 56 + max(len(t) for t in lines) * int(TITLE_FONT_PX * 1.3)
    fig.update_layout(title={"text": f"{data.objective_label} per value of each setting: {mean} and 95% CI",
                             "yref": "container", "y": 1, "yanchor": "top", "pad": {"t": 12}},
                      margin={"t": top})
    return fig


def drafting_figure(data: ReportData) -> go.Figure:
    """Decode tok/s against draft length, one line per workload prompt."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for prompt in dict.fromkeys(p.prompt for p in data.drafting):
        pts = [p for p in data.drafting if p.prompt == prompt]
        fig.add_trace(go.Scatter(
            x=[p.draft for p in pts], y=[p.decode_tps for p in pts], mode="lines+markers", name=prompt,
            marker={"symbol": ["x" if p.changed_output else "circle" for p in pts], "size": 9},
            error_y={"type": "data", "symmetric": False,
                     "array": [(p.ci95[1] - p.decode_tps) if p.ci95 else 0.0 for p in pts],
                     "arrayminus": [(p.decode_tps - p.ci95[0]) if p.ci95 else 0.0 for p in pts]},
            text=[f"{p.requests} requests; " + ("no draft counts" if p.acceptance is None
                                                else f"{p.acceptance:.0%} of drafts accepted")
                  + ("; output changed" if p.changed_output else "") for p in pts],
            hovertemplate="draft %{x}: %{y:.1f} tok/s<br>%{text}<extra>" + prompt + "</extra>",
        ))
    fig.update_layout(title="Decode tok/s by draft length", xaxis={"title": {"text": "draft_num_predict"},
                                                                   "dtick": 1},
                      yaxis_title="decode tok/s", legend={"orientation": "h", "y": -0.2})
    return fig


def _as_category(axis: ParamAxis) -> bool:
    return not axis.numeric or len(axis.categories) <= MAX_NUMERIC_CATEGORIES


def _scale(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    return lo, (hi - lo) or 1.0


def parallel_figure(data: ReportData) -> go.Figure:
    """One line per measured trial across the objective and each setting (each axis scaled to
    0..1), coloured by the objective; infeasible trials dotted.

    Lines of one colour band and feasibility share a trace (joined by gaps), so the figure has
    a few traces however many trials there are.
    """
    import plotly.colors
    import plotly.graph_objects as go

    pts, axes = data.param_points, data.params
    scale = plotly.colors.sequential.Blues[2:]
    values = [p.value for p in pts]
    vlo, vspan = _scale(values)
    index = [{v: i for i, v in enumerate(a.categories)} for a in axes]
    spans = [_scale([float(v) for v in a.categories]) if a.numeric else (0.0, float(max(len(a.categories) - 1, 1)))
             for a in axes]
    labels = [data.objective_label] + [a.name for a in axes]

    def position(i: int, v: Any) -> float | None:
        if v is None:
            return None
        lo, span = spans[i]
        return ((float(v) if axes[i].numeric else index[i][v]) - lo) / span

    # (band, feasible) -> xs, ys, hover
    groups: dict[tuple[int, bool], tuple[list[Any], list[Any], list[Any]]] = {}
    for p in pts:
        band = min(int((p.value - vlo) / vspan * len(scale)), len(scale) - 1)
        if not data.maximize:
            band = len(scale) - 1 - band  # darker is better either way
        xs, ys, hover = groups.setdefault((band, p.feasible), ([], [], []))
        ys.append((p.value - vlo) / vspan)
        hover.append(f"#{p.number} {labels[0]}: {p.value:.2f}")
        for i, a in enumerate(axes):
            v = p.params.get(a.name)
            ys.append(position(i, v))
            hover.append(html.escape(f"#{p.number} {a.name}: {v}"))
        xs.extend(range(len(labels)))
        xs.append(None)
        ys.append(None)
        hover.append("")
    fig = go.Figure()
    for (band, feasible), (xs, ys, hover) in sorted(groups.items()):
        fig.add_trace(go.Scatter(
            x=xs, y=ys, text=hover, mode="lines", showlegend=False, opacity=0.6,
            line={"color": scale[band], "width": 1.2, "dash": "solid" if feasible else "dot"},
            hovertemplate="%{text}<extra></extra>",
        ))
    if any(not p.feasible for p in pts):
        for name, dash in (("Feasible", "solid"), ("Infeasible", "dot")):
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name, hoverinfo="skip",
                                     line={"color": "#2F3B52", "dash": dash, "width": 2}))
    # The colour bar of the objective.
    fig.add_trace(go.Scatter(
        x=[None, None], y=[None, None], mode="markers", showlegend=False, hoverinfo="skip",
        marker={"color": [vlo, vlo + vspan], "cmin": vlo, "cmax": vlo + vspan, "colorscale": scale,
                "reversescale": not data.maximize, "showscale": True,
                "colorbar": {"title": {"text": data.objective_label}}},
    ))
    annotations = []
    for i, a in enumerate(axes):
        ticks = a.categories if _as_category(a) else [a.categories[0], a.categories[-1]]
        annotations += [{"x": i + 1, "y": position(i, v), "text": html.escape(str(v)), "showarrow": False,
                         "xanchor": "left", "xshift": 4, "font": {"size": 10}} for v in ticks]
    annotations += [{"x": 0, "y": y, "text": f"{vlo + y * vspan:.4g}", "showarrow": False, "xanchor": "left",
                     "xshift": 4, "font": {"size": 10}} for y in (0.0, 1.0)]
    fig.update_layout(
        title=f"Parallel coordinates: {data.objective_label} and the searched settings",
        xaxis={"tickmode": "array", "tickvals": list(range(len(labels))), "ticktext": labels,
               "range": (-0.2, len(labels) - 0.6), "showgrid": False, "zeroline": False},
        yaxis={"range": (-0.08, 1.08), "visible": False, "fixedrange": True},
        shapes=[{"type": "line", "x0": i, "x1": i, "y0": 0, "y1": 1, "line": {"color": "#888", "width": 1},
                 "layer": "below"} for i in range(len(labels))],
        annotations=annotations, hovermode="closest", plot_bgcolor="white",
        legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1, "yanchor": "bottom"},
    )
    return fig


def slice_figure(data: ReportData) -> go.Figure:
    """The objective against each searched setting, one panel a setting; infeasible in grey."""
    import plotly.colors
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    axes = data.params
    fig = make_subplots(rows=1, cols=len(axes), shared_yaxes=True)
    numbers = [p.number for p in data.param_points]
    cmin, cmax = (min(numbers), max(numbers)) if numbers else (0, 1)
    for col, a in enumerate(axes, start=1):
        category = _as_category(a)

        def x(p: TrialPoint, name: str = a.name, category: bool = category) -> Any:
            v = p.params.get(name)
            return str(v) if category else v

        have = [p for p in data.param_points if a.name in p.params]
        for name, sel in (("Feasible Trial", [p for p in have if p.feasible]),
                          ("Infeasible Trial", [p for p in have if not p.feasible])):
            if not sel and name == "Infeasible Trial":
                continue
            marker: dict[str, Any] = {"color": INFEASIBLE}
            if name == "Feasible Trial":
                marker = {"line": {"width": 0.5, "color": "Grey"}, "color": [p.number for p in sel],
                          "colorscale": plotly.colors.sequential.Blues, "cmin": cmin, "cmax": cmax,
                          "showscale": col == 1, "colorbar": {"title": {"text": "trial"}, "x": 1.0, "xpad": 40}}
            fig.add_trace(go.Scatter(
                x=[x(p) for p in sel], y=[p.value for p in sel], mode="markers", name=name, marker=marker,
                showlegend=False, text=[_text(p.number, p.config) for p in sel],
                hovertemplate="%{text}<br>%{y:.2f}<extra></extra>",
            ), row=1, col=col)
        fig.update_xaxes(title_text=a.name, row=1, col=col)
        if category:
            fig.update_xaxes(type="category", categoryorder="array", categoryarray=[str(v) for v in a.categories],
                             row=1, col=col)
    fig.update_yaxes(title_text=data.objective_label, row=1, col=1)
    fig.update_layout(title=f"{data.objective_label} against each searched setting")
    return fig


def tradeoff_figure(data: ReportData) -> go.Figure:
    """Throughput against p95 TTFT, the feasible Pareto front as steps, the TTFT limit dashed."""
    import plotly.graph_objects as go

    def hover(pts: Sequence[TradeoffPoint]) -> list[str]:
        return [_text(p.number, p.config) for p in pts]

    fig = go.Figure()
    groups = (
        ("feasible", [p for p in data.tradeoff if p.feasible and not p.pareto and not p.baseline],
         {"color": "#1f77b4", "symbol": "circle", "size": 9}),
        ("infeasible", [p for p in data.tradeoff if not p.feasible],
         {"color": "#aaaaaa", "symbol": "x", "size": 9}),
        (f"baseline ({defaults_name(data.header.engine)})", [p for p in data.tradeoff if p.baseline and not p.pareto],
         {"color": "#2ca02c", "symbol": "star", "size": 14}),
    )
    for name, pts, marker in groups:
        if pts:
            fig.add_trace(go.Scatter(
                x=[p.tps for p in pts], y=[p.ttft_ms_p95 for p in pts], mode="markers", name=name, marker=marker,
                text=hover(pts), hovertemplate="%{text}<br>%{x:.1f} tok/s, %{y:.0f} ms<extra></extra>",
            ))
    front = data.pareto
    if front:
        fig.add_trace(go.Scatter(
            x=[p.tps for p in front], y=[p.ttft_ms_p95 for p in front], mode="lines+markers",
            name="Pareto front (feasible)", line={"color": "#d62728", "shape": "hv"},
            marker={"color": "#d62728", "size": 11},
            text=hover(front), hovertemplate="%{text}<br>%{x:.1f} tok/s, %{y:.0f} ms<extra></extra>",
        ))
    if data.max_ttft_ms is not None:
        label = f"max TTFT {data.max_ttft_ms:g} ms"
        fig.add_hline(y=data.max_ttft_ms, line_dash="dash", line_color="#d62728",
                      annotation_text=None if data.tradeoff_log_y else label, annotation_position="top left")
        if data.tradeoff_log_y and data.max_ttft_ms > 0:
            # Shapes take data values on a log axis, annotations its log10.
            fig.add_annotation(text=label, xref="paper", x=0, xanchor="left", y=math.log10(data.max_ttft_ms),
                               yanchor="bottom", showarrow=False, font={"color": "#d62728"})
    fig.update_layout(title="Throughput vs p95 time to first token", xaxis_title=data.tps_label,
                      yaxis_title="p95 TTFT (ms)" + (", log scale" if data.tradeoff_log_y else ""),
                      legend={"orientation": "h", "y": -0.2})
    if data.tradeoff_log_x:
        fig.update_xaxes(type="log", title_text=f"{data.tps_label}, log scale")
    if data.tradeoff_log_y:
        fig.update_yaxes(type="log")
    return fig


def telemetry_figure(data: ReportData, view: TelemetryView) -> go.Figure:
    """One telemetry value against the rate, feasible and infeasible apart, with its limit."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, feas, color, symbol in (("feasible", True, "#1f77b4", "circle"), ("infeasible", False, "#aaaaaa", "x")):
        sel = [p for p in view.points if p.feasible == feas]
        if sel:
            fig.add_trace(go.Scatter(
                x=[p.tps for p in sel], y=[p.value for p in sel], mode="markers", name=name,
                marker={"color": color, "symbol": symbol, "size": 9}, text=[_text(p.number, p.config) for p in sel],
                hovertemplate="%{text}<br>%{x:.1f} tok/s, %{y:.2f}<extra></extra>",
            ))
    if view.limit is not None:
        fig.add_hline(y=view.limit, line_dash="dash", line_color="#d62728",
                      annotation_text=f"{view.limit_name} {view.limit:g}", annotation_position="top left")
    fig.update_layout(title=f"{view.label} against {data.tps_label}", xaxis_title=data.tps_label,
                      yaxis_title=view.label)
    return fig


def _trial_ticks(numbers: Sequence[int]) -> dict[str, Any]:
    """Ticks of a trial-number axis: one per trial while they fit, never one between two trials."""
    return {"dtick": 1} if numbers and max(numbers) - min(numbers) <= 20 else {"tickformat": "d"}


def prefill_figure(data: ReportData) -> go.Figure:
    """Prefill tok/s (mean ± sd over the requests) of each measured trial, infeasible in grey."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, feas, color, symbol in (("feasible", True, "#1f77b4", "circle"), ("infeasible", False, INFEASIBLE, "x")):
        sel = [p for p in data.prefill if p.feasible == feas]
        if sel:
            fig.add_trace(go.Scatter(
                x=[p.number for p in sel], y=[p.value for p in sel], mode="markers", name=name,
                marker={"color": color, "symbol": symbol, "size": 8},
                error_y={"type": "data", "array": [p.sd or 0.0 for p in sel], "color": color, "thickness": 1},
                text=[_text(p.number, p.config) for p in sel],
                hovertemplate="%{text}<br>%{y:.1f} tok/s<extra></extra>",
            ))
    fig.update_layout(title="Prefill tok/s per trial (mean ± sd)", xaxis={"title": {"text": "trial"}, **_trial_ticks([p.number for p in data.prefill])},
                      yaxis_title="prefill tok/s", legend={"orientation": "h", "y": -0.2})
    return fig


def host_figure(data: ReportData) -> go.Figure:
    """Each host telemetry value per trial, one panel a value, the trials on a shared axis."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    series = data.host
    fig = make_subplots(rows=len(series), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[html.escape(s.label) for s in series])
    for row, s in enumerate(series, start=1):
        for feas, color, symbol in ((True, "#1f77b4", "circle"), (False, INFEASIBLE, "x")):
            sel = [p for p in s.points if p.feasible == feas]
            if sel:
                fig.add_trace(go.Scatter(
                    x=[p.number for p in sel], y=[p.value for p in sel], mode="markers",
                    name="feasible" if feas else "infeasible", legendgroup="feasible" if feas else "infeasible",
                    showlegend=row == 1, marker={"color": color, "symbol": symbol, "size": 7},
                    text=[_text(p.number, p.config) for p in sel],
                    hovertemplate=f"%{{text}}<br>{html.escape(s.label)}: %{{y:.1f}}<extra></extra>",
                ), row=row, col=1)
        fig.update_yaxes(title_text=html.escape(s.label.rsplit(" ", 1)[-1]), row=row, col=1)
    fig.update_xaxes(**_trial_ticks([p.number for s in series for p in s.points]))
    fig.update_xaxes(title_text="trial", row=len(series), col=1)
    fig.update_layout(title="Host CPU and memory per trial", height=max(380, 220 * len(series)),
                      legend={"orientation": "h", "y": -0.12})
    return fig


#: Timeline bar colours by outcome, as optuna-dashboard colours trial states.
OUTCOME_COLORS = {"feasible": "#1f77b4", "infeasible": "#aaaaaa", "pruned": "#ff7f0e", "failed": "#d62728",
                  "running": "#2ca02c", "waiting": "#9467bd"}


def timeline_figure(data: ReportData) -> go.Figure:
    """One bar per finished trial from its start to its end, coloured by outcome, with the
    model (re)load it began with drawn darker over its start."""
    import plotly.graph_objects as go

    fig = go.Figure()
    outcomes = list(dict.fromkeys(r.outcome for r in data.timeline))
    for outcome in outcomes:
        sel = [r for r in data.timeline if r.outcome == outcome]
        fig.add_trace(go.Bar(
            base=[r.start for r in sel], x=[r.duration_s * 1000.0 for r in sel], y=[r.number for r in sel],
            orientation="h", name=outcome, marker={"color": OUTCOME_COLORS.get(outcome, "#7f7f7f")},
            text=[html.escape(f"#{r.number} {outcome}, {r.duration_s:.1f} s: {r.config}") for r in sel],
            textposition="none", hovertemplate="%{text}<extra></extra>",
        ))
    loads = [r for r in data.timeline if r.reload_ms]
    if loads:
        fig.add_trace(go.Bar(
            base=[r.start for r in loads], x=[r.reload_ms for r in loads], y=[r.number for r in loads],
            orientation="h", name="model (re)load", width=0.4, marker={"color": "#2F3B52"},
            text=[f"#{r.number} reload {r.reload_ms:,.0f} ms" for r in loads], textposition="none",
            hovertemplate="%{text}<extra></extra>",
        ))
    fig.update_layout(title="Timeline of trials", barmode="overlay", xaxis={"type": "date", "title": "time"},
                      yaxis={"title": "trial", "autorange": "reversed"}, legend={"orientation": "h", "y": -0.2},
                      height=max(380, min(1200, 60 + 14 * len(data.timeline))))
    return fig


def validation_figure(data: ReportData) -> go.Figure:
    """Each re-validated config's mean with its 95% interval, and its value during the search."""
    import plotly.graph_objects as go

    label = objectives.label(data.validation_objective)
    rows = [r for r in data.validation if r.mean is not None]

    def bar(r: ValidationRow) -> tuple[float, float]:
        """(above, below) the mean, for the error bars."""
        m = r.mean or 0.0
        return (r.ci_high - m if r.ci_high is not None else 0.0, m - r.ci_low if r.ci_low is not None else 0.0)

    fig = go.Figure()
    for name, sel, color in (("re-validated", [r for r in rows if not r.winner], "#1f77b4"),
                             ("winner", [r for r in rows if r.winner], "#d62728")):
        if not sel:
            continue
        fig.add_trace(go.Scatter(
            x=[f"#{r.number}" for r in sel], y=[r.mean for r in sel], mode="markers", name=name,
            marker={"color": color, "size": 13 if name == "winner" else 10,
                    "symbol": "star" if name == "winner" else "circle"},
            error_y={"type": "data", "symmetric": False, "color": color, "thickness": 2, "width": 8,
                     "array": [bar(r)[0] for r in sel], "arrayminus": [bar(r)[1] for r in sel]},
            text=[_text(r.number, r.config) for r in sel],
            hovertemplate="%{text}<br>mean %{y:.2f}<extra></extra>",
        ))
    searched = [r for r in rows if r.search_value is not None]
    if searched:
        fig.add_trace(go.Scatter(
            x=[f"#{r.number}" for r in searched], y=[r.search_value for r in searched], mode="markers",
            name="value during the search", marker={"color": "#7f7f7f", "symbol": "diamond-open", "size": 10},
            hovertemplate="value during the search: %{y:.2f}<extra></extra>",
        ))
    fig.update_layout(title=f"Re-validated {label}: mean and 95% CI", xaxis_title="trial", yaxis_title=label,
                      xaxis={"type": "category", "categoryorder": "array",
                             "categoryarray": [f"#{r.number}" for r in rows]},
                      legend={"orientation": "h", "y": -0.2}, height=380)
    return fig


def draw(data: ReportData) -> list[NamedFigure]:
    """Every figure the data supports, in report order."""
    figs: list[NamedFigure] = []
    if data.history:
        failed = "failed loads, scored 0" if data.maximize else "failed loads are left out"
        caption = (f"Every complete trial by number; infeasible ones (a limit broken; {failed}) are drawn "
                   "apart from the feasible ones and the best-feasible line.")
        if any(r.last_value is not None for r in data.pruned):
            caption += (" Pruned trials (grey crosses) show the last request measured before they "
                        "were stopped; they never count as best.")
        figs.append(NamedFigure("history", "Optimisation history", history_figure(data), caption))
    if data.params:
        note = f" {data.param_note}" if data.param_note else ""
        eff = data.effects
        if eff is not None and eff.params:
            how = ("geometric mean and its 95% t interval on the log scale" if eff.log_scale
                   else "mean and its 95% t interval")
            figs.append(NamedFigure(
                "effects", "Parameter effects", effects_figure(data),
                f"{eff.n_trials} measured trials; per value, the {how} (open circles: measured once, no "
                f"interval); the setting the verdict names is drawn in red. {MARGINAL}" + note))
        if data.drafting:
            figs.append(NamedFigure(
                "drafting", "Decode against draft length, per workload prompt", drafting_figure(data),
                "Every measured request of the trials at each draft length (0: no drafting), by prompt: "
                "geometric mean and its 95% interval; hover for the accepted share of the drafts. Drafting "
                "pays where the answer copies its prompt and little in free chat; a draft length whose greedy "
                "output differed is marked (such configs are infeasible)." + note))
        if data.importances:
            figs.append(NamedFigure("importances", "Parameter importances", importances_figure(data),
                                    f"How much each setting explains the objective (PED-ANOVA) over "
                                    f"{len(data.param_points)} measured trials (shown from "
                                    f"{MIN_TRIALS_FOR_IMPORTANCES}); a ranking without intervals: "
                                    "Parameter effects above says how sure each effect is." + note))
        figs.append(NamedFigure("parallel", "Parallel coordinates", parallel_figure(data),
                                "Each line is a measured trial, darker is better; infeasible ones are dotted." + note))
        figs.append(NamedFigure("slices", f"{data.objective_label} against each parameter", slice_figure(data),
                                "Baseline and failed loads are left out (they have no parameters or no "
                                "measurement)." + note))
    if data.tradeoff:
        figs.append(NamedFigure(
            "tradeoff", "Throughput vs time to first token", tradeoff_figure(data),
            "Upper left is worse, lower right is better; the red steps join the feasible Pareto front.",
        ))
    for view in data.telemetry:
        figs.append(NamedFigure(view.key, f"{view.label} against {data.tps_label}", telemetry_figure(data, view),
                                view.caption))
    if data.prefill:
        figs.append(NamedFigure("prefill", "Prefill tok/s per trial", prefill_figure(data),
                                "Prompt processing speed of each measured trial: mean and sd over its requests."))
    if data.host:
        figs.append(NamedFigure("host", "Host CPU and memory per trial", host_figure(data),
                                "Sampled with psutil while each trial's measured requests ran: the machine's "
                                "CPU use (a share of all its cores), its peak memory in use and the inference "
                                "server's peak resident memory (RSS)."))
    if data.timeline:
        figs.append(NamedFigure("timeline", "Timeline of trials", timeline_figure(data),
                                "Each finished trial from its start to its end, coloured by outcome; the dark "
                                "bar at its start is the model (re)load it began with."))
    if any(r.mean is not None for r in data.validation):
        figs.append(NamedFigure(
            "validation", "Re-validation of the top configurations", validation_figure(data),
            "Each config re-measured in interleaved rounds: mean with its 95% confidence interval; the "
            "diamond is the single value it scored during the search.",
        ))
    if data.drift is not None:
        figs.append(NamedFigure(
            "drift", "The winner's speed over time", drift_figure(data),
            "The stored measurement, then each `tune check`: geometric mean with its 95% interval, the "
            "defaults measured in the same rounds; a dotted line marks where the environment changed "
            "(server version, GPU, driver, model, CPU).",
        ))
    return figs


def drift_figure(data: ReportData) -> go.Figure:
    """The winner's value at the stored measurement and at each check, the defaults beside it, and
    a marked line at each check whose environment differs from the point before."""
    import plotly.graph_objects as go

    series = data.drift
    fig = go.Figure()
    if series is None:
        return fig
    pts = series.points
    fig.add_trace(go.Scatter(
        x=[p.at for p in pts], y=[p.winner for p in pts], mode="lines+markers", name=f"winner #{series.winner_trial}",
        line={"color": "#d62728"},
        marker={"size": 10, "color": ["#7f7f7f" if p.kind == "stored" else "#d62728" for p in pts],
                "symbol": ["diamond" if p.kind == "stored" else "circle" for p in pts]},
        error_y={"type": "data", "symmetric": False, "color": "#d62728",
                 "array": [p.winner_ci95[1] - p.winner if p.winner_ci95 else 0.0 for p in pts],
                 "arrayminus": [p.winner - p.winner_ci95[0] if p.winner_ci95 else 0.0 for p in pts]},
        text=[html.escape(f"{p.kind}" + (f": {'; '.join(p.changes)}" if p.changes else "")) for p in pts],
        hovertemplate="%{text}<br>%{y:.2f}<extra></extra>",
    ))
    base = [p for p in pts if p.defaults is not None]
    if base:
        fig.add_trace(go.Scatter(
            x=[p.at for p in base], y=[p.defaults for p in base], mode="lines+markers",
            name=defaults_name(data.header.engine), line={"color": "#2ca02c", "dash": "dash"},
            hovertemplate="defaults %{y:.2f}<extra></extra>",
        ))
    # Shapes and annotations by hand: add_vline cannot annotate a date axis.
    fig.update_layout(
        title=f"{series.label} of the winner over time", xaxis={"type": "date", "title": "time"},
        yaxis_title=series.label, legend={"orientation": "h", "y": -0.2},
        shapes=[{"type": "line", "xref": "x", "yref": "paper", "x0": p.at, "x1": p.at, "y0": 0, "y1": 1,
                 "line": {"color": "#ff7f0e", "dash": "dot"}} for p in series.marked],
        annotations=[{"x": p.at, "y": 1, "xref": "x", "yref": "paper", "yanchor": "bottom", "showarrow": False,
                      "text": html.escape(changes_text(p.new_changes)),
                      "font": {"size": 10, "color": "#ff7f0e"}} for p in series.marked],
    )
    return fig
