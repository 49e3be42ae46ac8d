"""The dashboard's page: three tabs (live, measurements, comparison) and what each holds, by id.

Ids are the contract of the page (the browser test and the benchmark find things by them):
``orbit`` (the orbit graph), ``tunes``, ``history``, ``beam-sizes``, ``status``, ``beam-lost-banner``;
``measurement-form`` with ``measurement-kind``, ``measurement-parameters``, ``measurement-token``,
``start-measurement``; ``measurement-list``, ``measurement-select``, ``result-plot``; ``compare-mode``,
``compare-orbit``, ``state-name``, ``save-state``, ``saved-select``, ``compare-a``, ``compare-b``,
``compare-result``.
"""

from __future__ import annotations

import json

from dash import dcc, html
from twinioc.studies.machine import MachineLayout
from twinioc.studies.requests import KINDS

from . import figures

LIVE_PERIOD_MS = 100  # the orbit and the numbers: asked for 10 times a second
SLOW_PERIOD_MS = 1000  # history, beam sizes, the measurement list

CARD = {"border": "1px solid #ddd", "borderRadius": "4px", "padding": "6px 10px", "margin": "4px",
        "minWidth": "140px", "background": "#fafafa"}
BANNER = {"background": "#b00020", "color": "white", "padding": "8px 12px", "fontWeight": "bold",
          "fontSize": "18px"}
HIDDEN = {"display": "none"}
ROW = {"display": "flex", "flexWrap": "wrap", "alignItems": "flex-start"}


def default_parameters(layout: MachineLayout, kind: str) -> dict:
    """A request of *kind* that runs as it stands: the required names filled with the machine's first
    device that fits."""
    if kind == "bba":
        quad = next(c for c in layout.of_kind("quadrupole") if len(c.magnets) == 1)
        return {"quadrupole": quad.magnets[0]}
    if kind == "tune_response":
        return {"converters": [layout.of_kind("quadrupole")[0].name]}
    return {}


def page(layout: MachineLayout, is_twin: bool, qx: float, qy: float) -> html.Div:
    target = "twin" if is_twin else "machine"
    return html.Div([
        html.Div([html.H2(f"twinioc · {layout.name}", style={"margin": "0 16px 0 0"}),
                  html.Span(f"target: {target} · prefix {layout.prefix or '(none)'}", id="target")],
                 style={"display": "flex", "alignItems": "baseline", "padding": "6px 8px"}),
        html.Div(id="beam-lost-banner", style=HIDDEN),
        dcc.Tabs(id="views", value="live", children=[
            dcc.Tab(label="Live", value="live", children=live(qx, qy)),
            dcc.Tab(label="Measurements", value="measurements", children=measurements(layout)),
            dcc.Tab(label="Compare", value="compare", children=compare()),
        ]),
        dcc.Interval(id="live-tick", interval=LIVE_PERIOD_MS),
        dcc.Interval(id="slow-tick", interval=SLOW_PERIOD_MS),
        dcc.Store(id="orbit-seen", data=[-1, None]),  # orbit updates shown, whether the model orbit is drawn
        # the tick the page asked the service for, and the last one it answered: one question at a time
        dcc.Store(id="live-asked", data=0), dcc.Store(id="live-answered", data=0),
        dcc.Store(id="result-seen", data=None),
    ], style={"fontFamily": "sans-serif", "fontSize": "14px"})


def live(qx: float, qy: float) -> html.Div:
    return html.Div([
        html.Div(id="status", style=ROW),
        dcc.Graph(id="orbit", figure=figures.message("waiting for the orbit"), style={"height": "460px"}),
        html.Div([
            dcc.Graph(id="tunes", figure=figures.tune_diagram(qx, qy), style={"height": "420px", "width": "440px"}),
            dcc.Graph(id="history", figure=figures.message("collecting"), style={"height": "420px", "flex": "1"}),
        ], style=ROW),
        dcc.Graph(id="beam-sizes", figure=figures.message("waiting for the equilibrium"), style={"height": "380px"}),
    ])


def measurements(layout: MachineLayout) -> html.Div:
    kind = "bba"
    form = html.Div(id="measurement-form", children=[
        html.H4("Start a measurement"),
        html.Label("kind"),
        dcc.Dropdown(id="measurement-kind", options=list(KINDS), value=kind, clearable=False,
                     style={"width": "260px"}),
        html.Label("parameters (JSON; left out: the default)"),
        dcc.Textarea(id="measurement-parameters", value=json.dumps(default_parameters(layout, kind)),
                     style={"width": "100%", "height": "80px", "fontFamily": "monospace"}),
        html.Label("token (when the service has one)"),
        dcc.Input(id="measurement-token", type="password", style={"width": "260px"}),
        html.Div(html.Button("Start", id="start-measurement", n_clicks=0), style={"marginTop": "6px"}),
        html.Div(id="start-message", style={"marginTop": "6px", "whiteSpace": "pre-wrap"}),
    ], style={"width": "360px", "padding": "8px"})
    results = html.Div([
        html.H4("Measurements"),
        html.Div(id="measurement-list", style={"maxHeight": "260px", "overflowY": "auto"}),
        dcc.Dropdown(id="measurement-select", placeholder="a measurement to plot", style={"width": "420px"}),
        html.Div(id="measurement-progress"),
        dcc.Graph(id="result-plot", figure=figures.message("choose a measurement"), style={"height": "520px"}),
    ], style={"flex": "1", "padding": "8px", "minWidth": "500px"})
    return html.Div([form, results], style=ROW)


def compare() -> html.Div:
    return html.Div([
        html.H4("Two states of the orbit"),
        dcc.RadioItems(id="compare-mode", value="model", inline=True, options=[
            {"label": " readings against the model's orbit ", "value": "model"},
            {"label": " now against a saved state ", "value": "saved"}]),
        html.Div([dcc.Input(id="state-name", placeholder="name", style={"width": "160px"}),
                  html.Button("Save the state now", id="save-state", n_clicks=0),
                  dcc.Dropdown(id="saved-select", placeholder="a saved state", style={"width": "300px"}),
                  html.Span(id="save-message")], style=ROW),
        dcc.Graph(id="compare-orbit", figure=figures.message("waiting for the orbit"), style={"height": "460px"}),
        html.Div(id="compare-numbers"),
        html.H4("One measurement against another of the same kind"),
        html.Div([dcc.Dropdown(id="compare-a", placeholder="measurement", style={"width": "340px"}),
                  dcc.Dropdown(id="compare-b", placeholder="against", style={"width": "340px"})], style=ROW),
        dcc.Graph(id="compare-result", figure=figures.message("choose two measurements"), style={"height": "520px"}),
    ], style={"padding": "8px"})


def card(label: str, value: str, id: str | None = None) -> html.Div:
    return html.Div([html.Div(label, style={"color": "#666", "fontSize": "12px"}),
                     html.Div(value, style={"fontSize": "16px", "whiteSpace": "pre-wrap"})],
                    style=CARD, **({"id": id} if id else {}))


def measurement_table(records: list[dict]) -> html.Table:
    head = html.Tr([html.Th(h, style={"textAlign": "left", "paddingRight": "12px"})
                    for h in ("id", "kind", "status", "progress", "devices", "created")])
    rows = [html.Tr([html.Td(r["id"]), html.Td(r["kind"]), html.Td(r["status"]),
                     html.Td(html.Progress(value=str(r.get("progress") or 0), max="1")),
                     html.Td(", ".join(r.get("devices") or [])[:60]), html.Td((r.get("created") or "")[:19])])
            for r in records]
    return html.Table([html.Thead(head), html.Tbody(rows)], style={"borderCollapse": "collapse"})
