"""The measurements as Bluesky plans: each takes a ``PlanContext`` and its parameters and returns its
``Analysis``. Every plan

- runs as one Bluesky run (start document: kind, parameters, provenance), its readings as events;
- switches the ring's orbit feedback off for its duration (the feedback would undo the steering);
- waits for readbacks and fresh readings (``PowerConverter.set``, ``Orbit.trigger``), never sleeps;
- puts back every setpoint it changed and the feedback, also when it fails or is cancelled (the
  orbit correction keeps its correction when it succeeds).
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from twinioc.model.alignment import alignment_bump, bpm_across, centre_from_readings, quadrupole_step

from . import analysis as an
from .context import PlanContext
from .machine import LayoutError

PLANE_COLUMN = {"x": 0, "y": 1}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def provenance(ctx: PlanContext):
    """Plan: the machine, the time, and on a twin its seed and lattice version."""
    found = {"machine": ctx.layout.name, "target": "twin" if ctx.instruments.is_twin else "machine",
             "started": _now(), "lattice_file": str(ctx.layout.tables.folder / "lattice.json")}
    if ctx.instruments.twin is not None:
        yield from ctx.instruments.connect(ctx.instruments.twin)
        found["seed"] = int((yield from bps.rd(ctx.instruments.twin.seed)))
        found["lattice_version_start"] = int((yield from bps.rd(ctx.instruments.twin.version)))
    return found


def _feedback_paused(ctx: PlanContext, plan):
    """Plan: *plan* with the orbit feedback off (and idle); the feedback's setting back afterwards."""
    feedback = ctx.instruments.feedback
    if feedback is None:
        return (yield from plan)
    yield from ctx.instruments.connect(feedback)
    mode = yield from bps.rd(feedback.mode)

    def body():
        if mode:
            ctx.restorer.remember_feedback(mode)
            yield from bps.mv(feedback.mode, type(mode)(0))
            deadline = time.monotonic() + 10.0
            while (yield from bps.rd(feedback.status)) and time.monotonic() < deadline:
                yield from bps.sleep(0.1)  # the feedback finishes its step; its status says when
        return (yield from plan)

    def back():
        if mode:
            yield from bps.mv(feedback.mode, mode)

    return (yield from bpp.finalize_wrapper(body(), back()))


def measurement(ctx: PlanContext, kind: str, params: dict, body, keep_changes: bool = False):
    """Plan: *body(ctx, analysis)* in one run, feedback paused, setpoints put back; returns the Analysis.
    With *keep_changes* the setpoints stay where a successful body left them."""
    analysis = an.Analysis(kind, dict(params))
    analysis.provenance = yield from provenance(ctx)
    ledger = ctx.instruments.ledger
    ledger.reset()  # this measurement's waits only
    started = time.monotonic()
    ctx.instruments.orbit.samples = ctx.instruments.tunes.samples = params.get("samples", 4)
    succeeded = []

    def run():
        yield from ctx.instruments.connect(ctx.instruments.orbit, ctx.instruments.tunes)
        yield from body(ctx, analysis)
        succeeded.append(True)

    def restore():
        if not (keep_changes and succeeded):
            yield from ctx.restorer.restore()

    start_md = {"kind": kind, "params": an.plain(params), "provenance": analysis.provenance}
    measured = bpp.run_wrapper(bpp.finalize_wrapper(run(), restore()), md=start_md)
    yield from _feedback_paused(ctx, measured)
    analysis.provenance["finished"] = _now()
    analysis.provenance["timing"] = ledger.as_dict() | {"wall_s": round(time.monotonic() - started, 3)}
    if ctx.instruments.twin is not None:
        analysis.provenance["lattice_version_end"] = int((yield from bps.rd(ctx.instruments.twin.version)))
    ctx.progress(1.0)
    return analysis


def read_setpoints(devices) -> list[float]:
    """Plan: the setpoints of *devices*, as floats."""
    values = []
    for device in devices:
        values.append(float((yield from bps.rd(device.setpoint))))
    return values


def read_orbit(ctx: PlanContext, stream: str = "primary", extra=()):
    """Plan: fresh orbit (and *extra* devices) as one event; returns (x, y, x_error, y_error) in mm."""
    orbit = ctx.instruments.orbit
    reading = yield from bps.trigger_and_read([orbit, *extra], name=stream)
    return tuple(np.asarray(reading[f"{orbit.name}-{k}"]["value"], float) for k in ("x", "y", "x_error", "y_error"))


def read_tunes(ctx: PlanContext, stream: str = "primary", extra=()):
    """Plan: fresh tunes (fractional) as one event; returns (tune_x, tune_y, error_x, error_y)."""
    tunes = ctx.instruments.tunes
    reading = yield from bps.trigger_and_read([tunes, *extra], name=stream)
    return tuple(float(reading[f"{tunes.name}-{k}"]["value"]) for k in ("tune_x", "tune_y", "tune_x_error",
                                                                          "tune_y_error"))


# -- beam-based alignment -----------------------------------------------------------------------

def bba(ctx: PlanContext, params: dict):
    """Plan: the BPM reading at which the beam passes *quadrupole*'s magnetic centre, per plane."""
    return (yield from measurement(ctx, "bba", params, _bba_body))


def _bba_body(ctx: PlanContext, analysis: an.Analysis):
    p = analysis.params
    quad = ctx.layout.converter_of_magnet(p["quadrupole"])
    yield from ctx.instruments.sync_model()
    quad_device = ctx.converter(quad.name)
    yield from ctx.instruments.connect(quad_device)
    current = float((yield from bps.rd(quad_device.setpoint)))
    planes = p.get("planes") or ["x", "y"]
    result = {"quadrupole": p["quadrupole"], "converter": quad.name, "planes": list(planes), "quad_step_A": [],
              "offset_um": [], "sigma_um": [], "crossing_um": [], "steerers": {}, "bpm": None,
              "bpm_distance_m": None, "bpm_across": None}
    for n, plane in enumerate(planes):
        scan = yield from _bba_scan(ctx, p, plane, quad_device, current,
                                    lambda f, n=n: ctx.progress((n + f) / len(planes) * 0.98))
        found = _bba_centre(ctx.instruments.engine, p["quadrupole"], plane, scan)
        for key in ("quad_step_A", "offset_um", "sigma_um", "crossing_um"):
            result[key].append(found[key])
        result["steerers"][plane] = list(scan["bump"].steerers)
        result["bpm"], result["bpm_distance_m"] = scan["bump"].bpm, scan["bump"].bpm_distance_m
        result["bpm_across"] = scan["across"]
        analysis.raw[plane] = found["raw"]
    analysis.result = result


def _bba_scan(ctx: PlanContext, p: dict, plane: str, quad_device, current: float, progress):
    """Plan: the beam moved through the quadrupole in steps (a parallel bump), the quadrupole stepped at
    each; the readings of the BPM beside it and across it, and the orbit's answer to each step."""
    engine = ctx.instruments.engine
    given = [p["steerer"]] if p.get("steerer") and ctx.layout.converter(p["steerer"]).plane == plane else None
    bump = alignment_bump(engine, p["quadrupole"], plane, steerers=given)
    steerers = [ctx.converter(name) for name in bump.steerers]
    yield from ctx.instruments.connect(*steerers)
    origin = dict(zip(steerers, (yield from read_setpoints(steerers)), strict=True))
    step = p.get("quad_step_A") or quadrupole_step(engine, p["quadrupole"], plane, p["span_mm"] * 1e-3)
    step = step if current + step <= quad_device.info.high else -step
    across = bpm_across(engine, p["quadrupole"], bump.bpm)
    names, column = ctx.instruments.orbit.bpm_names, PLANE_COLUMN[plane]
    scan = {"bump": bump, "across": across, "step": step, "offsets": np.linspace(-p["span_mm"], p["span_mm"],
                                                                                 p["steps"]),
            "positions": [], "positions_across": [], "responses": [], "repeated": []}

    def point(offset: float):
        """Plan: the beam at *offset*, the orbit before and after the quadrupole's step."""
        yield from ctx.restorer.move({s: origin[s] + a * offset for s, a in zip(steerers, bump.amps_per_mm,
                                                                                   strict=True)})
        before = yield from read_orbit(ctx, f"bba_{plane}", steerers + [quad_device])
        yield from ctx.restorer.move({quad_device: current + step})
        after = yield from read_orbit(ctx, f"bba_{plane}", steerers + [quad_device])
        yield from ctx.restorer.move({quad_device: current})
        return (before[column][names.index(bump.bpm)], before[column][names.index(across)],
                after[column] - before[column])

    taken = []
    for k, offset in enumerate(scan["offsets"]):
        taken.append((yield from point(offset)))
        progress((k + 1) / len(scan["offsets"]))
    # a point off the line the others make (the beam disturbed while it was taken) is taken once more
    sizes = an.bba_zero_crossing(np.array([t[0] for t in taken]), np.array([t[2] for t in taken]))["size_mm"]
    odd = an.odd_point(scan["offsets"], [t[0] for t in taken], [t[1] for t in taken], sizes)
    if odd is not None:
        taken[odd] = yield from point(scan["offsets"][odd])
        scan["repeated"].append(int(odd))
    for position, position_across, response in taken:
        scan["positions"].append(position)
        scan["positions_across"].append(position_across)
        scan["responses"].append(response)
    yield from ctx.restorer.move(origin)
    return scan


def _bba_centre(engine, quadrupole: str, plane: str, scan: dict) -> dict:
    """The zero crossing of the scan, and the centre in the BPM's coordinates once the beam's slope
    there is taken out (from both BPMs' readings at the crossing, through the model's lattice)."""
    bump, across = scan["bump"], scan["across"]
    positions = np.array(scan["positions"])
    fit = an.bba_zero_crossing(positions, np.array(scan["responses"]))
    slope, intercept, _ = an.line_fit(positions, np.array(scan["positions_across"]))
    crossing = {bump.bpm: fit["centre_mm"] * 1e-3, across: (slope * fit["centre_mm"] + intercept) * 1e-3}
    centre = centre_from_readings(engine, quadrupole, plane, crossing)
    # its sigma: the zero crossing's, carried through the same trajectory
    shifted = centre_from_readings(engine, quadrupole, plane, crossing | {bump.bpm: crossing[bump.bpm] + 1e-6})
    raw = {"positions_mm": scan["positions"], "positions_across_mm": scan["positions_across"],
           "response_size_mm": fit["size_mm"], "fit_slope": fit["slope"], "fit_intercept_mm": fit["intercept_mm"],
           "crossing_across_mm": crossing[across] * 1e3, "steerer_A_per_mm": list(bump.amps_per_mm),
           "bump_offsets_mm": scan["offsets"], "points_repeated": scan["repeated"]}
    return {"quad_step_A": scan["step"], "offset_um": centre * 1e6, "crossing_um": fit["centre_mm"] * 1e3,
            "sigma_um": fit["sigma_mm"] * 1e3 * abs(shifted - centre) / 1e-6, "raw": raw}


# -- orbit response matrix ----------------------------------------------------------------------

def orm(ctx: PlanContext, params: dict):
    """Plan: ∂(BPM readings)/∂(steerer current), mm/A, one steerer at a time."""
    return (yield from measurement(ctx, "orm", params, _orm_body))


def default_steerer_steps(ctx: PlanContext, names: list[str], orbit_mm: float = 0.5) -> list[float]:
    """Per steerer, a step (A) that moves the orbit by about *orbit_mm* at most, from the model's
    response: every column is measured with the same signal over the BPMs' noise, the weak
    steerers' as well as the strong ones' (at most 10 % of a steerer's range)."""
    response = np.abs(ctx.instruments.engine.orbit_response(names)) * 1e3  # mm per A, (2·nbpm, n)
    spans = [ctx.layout.converter(n).high - ctx.layout.converter(n).low for n in names]
    return [float(f"{min(orbit_mm / max(np.max(column), 1e-12), 0.1 * span):.2g}")
            for column, span in zip(response.T, spans, strict=True)]


def _orm_body(ctx: PlanContext, analysis: an.Analysis):
    p = analysis.params
    names = p.get("steerers") or [c.name for c in ctx.layout.steerers()]
    yield from ctx.instruments.sync_model()
    sizes = [p["step_A"]] * len(names) if p.get("step_A") else default_steerer_steps(ctx, names)
    devices = [ctx.converter(n) for n in names]
    yield from ctx.instruments.connect(*devices)
    origin = (yield from read_setpoints(devices))
    steps = [step if o + step <= d.info.high else -step for d, o, step in zip(devices, origin, sizes, strict=True)]
    x0, y0, *_ = yield from read_orbit(ctx, "reference")
    t0 = time.monotonic()
    deltas, times = [], []
    for j, device in enumerate(devices):
        targets = {device: origin[j] + steps[j]}
        if j:
            targets[devices[j - 1]] = origin[j - 1]  # the last steerer back, this one out: one ramp
        yield from ctx.restorer.move(targets)
        x, y, *_ = yield from read_orbit(ctx, "primary")  # which steerer: the order of the start document's params
        deltas.append(np.concatenate([x, y]))
        times.append(time.monotonic() - t0)
        ctx.progress((j + 1) / len(devices) * 0.97)
    yield from ctx.restorer.move({devices[-1]: origin[-1]})
    x1, y1, *_ = yield from read_orbit(ctx, "reference")
    # the reference drifts: interpolate it in time between before and after
    before, after, span = np.concatenate([x0, y0]), np.concatenate([x1, y1]), max(time.monotonic() - t0, 1e-9)
    changes = np.array([d - (before + (after - before) * t / span) for d, t in zip(deltas, times, strict=True)])
    matrix = an.response_columns(changes, np.array(steps))
    analysis.raw = {"steps_A": steps, "setpoints_A": origin, "reference_before_mm": before,
                    "reference_after_mm": after}
    analysis.result = {"steerers": names, "bpms": ctx.instruments.orbit.bpm_names, "rows": "x of every BPM, then y",
                       "mm_per_A": matrix, "step_A": steps}


# -- dispersion and chromaticity (RF) -----------------------------------------------------------

def rf_for_delta(delta: float, rf_khz: float, compaction: float) -> float:
    """The RF change (kHz) that makes a momentum offset *delta* at *rf_khz*, by the model's α_c."""
    return float(f"{delta * rf_khz * compaction:.3g}")


def _rf_at_start(ctx: PlanContext):
    """Plan: the RF converter (connected), its setpoint (kHz), and α_c of the model set to the machine."""
    rf = ctx.converter(ctx.layout.rf.name)
    yield from ctx.instruments.connect(rf)
    yield from ctx.instruments.sync_model()
    f0 = float((yield from bps.rd(rf.setpoint)))
    return rf, f0, ctx.instruments.compaction()


def dispersion(ctx: PlanContext, params: dict):
    """Plan: η at the BPMs from the orbit change of an RF step up and down."""
    return (yield from measurement(ctx, "dispersion", params, _dispersion_body))


def _dispersion_body(ctx: PlanContext, analysis: an.Analysis):
    p = analysis.params
    rf, f0, compaction = yield from _rf_at_start(ctx)
    step = p.get("rf_step_khz") or rf_for_delta(1e-3, f0, compaction)
    orbits = {}
    for k, sign in enumerate((1.0, -1.0)):
        yield from ctx.restorer.move({rf: f0 + sign * step})
        orbits[sign] = yield from read_orbit(ctx, "primary", [rf])
        ctx.progress(0.45 * (k + 1))
    yield from ctx.restorer.move({rf: f0})
    delta = float(an.momentum_offset(np.array([2 * step]), f0, compaction)[0])
    eta_x = (orbits[1.0][0] - orbits[-1.0][0]) * 1e-3 / delta
    eta_y = (orbits[1.0][1] - orbits[-1.0][1]) * 1e-3 / delta
    analysis.result = {"bpms": ctx.instruments.orbit.bpm_names, "eta_x_m": eta_x, "eta_y_m": eta_y,
                       "rf_step_khz": step, "alpha_c": compaction, "alpha_c_source": "model",
                       "mm_per_khz_x": (orbits[1.0][0] - orbits[-1.0][0]) / (2 * step)}


def chromaticity(ctx: PlanContext, params: dict):
    """Plan: ξ = dQ/dδ from the tunes over an RF scan, δ = −Δf / (f α_c)."""
    return (yield from measurement(ctx, "chromaticity", params, _chromaticity_body))


def _chromaticity_body(ctx: PlanContext, analysis: an.Analysis):
    p = analysis.params
    rf, f0, compaction = yield from _rf_at_start(ctx)
    span = p.get("rf_span_khz") or rf_for_delta(4e-3, f0, compaction)
    changes = np.linspace(-span / 2, span / 2, p["points"])
    points = []
    for k, change in enumerate(changes):
        yield from ctx.restorer.move({rf: f0 + change})
        qx, qy, ex, ey = yield from read_tunes(ctx, "primary", [rf])
        points.append({"rf_khz": f0 + change, "delta": float(an.momentum_offset(change, f0, compaction)),
                       "tune_x": qx, "tune_y": qy, "tune_x_error": ex, "tune_y_error": ey})
        ctx.progress((k + 1) / len(changes) * 0.97)
    yield from ctx.restorer.move({rf: f0})
    deltas = np.array([q["delta"] for q in points])
    xi_x, sx = an.chromaticity_fit(deltas, [q["tune_x"] for q in points])
    xi_y, sy = an.chromaticity_fit(deltas, [q["tune_y"] for q in points])
    analysis.result = {"xi": [xi_x, xi_y], "sigma_xi": [sx, sy], "alpha_c": compaction, "alpha_c_source": "model",
                       "rf_span_khz": span, "points": points}


# -- tune response ------------------------------------------------------------------------------

def tune_response(ctx: PlanContext, params: dict):
    """Plan: ∂(Qx, Qy)/∂(current) of quadrupole converters, a step up and back each."""
    return (yield from measurement(ctx, "tune_response", params, _tune_response_body))


def _tune_response_body(ctx: PlanContext, analysis: an.Analysis):
    p = analysis.params
    devices = [ctx.converter(n) for n in p["converters"]]
    yield from ctx.instruments.connect(*devices)
    q0 = yield from read_tunes(ctx, "reference")
    rows = []
    for j, device in enumerate(devices):
        origin = float((yield from bps.rd(device.setpoint)))
        step = p.get("step_A") or max(0.01 * abs(origin), 0.002 * (device.info.high - device.info.low))
        step = step if origin + step <= device.info.high else -step
        yield from ctx.restorer.move({device: origin + step})
        q = yield from read_tunes(ctx, "primary")
        yield from ctx.restorer.move({device: origin})
        rows.append({"converter": device.name, "step_A": step,
                     "dq_per_A": [(q[0] - q0[0]) / step, (q[1] - q0[1]) / step],
                     "sigma_dq_per_A": [math.hypot(q[2], q0[2]) / abs(step), math.hypot(q[3], q0[3]) / abs(step)]})
        ctx.progress((j + 1) / len(devices) * 0.97)
    analysis.result = {"converters": [r["converter"] for r in rows], "dq_per_A": [r["dq_per_A"] for r in rows],
                       "sigma_dq_per_A": [r["sigma_dq_per_A"] for r in rows], "step_A": [r["step_A"] for r in rows],
                       "tunes_before": list(q0[:2])}


# -- orbit correction ---------------------------------------------------------------------------

def orbit_correction(ctx: PlanContext, params: dict, measured: dict | None = None):
    """Plan: steer the readings towards zero with the SVD of a measured (*measured*: an ORM result)
    or the model's response; keeps the correction when it succeeds."""
    return (yield from measurement(ctx, "orbit_correction", params,
                                   lambda c, a: _correction_body(c, a, measured), keep_changes=True))


def _correction_body(ctx: PlanContext, analysis: an.Analysis, measured: dict | None):
    p = analysis.params
    if measured is not None:
        names, matrix = measured["steerers"], np.asarray(measured["mm_per_A"], float)
    else:
        yield from ctx.instruments.sync_model()
        names = [c.name for c in ctx.layout.steerers()]
        matrix = ctx.instruments.engine.orbit_response(names) * 1e3
    inverse, singular = _per_plane_inverse(ctx, names, matrix, p.get("singular_values"))
    devices = [ctx.converter(n) for n in names]
    yield from ctx.instruments.connect(*devices)
    limits = np.array((yield from ctx.instruments.limits(devices)))
    rms = {"x": [], "y": []}
    clipped: set[str] = set()
    start = yield from read_setpoints(devices)
    for k in range(p["iterations"] + 1):
        x, y, *_ = yield from read_orbit(ctx)
        rms["x"].append(an.rms(x) * 1e3)
        rms["y"].append(an.rms(y) * 1e3)
        if k == p["iterations"]:
            break
        present = np.array((yield from read_setpoints(devices)))
        wanted = present - p["gain"] * (inverse @ np.nan_to_num(np.concatenate([x, y])))
        target = np.clip(wanted, limits[:, 0], limits[:, 1])
        clipped |= {n for n, w, t in zip(names, wanted, target, strict=True) if w != t}
        yield from ctx.restorer.move(dict(zip(devices, target, strict=True)))
        ctx.progress((k + 1) / (p["iterations"] + 1))
    end = yield from read_setpoints(devices)
    analysis.result = {"response": p.get("response", "model"), "steerers": names,
                       "change_A": [e - s for e, s in zip(end, start, strict=True)], "rms_um": rms,
                       "singular_values": singular, "clipped": sorted(clipped)}


def _per_plane_inverse(ctx: PlanContext, names: list[str], matrix: np.ndarray, keep: int | None):
    """(steerers × readings) inverse that corrects x with the horizontal steerers and y with the vertical
    ones, each plane's response inverted on its own (keeping *keep* singular values), and the singular
    values kept per plane."""
    n = matrix.shape[0] // 2
    inverse = np.zeros((len(names), 2 * n))
    singular = {}
    for plane, rows in (("x", slice(0, n)), ("y", slice(n, 2 * n))):
        columns = [j for j, name in enumerate(names) if ctx.layout.converter(name).plane == plane]
        if not columns:
            continue
        part, values = an.truncated_inverse(matrix[rows][:, columns], keep)
        inverse[np.ix_(columns, range(2 * n)[rows])] = part
        singular[plane] = values[:len(values) if keep is None else min(keep, len(values))]
    return inverse, singular


PLANS = {"bba": bba, "orm": orm, "dispersion": dispersion, "chromaticity": chromaticity,
         "tune_response": tune_response, "orbit_correction": orbit_correction}


def plan_of(kind: str, ctx: PlanContext, params: dict, measured: dict | None = None):
    """The plan of a *kind* of measurement; *measured*: the ORM result an orbit correction uses."""
    if kind == "orbit_correction":
        return orbit_correction(ctx, params, measured)
    return PLANS[kind](ctx, params)


def check_names(layout, kind: str, params: dict) -> None:
    """``LayoutError`` for a device name the machine does not have, or of the wrong kind."""
    if kind == "bba":
        quad = layout.converter_of_magnet(params["quadrupole"])
        if quad.kind != "quadrupole":
            raise LayoutError(f"{params['quadrupole']} is not a quadrupole")
        if len(quad.magnets) > 1:
            raise LayoutError(f"{params['quadrupole']} shares converter {quad.name} with {len(quad.magnets) - 1} "
                              "other magnets: beam-based alignment needs a quadrupole on a converter of its own")
        if params.get("steerer") and layout.converter(params["steerer"]).plane is None:
            raise LayoutError(f"{params['steerer']} is not a steerer")
    for name in params.get("steerers") or ():
        if layout.converter(name).plane is None:
            raise LayoutError(f"{name} is not a steerer")
    for name in params.get("converters") or ():
        if layout.converter(name).kind != "quadrupole":
            raise LayoutError(f"{name} is not a quadrupole converter")
