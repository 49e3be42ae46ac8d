"""examples/orbit_correction.py against a twin with errors, run as the control room would run it.

The script runs as a subprocess with nothing but the twin's EPICS environment. The twin has the
startup file's imperfections (magnet offsets and rolls from the seed, BPM gain and roll errors and
1 µm noise, ramping converters, noisy readbacks) except the BPMs' electrical offsets, which are
switched off (``bpm.offset_um = 0``): with offsets, readings steered to zero leave the beam at minus
the offsets, ~30 µm rms, so the true orbit cannot fall by 5× on the MLS (0.3 mm before), and with
fewer steerers than BPMs the offsets' uncorrectable part alone (~20 µm) keeps the MLS's readings at
about 4-5× lower; neither would say anything about the script. Without offsets, zero readings are
the beam through the BPMs, and both the readings and the true orbit (``TWIN:ORBIT:TRUE:X/Y``) must
fall by 5× or more.

The response matrix the script measured over CA is then held against pyAT's: the same seed's
magnet errors (the lattice the twin's own physics builds, ``build_engine``), the orbit from pyAT's
``find_sync_orbit`` (fixed path length, i.e. fixed RF, as the twin), not the twin's own Newton
solver; the BPMs' gain errors are fitted per BPM and plane (as LOCO does) and must look like the
startup file's σ.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import epics
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "orbit_correction.py"
SEED = 3
# and as a ring under commissioning: the orbit as the errors leave it (not corrected at start), no
# orbit feedback holding it while the script steers
NO_BPM_OFFSETS = {"bpm.offset_um": 0, "start.state": "commissioning", "orbit_feedback.enabled": False}
TWINS = [pytest.param({"machine": machine, "seed": SEED, "set": NO_BPM_OFFSETS}, id=machine)
         for machine in ("bessy2", "mls")]
IMPROVEMENT = 5.0
# The measured columns carry ~0.3 % of reading noise (1 µm, 3 readings, each steerer's step moving
# the orbit by 0.5 mm at most); they agree with pyAT's within 0.5 % (both rings). One step for all
# steerers gave the weak ones a third of that signal: up to 1.8 %. A timing slip (a reading taken before
# the readback arrived), a wrong calibration or BPM order costs far more; so does the ideal lattice
# on BESSY II (up to 19 %: its 1-3 mm uncorrected orbit passes the sextupoles off centre).
COLUMN_TOLERANCE = 0.015
OTHER_PLANE_TOLERANCE = 0.02  # measured 0.6 % at most: BPM rolls (≤ 3 mrad) and noise


def rms_um(values_mm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values_mm)))) * 1e3


def true_orbit(twin) -> np.ndarray:
    """The model's orbit at the BPMs (mm), before the BPMs' errors and noise: (2, nbpm)."""
    return np.array([epics.caget(twin.pv(f"ORBIT:TRUE:{plane}"), timeout=5, use_monitor=False) for plane in "XY"])


def pyat_response(engine, steerers: list[str], steps: np.ndarray, setpoints: np.ndarray) -> np.ndarray:
    """Orbit response (2, nbpm, nsteerer) in mm/A of the engine's lattice, by pyAT's closed-orbit finder:
    the same one-sided steps from the same setpoints as the measurement."""
    from twinioc.model import Change

    refs = np.array([bpm.element for bpm in engine.devices.bpms])  # the machine's BPM order
    ascending = np.argsort(refs)
    back = np.argsort(ascending)

    def orbit() -> np.ndarray:
        _, at_bpms = engine.ring.find_sync_orbit(dct=0.0, refpts=refs[ascending])
        return at_bpms[back][:, [0, 2]].T * 1e3

    engine.apply([Change(name, "current", float(value)) for name, value in zip(steerers, setpoints, strict=True)])
    reference = orbit()
    response = np.empty((2, len(refs), len(steerers)))
    for k, name in enumerate(steerers):
        engine.apply([Change(name, "current", float(setpoints[k] + steps[k]))])
        response[:, :, k] = (orbit() - reference) / steps[k]
        engine.apply([Change(name, "current", float(setpoints[k]))])
    return response


@pytest.mark.parametrize("twin", TWINS, indirect=True)
def test_orbit_correction_on_a_twin_with_errors(twin, tmp_path):
    before = true_orbit(twin)
    saved = tmp_path / "response.npz"
    run = subprocess.run([sys.executable, str(SCRIPT), "--machine", twin.machine, "--save-response", str(saved)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    after = true_orbit(twin)
    print(run.stdout)

    # the readings, as the script saw them
    for plane in "xy":
        first, last = result["rms_before_um"][plane], result["rms_after_um"][plane]
        assert last * IMPROVEMENT <= first, f"{plane} readings {first:.1f} -> {last:.1f} um rms"
    # the beam itself
    for p, plane in enumerate("xy"):
        first, last = rms_um(before[p]), rms_um(after[p])
        print(f"true orbit {plane}: {first:.1f} -> {last:.1f} um rms")
        assert last * IMPROVEMENT <= first, f"true {plane} orbit {first:.1f} -> {last:.1f} um rms"

    # the measured response against pyAT's, on the lattice with this seed's magnet errors
    from twinioc.ioc.config import Config
    from twinioc.model.engine import build_engine

    settings = (f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in NO_BPM_OFFSETS.items())
    config = Config.for_machine(twin.machine, [f"seed={twin.seed}", *settings])
    engine = build_engine(config.tables, config.realism)
    data = np.load(saved)
    steerers, horizontal = [str(name) for name in data["steerers"]], data["horizontal"]
    assert [str(b) for b in data["bpms"]] == [bpm.name for bpm in engine.devices.bpms]
    measured = data["response"]
    model = pyat_response(engine, steerers, data["steps"], data["setpoints"])
    sigma = config.realism.bpm_gain_error
    for p, plane, own in ((0, "x", horizontal), (1, "y", ~horizontal)):
        m, r = measured[p][:, own], model[p][:, own]
        gains = np.sum(m * r, axis=1) / np.sum(r * r, axis=1)  # per BPM: measured ≈ gain · pyAT
        columns = np.linalg.norm(m - gains[:, None] * r, axis=0) / np.linalg.norm(gains[:, None] * r, axis=0)
        raw = np.linalg.norm(m - r, axis=0) / np.linalg.norm(r, axis=0)
        print(f"{plane}: response vs pyAT per steerer, max relative deviation {raw.max():.4f} as measured, "
              f"{columns.max():.4f} with the BPM gains fitted ({np.min(gains):.4f} ... {np.max(gains):.4f})")
        # the columns are this plane's steerers only: name the worst among them
        assert columns.max() < COLUMN_TOLERANCE, np.array(steerers)[own][int(np.argmax(columns))]
        # gains as drawn (σ, cut at 3σ) plus fit noise; their mean within 4σ/√n of 1 (a calibration
        # error common to all steerers would move every gain alike)
        assert np.max(np.abs(gains - 1.0)) < 3 * sigma + 0.005, gains
        assert abs(np.mean(gains) - 1.0) < 4 * sigma / np.sqrt(len(gains)), np.mean(gains)
        # what the plane's steerers do to the other plane's readings (BESSY II's lattice couples: up to
        # 10 % of the column), per steerer, against the column in its own plane
        other = (np.linalg.norm(measured[1 - p][:, own] - model[1 - p][:, own], axis=0)
                 / np.linalg.norm(r, axis=0))
        assert other.max() < OTHER_PLANE_TOLERANCE, f"{plane} steerers in the other plane: {other.max():.4f}"
