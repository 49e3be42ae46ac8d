"""The dashboard's plots as Plotly figures, from plain numbers: no EPICS, no Dash, testable alone.

Live: the orbit per BPM (``orbit``), the tune diagram with its resonance lines (``tune_diagram``),
current and lifetime over time (``history``), the beam sizes at the BPMs (``beam_sizes``).
Results, as a physicist reads each kind (``result_figure``): BBA's response lines and their zero
crossing, an ORM's heat map, chromaticity's tunes against δ with the fit, dispersion per BPM against
the model's. Comparisons draw a second state beside the first.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from fractions import Fraction

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PLANES = ("x", "y")
COLOURS = {"reading": "#1f77b4", "model": "#d62728", "other": "#7f7f7f", "difference": "#2ca02c"}
ORDER_STYLE = {1: ("#000000", 2.5), 2: ("#d62728", 1.8), 3: ("#1f77b4", 1.2), 4: ("#7f7f7f", 0.8)}
LAYOUT = {"margin": {"l": 60, "r": 20, "t": 40, "b": 40}, "template": "plotly_white",
          "legend": {"orientation": "h", "y": 1.12}, "uirevision": "keep"}


def _figure(rows: int = 1, titles: tuple[str, ...] = (), shared_x: bool = True) -> go.Figure:
    spacing = 0.12 if shared_x else 0.2  # room for each row's own x title
    figure = make_subplots(rows=rows, cols=1, shared_xaxes=shared_x, subplot_titles=titles, vertical_spacing=spacing)
    figure.update_layout(**LAYOUT)
    return figure


def message(text: str) -> go.Figure:
    """An empty plot that says why it is empty."""
    figure = go.Figure(layout=LAYOUT)
    figure.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    figure.update_xaxes(visible=False).update_yaxes(visible=False)
    return figure


# -- live ---------------------------------------------------------------------------------------

def along_ring(s_m) -> np.ndarray:
    """The BPMs' order along the ring (the tables' order need not be), in which the orbit is drawn."""
    return np.argsort(s_m, kind="stable")


def plotted(values, order: np.ndarray) -> np.ndarray:
    """Orbit values (mm) as drawn: along the ring, to the picometre (a range of 1e-18 mm, the
    round-off of an ideal orbit, breaks Plotly's autoscale)."""
    return np.round(np.asarray(values, float)[order], 9)


def orbit(s_m, bpms, readings: dict[str, np.ndarray], model: dict[str, np.ndarray] | None = None,
          other: dict[str, np.ndarray] | None = None, other_label: str = "saved",
          difference: bool = False) -> go.Figure:
    """The orbit (mm) per BPM against s, one plane a row: the readings, the model's orbit where there
    is one, a second state to compare with; *difference*: readings minus the other, too. The traces
    run along the ring; a patch of them takes its values through ``plotted`` too."""
    figure = _figure(2, ("horizontal x (mm)", "vertical y (mm)"))
    hover = "%{text}<br>s = %{x:.2f} m<br>%{y:.4f} mm"
    order = along_ring(s_m)
    s_m, bpms = np.asarray(s_m)[order], [bpms[i] for i in order]
    readings, model, other = ({p: plotted(v[p], order) for p in PLANES} if v is not None else None
                              for v in (readings, model, other))
    for row, plane in enumerate(PLANES, start=1):
        shown = row == 1
        figure.add_trace(go.Scatter(x=s_m, y=readings[plane], text=bpms, name="BPM readings", mode="lines+markers",
                                    marker={"size": 4}, line={"color": COLOURS["reading"], "width": 1},
                                    hovertemplate=hover, showlegend=shown, legendgroup="reading"), row=row, col=1)
        if model is not None:
            figure.add_trace(go.Scatter(x=s_m, y=model[plane], text=bpms, name="model (true orbit)", mode="lines",
                                        line={"color": COLOURS["model"], "dash": "dash", "width": 1},
                                        hovertemplate=hover, showlegend=shown, legendgroup="model"), row=row, col=1)
        if other is not None:
            figure.add_trace(go.Scatter(x=s_m, y=other[plane], text=bpms, name=other_label, mode="lines",
                                        line={"color": COLOURS["other"], "width": 1}, hovertemplate=hover,
                                        showlegend=shown, legendgroup="other"), row=row, col=1)
            if difference:
                figure.add_trace(go.Scatter(x=s_m, y=np.round(readings[plane] - other[plane], 9),
                                            text=bpms, name=f"now − {other_label}", mode="lines+markers",
                                            marker={"size": 3}, line={"color": COLOURS["difference"], "width": 1},
                                            hovertemplate=hover, showlegend=shown, legendgroup="difference"),
                                 row=row, col=1)
    figure.update_xaxes(title_text="s (m)", row=2, col=1)
    return figure


def resonance_lines(order: int = 4) -> dict[int, list[tuple[tuple[float, float], tuple[float, float]]]]:
    """The lines m·Qx + n·Qy = p with 1 ≤ |m|+|n| ≤ *order*, clipped to the unit square of fractional
    tunes, by order: segments ((x0, y0), (x1, y1))."""
    lines: dict[int, set] = {k: set() for k in range(1, order + 1)}
    for m in range(-order, order + 1):
        for n in range(0, order + 1):
            if (m, n) == (0, 0) or abs(m) + abs(n) > order or (n == 0 and m < 0):
                continue
            for p in range(-order, 2 * order + 1):
                if math.gcd(math.gcd(abs(m), n), abs(p)) != 1:
                    continue  # 2·Qx = 2 is Qx = 1: a lower order's line, drawn there
                segment = _clip(m, n, p)
                if segment is not None:
                    lines[abs(m) + n].add(segment)
    return {k: sorted(v) for k, v in lines.items()}


def _clip(m: int, n: int, p: int) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The part of m·x + n·y = p inside [0, 1]², or None."""
    points = set()
    for x in (0, 1):  # the square's vertical sides
        if n:
            y = Fraction(p - m * x, n)
            if 0 <= y <= 1:
                points.add((Fraction(x), y))
    for y in (0, 1):
        if m:
            x = Fraction(p - n * y, m)
            if 0 <= x <= 1:
                points.add((x, Fraction(y)))
    if len(points) < 2:
        return None
    ends = sorted(points)
    return (float(ends[0][0]), float(ends[0][1])), (float(ends[-1][0]), float(ends[-1][1]))


def tune_diagram(qx: float, qy: float, order: int = 4, window: float = 0.12) -> go.Figure:
    """Fractional tunes on the resonance lines up to *order*, zoomed to the working point; the
    working point is the last trace (a view moves it with a patch)."""
    figure = go.Figure(layout=LAYOUT)
    for k, segments in resonance_lines(order).items():
        xs, ys = [], []
        for (x0, y0), (x1, y1) in segments:
            xs += [x0, x1, None]
            ys += [y0, y1, None]
        colour, width = ORDER_STYLE.get(k, ("#bbbbbb", 0.5))
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"order {k}", hoverinfo="skip",
                                    line={"color": colour, "width": width}))
    figure.add_trace(go.Scatter(x=[qx], y=[qy], mode="markers", name="working point",
                                marker={"size": 12, "color": "#ff7f0e", "symbol": "x"},
                                hovertemplate="Qx = %{x:.4f}<br>Qy = %{y:.4f}<extra></extra>"))
    centre = (qx, qy) if np.isfinite(qx) and np.isfinite(qy) else (0.5, 0.5)
    figure.update_xaxes(title_text="Qx (fractional)", range=_window(centre[0], window))
    figure.update_yaxes(title_text="Qy (fractional)", range=_window(centre[1], window))
    figure.update_layout(uirevision=None)
    return figure


def _window(centre: float, half: float) -> list[float]:
    low = min(max(centre - half, 0.0), 1.0 - 2 * half)
    return [low, low + 2 * half]


def history(samples: list[tuple[float, float, float]]) -> go.Figure:
    """Beam current (mA, left) and lifetime (h, right) against time."""
    if not samples:
        return message("no beam current yet")
    times = [datetime.fromtimestamp(t, UTC) for t, _, _ in samples]
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.update_layout(**LAYOUT)
    figure.add_trace(go.Scatter(x=times, y=[c for _, c, _ in samples], name="current (mA)", mode="lines",
                                line={"color": COLOURS["reading"]}), secondary_y=False)
    figure.add_trace(go.Scatter(x=times, y=[h if math.isfinite(h) else None for _, _, h in samples],
                                name="lifetime (h)", mode="lines", line={"color": COLOURS["model"]}),
                     secondary_y=True)
    figure.update_yaxes(title_text="current (mA)", secondary_y=False)
    figure.update_yaxes(title_text="lifetime (h)", secondary_y=True)
    return figure


def beam_size_values(optics: dict[str, np.ndarray], emittance_x_nm: float, emittance_y_nm: float,
                     energy_spread: float) -> dict[str, np.ndarray]:
    """σ (µm) at the BPMs: σx = √(βx·εx + (ηx·σδ)²), σy = √(βy·εy + (ηy·σδ)²)."""
    ex, ey = emittance_x_nm * 1e-9, emittance_y_nm * 1e-9
    sx = np.sqrt(optics["beta_x_m"] * ex + (optics["eta_x_m"] * energy_spread) ** 2)
    sy = np.sqrt(optics["beta_y_m"] * ey + (optics["eta_y_m"] * energy_spread) ** 2)
    return {"x": sx * 1e6, "y": sy * 1e6}


def beam_sizes(optics: dict[str, np.ndarray], bpms, emittance_x_nm: float | None, emittance_y_nm: float | None,
               energy_spread: float | None) -> go.Figure:
    if None in (emittance_x_nm, emittance_y_nm, energy_spread):
        return message("the target serves no emittance and energy spread")
    sizes = beam_size_values(optics, float(emittance_x_nm), float(emittance_y_nm), float(energy_spread))
    figure = _figure(2, ("σx (µm)", "σy (µm)"))
    for row, plane in enumerate(PLANES, start=1):
        figure.add_trace(go.Scatter(x=optics["s_m"], y=sizes[plane], text=bpms, mode="lines+markers",
                                    marker={"size": 3}, name=f"σ{plane}", showlegend=False,
                                    hovertemplate="%{text}<br>s = %{x:.2f} m<br>%{y:.1f} µm"), row=row, col=1)
    figure.update_xaxes(title_text="s (m)", row=2, col=1)
    return figure


# -- results --------------------------------------------------------------------------------------

def result_figure(record: dict, other: dict | None = None, model_eta: dict | None = None) -> go.Figure:
    """A finished measurement's result as its kind is read; *other*: one of the same kind beside it."""
    if record.get("status") != "done" or not record.get("result"):
        return message(f"measurement {record.get('id')}: {record.get('status')} {record.get('error') or ''}")
    drawing = RESULT_FIGURES.get(record["kind"])
    if drawing is None:
        return message(f"no plot for {record['kind']}")
    figure = drawing(record, None, model_eta)
    if other is not None and other.get("kind") == record["kind"] and other.get("status") == "done":
        drawing(other, figure, None)
    figure.update_layout(title={"text": _title(record, other), "font": {"size": 14}, "x": 0.01, "y": 0.99,
                                "yref": "container", "yanchor": "top"}, margin={"t": 90},
                         legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"})
    return figure


def _title(record: dict, other: dict | None) -> str:
    text = f"{record['kind']} {record['id']}"
    return f"{text} against {other['id']}" if other else text


def _label(record: dict, figure_given: bool) -> str:
    return f"{record['id']} " if figure_given else ""


def _begin(record: dict, figure: go.Figure | None, rows: int = 1, titles: tuple[str, ...] = ()) -> tuple:
    """(result, whether it is drawn beside another, the figure to draw in, the traces' label)."""
    given = figure is not None
    return record["result"], given, figure or _figure(rows, titles), _label(record, given)


def _bba(record: dict, figure: go.Figure | None, _model) -> go.Figure:
    result, raw = record["result"], record.get("raw") or {}
    planes = record["params"].get("planes") or ["x", "y"]
    given = figure is not None
    figure = figure or _figure(len(planes), tuple(f"{result['quadrupole']}: plane {p}" for p in planes),
                               shared_x=False)
    for row, plane in enumerate(planes, start=1):
        scan = raw.get(plane)
        if not scan:
            continue
        x = np.asarray(scan["positions_mm"], float)
        line = np.linspace(x.min(), x.max(), 2)
        crossing = result["crossing_um"][row - 1] / 1e3
        label = _label(record, given)
        figure.add_trace(go.Scatter(x=x, y=scan["response_size_mm"], mode="markers", name=f"{label}response {plane}",
                                    marker={"size": 8, "color": COLOURS["other" if given else "reading"]}),
                         row=row, col=1)
        figure.add_trace(go.Scatter(x=line, y=scan["fit_slope"] * line + scan["fit_intercept_mm"], mode="lines",
                                    name=f"{label}fit {plane}",
                                    line={"color": COLOURS["other" if given else "model"]}), row=row, col=1)
        offset, sigma = result["offset_um"][row - 1], result["sigma_um"][row - 1]
        figure.add_vline(x=crossing, line={"dash": "dot", "color": COLOURS["other" if given else "difference"]},
                         row=row, col=1, annotation_text=f"{label}offset {offset:.1f} ± {sigma:.1f} µm",
                         annotation_position="bottom right" if given else "top left")
        figure.update_xaxes(title_text=f"{result['bpm']} reading (mm)", row=row, col=1)
        figure.update_yaxes(title_text="orbit response (mm)", row=row, col=1)
    return figure


def _orm(record: dict, figure: go.Figure | None, _model) -> go.Figure:
    result = record["result"]
    matrix = np.asarray(result["mm_per_A"], float)
    bpms = list(result["bpms"])
    rows = [f"x {b}" for b in bpms] + [f"y {b}" for b in bpms]
    if figure is not None:  # the comparison: the difference of the two matrices
        mine = np.asarray(figure.data[0].z, float)
        if mine.shape == matrix.shape:
            figure.data[0].z = mine - matrix
            figure.data[0].colorbar.title.text = f"− {record['id']} (mm/A)"
        return figure
    figure = go.Figure(go.Heatmap(z=matrix, x=list(result["steerers"]), y=rows, colorscale="RdBu", zmid=0,
                                  colorbar={"title": {"text": "mm/A"}},
                                  hovertemplate="%{x} → %{y}<br>%{z:.4f} mm/A<extra></extra>"), layout=LAYOUT)
    figure.update_xaxes(title_text="steerer")
    figure.update_yaxes(title_text="BPM and plane", autorange="reversed")
    return figure


def _chromaticity(record: dict, figure: go.Figure | None, _model) -> go.Figure:
    result, given, figure, label = _begin(record, figure)
    delta = np.array([p["delta"] for p in result["points"]])
    line = np.linspace(delta.min(), delta.max(), 2)
    for k, plane in enumerate(PLANES):
        tunes = np.array([p[f"tune_{plane}"] for p in result["points"]])
        errors = [p[f"tune_{plane}_error"] for p in result["points"]]
        slope, intercept = np.polyfit(delta, tunes, 1)
        colour = ("#1f77b4", "#d62728")[k] if not given else COLOURS["other"]
        figure.add_trace(go.Scatter(x=delta * 1e3, y=tunes, error_y={"array": errors}, mode="markers",
                                    name=f"{label}Q{plane}", marker={"color": colour, "size": 8}))
        figure.add_trace(go.Scatter(x=line * 1e3, y=slope * line + intercept, mode="lines", line={"color": colour},
                                    name=f"{label}ξ{plane} = {result['xi'][k]:.2f} ± {result['sigma_xi'][k]:.2f}"))
    figure.update_xaxes(title_text="δ (10⁻³)")
    figure.update_yaxes(title_text="fractional tune")
    return figure


def _dispersion(record: dict, figure: go.Figure | None, model: dict | None) -> go.Figure:
    result, given, figure, label = _begin(record, figure, 2, ("ηx (m)", "ηy (m)"))
    index = list(range(len(result["bpms"])))
    for row, plane in enumerate(PLANES, start=1):
        figure.add_trace(go.Scatter(x=index, y=result[f"eta_{plane}_m"], text=result["bpms"], mode="markers",
                                    name=f"{label}measured", showlegend=row == 1,
                                    marker={"color": COLOURS["other" if given else "reading"], "size": 6}),
                         row=row, col=1)
        if model is not None:
            figure.add_trace(go.Scatter(x=index, y=model[f"eta_{plane}_m"], text=result["bpms"], mode="lines",
                                        name="model", showlegend=row == 1, line={"color": COLOURS["model"]}),
                             row=row, col=1)
    figure.update_xaxes(title_text="BPM (index)", row=2, col=1)
    return figure


def _tune_response(record: dict, figure: go.Figure | None, _model) -> go.Figure:
    result, given, figure, label = _begin(record, figure)
    slopes = np.asarray(result["dq_per_A"], float).reshape(len(result["converters"]), -1)
    for k, plane in enumerate(PLANES):
        figure.add_trace(go.Bar(x=result["converters"], y=slopes[:, k], name=f"{label}dQ{plane}/dI"))
    figure.update_yaxes(title_text="tune change per A")
    return figure


def _orbit_correction(record: dict, figure: go.Figure | None, _model) -> go.Figure:
    result, given, figure, label = _begin(record, figure)
    for plane in PLANES:
        values = result["rms_um"][plane]
        figure.add_trace(go.Scatter(x=list(range(len(values))), y=values, mode="lines+markers",
                                    name=f"{label}rms {plane}"))
    figure.update_xaxes(title_text="iteration (0: before)")
    figure.update_yaxes(title_text="orbit rms (µm)")
    return figure


RESULT_FIGURES = {"bba": _bba, "orm": _orm, "chromaticity": _chromaticity, "dispersion": _dispersion,
                  "tune_response": _tune_response, "orbit_correction": _orbit_correction}
