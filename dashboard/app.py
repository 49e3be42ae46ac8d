"""The dashboard (Dash) in the measurement service's process, mounted at ``/`` beside the REST API.

``create_dashboard`` wires the page of ``views`` to its data: the live views to the ``LiveFeed``
(CA monitors), the measurement views to the ``MeasurementService`` (the same calls the REST API
makes, the same token), the comparisons to ``SavedStates`` and the records. Every file the page
loads is Dash's and Plotly's own, served from here: no CDN.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
from a2wsgi import WSGIMiddleware
from dash import Dash, Input, Output, Patch, State, no_update
from fastapi import FastAPI
from twinioc.studies.requests import RequestError
from twinioc.studies.service import MeasurementService
from twinioc.studies.web import token_accepted

from . import figures, views
from .feed import LiveFeed, LiveState
from .saved import SavedStates


def mount(api: FastAPI, service: MeasurementService, token: str | None = None, shadow: str | None = None) -> LiveFeed:
    """Serve the dashboard at ``/`` of *api* (after its own routes); the feed, to stop with the service.
    *shadow*: the prefix of a ``twinioc shadow`` following the machine: its model is the one shown."""
    feed = LiveFeed(service.layout, shadow).start(service)
    dashboard = create_dashboard(service, feed, SavedStates(service.state_dir), token)
    api.mount("/", WSGIMiddleware(dashboard.server))
    return feed


def create_dashboard(service: MeasurementService, feed: LiveFeed, saved: SavedStates,
                     token: str | None = None) -> Dash:
    layout = service.layout
    engine = service.instruments.engine
    optics = engine.bpm_optics()  # the model's optics at the BPMs: positions, beam sizes, dispersion
    harmonic = engine.ring.harmonic_number
    app = Dash(__name__, title=f"twinioc {layout.name}", update_title=None, serve_locally=True,
               suppress_callback_exceptions=True)

    def page():
        feed.watch()
        return views.page(layout, service.is_twin(), *feed.state().fractional_tunes(harmonic))

    app.layout = page
    bpms = list(layout.orbit.bpms)

    # A tick asks the service only when its last question was answered (or went unanswered for 2 s).
    # Dash drops the answer to a question asked again before it came back: with a tick faster than
    # the service answers (a busy host), no answer would ever be shown.
    app.clientside_callback(
        """function(tick, asked, answered) {
            if (asked > answered && tick - asked < 20) { return window.dash_clientside.no_update; }
            return tick;
        }""",
        Output("live-asked", "data"), Input("live-tick", "n_intervals"), State("live-asked", "data"),
        State("live-answered", "data"))

    @app.callback(Output("orbit", "figure"), Output("orbit-seen", "data"), Output("status", "children"),
                  Output("beam-lost-banner", "children"), Output("beam-lost-banner", "style"),
                  Output("tunes", "figure"), Output("live-answered", "data"), Input("live-asked", "data"),
                  State("orbit-seen", "data"), State("views", "value"))
    def live(asked, seen, view):
        return (*_live(asked, seen, view), asked)

    def _live(_, seen, view):
        feed.watch()
        state = feed.state()
        banner = _banner(state)
        if view != "live":
            return no_update, no_update, no_update, *banner, no_update
        orbit, drawn = no_update, seen
        if state.orbit_updates > 0 and state.orbit_updates != seen[0]:
            orbit, drawn = _orbit_update(state, optics["s_m"], bpms, seen[1])
        tunes = Patch()
        qx, qy = state.fractional_tunes(harmonic)
        tunes["data"][-1]["x"], tunes["data"][-1]["y"] = [_finite(qx)], [_finite(qy)]
        return orbit, drawn, _status(state, feed, qx, qy), *banner, tunes

    @app.callback(Output("history", "figure"), Output("beam-sizes", "figure"), Input("slow-tick", "n_intervals"),
                  State("views", "value"))
    def slow(_, view):
        if view != "live":
            return no_update, no_update
        state = feed.state()
        return figures.history(feed.history()), figures.beam_sizes(
            optics, bpms, state.get("emittance_x_nm"), state.get("emittance_y_nm"), state.get("energy_spread"))

    _measurement_callbacks(app, service, optics, token)
    _compare_callbacks(app, feed, saved, optics, bpms, harmonic)
    return app


def _orbit_update(state: LiveState, s_m, bpms: list[str], drawn_with_model: bool | None) -> tuple:
    """The orbit graph's next figure: the whole figure when its traces change (the first, a model
    orbit appearing or going), else a patch of the readings alone (cheap: the page redraws at the
    rate the ticks come). With what is drawn now: (updates shown, whether the model is drawn)."""
    model = _true_orbit(state)
    readings = {"x": state.orbit_x_mm, "y": state.orbit_y_mm}
    if drawn_with_model is None or drawn_with_model != (model is not None):
        return figures.orbit(s_m, bpms, readings, model), [state.orbit_updates, model is not None]
    patch, per_plane, order = Patch(), 2 if model is not None else 1, figures.along_ring(s_m)
    for k, plane in enumerate(figures.PLANES):
        patch["data"][k * per_plane]["y"] = figures.plotted(readings[plane], order).tolist()
        if model is not None:
            patch["data"][k * per_plane + 1]["y"] = figures.plotted(model[plane], order).tolist()
    return patch, [state.orbit_updates, model is not None]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _true_orbit(state: LiveState) -> dict | None:
    x, y = state.get("true_orbit_x"), state.get("true_orbit_y")
    return None if x is None or y is None else {"x": np.asarray(x, float), "y": np.asarray(y, float)}


def _shadow_numbers(state: LiveState) -> str:
    """The shadow's own comparison, where it is one: its link, its tunes against the machine's, the rms."""
    if state.get("shadow_connected") is None:
        return ""
    link = "follows the machine" if state.get("shadow_connected") else "has LOST the machine"
    tunes = ", ".join(f"{_number(state, f'shadow_tune_{p}', 4)} ({_number(state, f'shadow_tune_residual_{p}', 4)})"
                      for p in "xy")
    rms = ", ".join(_number(state, f"shadow_residual_{p}", 3) for p in "xy")
    return f"shadow {link}; model tunes {tunes} (machine − model); orbit residual rms x, y {rms} mm"


def _banner(state: LiveState) -> tuple:
    if not state.get("beam_lost"):
        return "", views.HIDDEN
    return f"BEAM LOST: {state.get('lost_reason') or 'no reason given'}", views.BANNER


def _number(state: LiveState, role: str, digits: int, scale: float = 1.0) -> str:
    """A served value as shown: "—" when not served, "∞", and "(invalid)" when the IOC says so."""
    value = state.get(role)
    if value is None:
        return "—"
    shown = "∞" if math.isinf(float(value)) else f"{float(value) * scale:.{digits}f}"
    return f"{shown} (invalid)" if role in state.invalid else shown


def _status(state: LiveState, feed: LiveFeed, qx: float, qy: float) -> list:
    card, n = views.card, _number
    feedback = state.get("feedback_state") or (
        f"mode {state.get('feedback_run_mode')}" if state.get("feedback_run_mode") is not None else "—")
    switch = state.get("feedback_switch")
    faults = state.get("fault_list") or ("none" if state.get("fault_count") is not None else "—")
    missing = feed.missing()
    cards = [
        card("current (mA)", n(state, "beam_current", 3)),
        card("lifetime (h)", f"{n(state, 'lifetime_h', 2)} · 100 s fit {n(state, 'measured_lifetime_100s', 2)}"),
        card("RF (kHz)", f"{state.rf_khz:.4f}" if math.isfinite(state.rf_khz) else "—"),
        card("tunes Qx, Qy", f"{qx:.4f}, {qy:.4f}" if math.isfinite(qx) else "—", id="tune-values"),
        card("chromaticity ξx, ξy", f"{n(state, 'chrom_x', 2)}, {n(state, 'chrom_y', 2)}"),
        card("emittance εx (nm), εy (pm)", f"{n(state, 'emittance_x_nm', 3)}, {n(state, 'emittance_y_nm', 2, 1e3)}"),
        card("σδ (10⁻⁴) · σs (mm)", f"{n(state, 'energy_spread', 3, 1e4)} · {n(state, 'bunch_length_mm', 2)}"),
        card("lattice version", n(state, "version", 0), id="lattice-version"),
        card("orbit age (s)", f"{time.time() - state.orbit_stamp:.2f}" if math.isfinite(state.orbit_stamp) else "—",
             id="orbit-age"),
        card("orbit feedback", f"{'ON' if switch else 'OFF' if switch is not None else ''} {feedback}".strip(),
             id="feedback"),
        card(f"faults ({n(state, 'fault_count', 0)})", faults, id="faults"),
    ]
    if missing:
        cards.append(card("not served by the target", ", ".join(missing)))
    return cards


def _measurement_callbacks(app: Dash, service: MeasurementService, optics: dict, token: str | None) -> None:
    @app.callback(Output("measurement-parameters", "value"), Input("measurement-kind", "value"))
    def parameters(kind):
        return json.dumps(views.default_parameters(service.layout, kind))

    def newest(kind: str | None = None) -> list[dict]:
        """The records, newest first (the store keeps them oldest first)."""
        return service.records.list(kind)[::-1]

    def options(records: list[dict]) -> list[dict]:
        return [{"label": f"{r['id']} {r['kind']} ({r['status']})", "value": r["id"]} for r in records[:200]]

    @app.callback(Output("start-message", "children"), Output("measurement-select", "value"),
                  Output("measurement-select", "options", allow_duplicate=True),
                  Input("start-measurement", "n_clicks"), State("measurement-kind", "value"),
                  State("measurement-parameters", "value"), State("measurement-token", "value"),
                  prevent_initial_call=True)
    def start(_, kind, text, given):
        if not token_accepted(token, given):
            return "refused: this service needs its token to start a measurement", no_update, no_update
        try:
            fields = json.loads(text or "{}")
        except ValueError as err:
            return f"the parameters are not JSON: {err}", no_update, no_update
        if not isinstance(fields, dict):
            return "the parameters must be a JSON object", no_update, no_update
        try:
            record = service.submit(fields | {"kind": kind})
        except RequestError as err:
            return f"refused: {err}", no_update, no_update
        return f"measurement {record['id']} queued", record["id"], options(newest())

    @app.callback(Output("measurement-list", "children"), Output("measurement-select", "options"),
                  Output("compare-a", "options"), Input("slow-tick", "n_intervals"), State("views", "value"))
    def listing(_, view):
        if view == "live":
            return no_update, no_update, no_update
        records = newest()
        shown = options(records)
        return views.measurement_table(records[:50]), shown, shown

    @app.callback(Output("result-plot", "figure"), Output("measurement-progress", "children"),
                  Output("result-seen", "data"), Input("measurement-select", "value"),
                  Input("slow-tick", "n_intervals"), State("result-seen", "data"))
    def result(id, _, seen):
        if not id:
            return no_update, "", None
        try:
            record = service.records.get(id)
        except KeyError:
            return figures.message(f"no measurement {id}"), "", None
        progress = f"{record['status']} · {100 * (record.get('progress') or 0):.0f} %"
        if [id, record["status"]] == seen:
            return no_update, progress, no_update
        model = optics if record["kind"] == "dispersion" else None
        return figures.result_figure(record, model_eta=model), progress, [id, record["status"]]

    @app.callback(Output("compare-b", "options"), Input("compare-a", "value"), Input("compare-a", "options"))
    def partners(id, _):
        try:
            kind = service.records.get(id)["kind"] if id else None
        except KeyError:
            kind = None
        return options([r for r in newest(kind) if r["id"] != id]) if kind else []

    @app.callback(Output("compare-result", "figure"), Input("compare-a", "value"), Input("compare-b", "value"))
    def against(a, b):
        if not a:
            return figures.message("choose two measurements")
        first = service.records.get(a)
        second = service.records.get(b) if b else None
        model = optics if first["kind"] == "dispersion" else None
        return figures.result_figure(first, second, model_eta=model)


def _compare_callbacks(app: Dash, feed: LiveFeed, saved: SavedStates, optics: dict, bpms: list[str],
                       harmonic: int) -> None:
    @app.callback(Output("save-message", "children"), Output("saved-select", "options"),
                  Output("saved-select", "value"), Input("save-state", "n_clicks"), State("state-name", "value"))
    def save(clicks, name):
        if not clicks:
            return "", saved.names(), no_update
        state = feed.state()
        qx, qy = state.fractional_tunes(harmonic)
        try:
            saved.save(name, {"orbit_x_mm": state.orbit_x_mm.tolist(), "orbit_y_mm": state.orbit_y_mm.tolist(),
                              "tune_x": qx, "tune_y": qy, "rf_khz": state.rf_khz,
                              "current_mA": state.get("beam_current"), "version": state.get("version")})
        except ValueError as err:
            return f"not saved: {err}", no_update, no_update
        return f"saved {name}", saved.names(), name

    @app.callback(Output("compare-orbit", "figure"), Output("compare-numbers", "children"),
                  Input("slow-tick", "n_intervals"), Input("compare-mode", "value"), Input("saved-select", "value"),
                  State("views", "value"))
    def orbits(_, mode, name, view):
        if view != "compare":
            return no_update, no_update
        feed.watch()
        state = feed.state()
        now = {"x": state.orbit_x_mm, "y": state.orbit_y_mm}
        if mode == "model":
            model = _true_orbit(state)
            if model is None:
                return figures.message("no model orbit: a twin serves ORBIT:TRUE:X/Y, a shadow (twinioc web "
                                       "--shadow PREFIX) PREFIXORBIT:X/Y"), ""
            return figures.orbit(optics["s_m"], bpms, now, other=model, other_label="model",
                                 difference=True), _shadow_numbers(state)
        then = saved.get(name) if name else None
        if then is None:
            return figures.message("save a state, or choose one"), ""
        figure = figures.orbit(optics["s_m"], bpms, now, other={"x": np.asarray(then["orbit_x_mm"]),
                                                                "y": np.asarray(then["orbit_y_mm"])},
                               other_label=name, difference=True)
        qx, qy = state.fractional_tunes(harmonic)
        numbers = (f"tunes now {qx:.4f}, {qy:.4f}; {name} ({then['saved']}) {then['tune_x']:.4f}, "
                   f"{then['tune_y']:.4f}; RF now {state.rf_khz:.4f} kHz, then {then['rf_khz']:.4f} kHz")
        return figure, numbers
