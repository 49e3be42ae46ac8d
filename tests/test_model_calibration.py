"""The calibration (``model/calibration.py``) against the real MLS lattice: a LOCO-style fit of an orbit
response made by the same model with known errors finds those errors; BBA results become BPM
offsets; a calibration file that is not one of this machine is refused, saying why."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DB
from twinioc.model import Engine
from twinioc.model.calibration import Calibration, CalibrationError, fit_response, response_with_errors, with_bba
from twinioc.model.state import Change
from twinioc.model.tables import MachineTables

BPMS = list(MachineTables(DB / "mls").bpm_names)


@pytest.fixture(scope="module")
def machine_with_errors():
    """The MLS with 0.5 % rms gradient errors on its 24 quadrupole converters, 5 % BPM gains and
    steerer scales, and its orbit response as the measurement would give it (1 µm/A of noise)."""
    known = response_with_errors(Engine.from_folder(DB / "mls"), np.random.default_rng(7))
    return {"quadrupoles": known.quadrupoles, "gradient": known.gradient, "steerers": known.steerers,
            "gains": known.gains, "scales": known.scales,
            "result": {"steerers": known.steerers, "bpms": BPMS, "mm_per_A": known.mm_per_A.tolist()}}


def test_an_orm_fit_finds_the_gradient_errors_and_the_gains(mls, machine_with_errors):
    m = machine_with_errors
    calibration = fit_response(mls, "mls", m["result"])
    fitted = np.array([calibration.converter_scale[q] for q in m["quadrupoles"]])
    # the gradient errors (0.5 % rms): each to 0.1 %
    assert np.max(np.abs(fitted - m["gradient"])) < 1e-3, fitted - m["gradient"]
    # gains and steerer scales: an ORM knows them only up to one factor per plane (g·c, s/c); their
    # products, the response's own scale per BPM and steerer, to 0.2 %
    n = len(BPMS)
    gains = np.array([calibration.gain_x[b] for b in BPMS] + [calibration.gain_y[b] for b in BPMS])
    scales = np.array([calibration.converter_scale[s] for s in m["steerers"]])
    products, true_products = np.outer(gains, scales), np.outer(m["gains"], m["scales"])
    planes = [mls.devices.converters[s].windings[0].field for s in m["steerers"]]
    for rows, field in ((slice(0, n), "HKICK"), (slice(n, 2 * n), "VKICK")):
        columns = [j for j, f in enumerate(planes) if f == field]
        ratio = products[rows, columns] / true_products[rows, columns]
        assert np.max(np.abs(ratio - 1)) < 2e-3, (field, np.max(np.abs(ratio - 1)))
    misfit = calibration.provenance["orm"]["misfit_rms_mm_per_A"]
    assert misfit[0] > 50e-3 and misfit[-1] < 1.2e-3, misfit  # from the errors down to the noise


def test_a_step_too_long_is_shortened(mls):
    """3 % gradient errors: the first full step sets a converter beyond its range and the next makes
    the ring unstable (seed 0); halved, they find the errors all the same."""
    known = response_with_errors(mls, np.random.default_rng(0), gradient_rms=0.03)
    calibration = fit_response(mls, "mls", {"steerers": known.steerers, "bpms": BPMS, "mm_per_A": known.mm_per_A})
    fitted = np.array([calibration.converter_scale[q] for q in known.quadrupoles])
    assert np.max(np.abs(known.gradient - 1)) > 0.05
    assert np.max(np.abs(fitted - known.gradient)) < 1e-3, fitted - known.gradient


def test_the_fitted_model_predicts_a_steerer_the_fit_did_not_see(mls, machine_with_errors):
    """Fit on all steerers but one; the calibrated model's column of that one is the machine's."""
    m = machine_with_errors
    left_out = m["steerers"][5]
    keep = [j for j, s in enumerate(m["steerers"]) if s != left_out]
    measured = np.asarray(m["result"]["mm_per_A"])
    result = {"steerers": [m["steerers"][j] for j in keep], "bpms": BPMS, "mm_per_A": measured[:, keep]}
    calibration = fit_response(mls, "mls", result)
    machine_column = measured[:, m["steerers"].index(left_out)]
    plain = mls.orbit_response([left_out])[:, 0] * 1e3
    model = Engine.from_folder(DB / "mls")
    model.apply([Change(q, "current", model.settings[q] * calibration.scale(q)) for q in m["quadrupoles"]])
    gains = np.array([calibration.gain_x[b] for b in BPMS] + [calibration.gain_y[b] for b in BPMS])
    calibrated = gains * model.orbit_response([left_out])[:, 0] * 1e3
    # the steerer's own scale is unknown to the fit: compare shapes, scaled by least squares
    def residual(column):
        scale = machine_column @ column / (column @ column)
        return np.linalg.norm(machine_column - scale * column) / np.linalg.norm(machine_column)

    print(f"{left_out}: relative residual {residual(plain):.2e} plain, {residual(calibrated):.2e} calibrated")
    assert residual(calibrated) * 3 < residual(plain), (residual(calibrated), residual(plain))


def test_bba_results_give_the_bpm_offsets():
    calibration = with_bba(Calibration("mls"), [
        {"params": {"planes": ["y"]}, "result": {"bpm": BPMS[2], "offset_um": [-40.0]}},
        {"bpm": BPMS[3], "planes": ["x", "y"], "offset_um": [12.5, float("nan")]},
        {"bpm": BPMS[4], "offset_um": [1.0, 2.0]},
    ])
    assert calibration.offset_y_mm == {BPMS[2]: -0.04, BPMS[4]: 0.002}
    assert calibration.offset_x_mm == {BPMS[3]: 0.0125, BPMS[4]: 0.001}  # a NaN offset sets nothing
    x, y = calibration.readings(BPMS, np.zeros(len(BPMS)), np.zeros(len(BPMS)))
    assert x[3] == 0.0125 and y[2] == -0.04 and x[0] == y[0] == 0
    for bad in ({"offset_um": [1.0]}, {"bpm": BPMS[0], "planes": ["x"], "offset_um": [1.0, 2.0]},
                {"bpm": BPMS[0], "planes": ["z"], "offset_um": [1.0]}, {"bpm": BPMS[0], "offset_um": ["a", 1]}):
        with pytest.raises(CalibrationError):
            with_bba(Calibration("mls"), [bad])


def test_a_calibration_file_reads_back_and_a_wrong_one_is_refused(mls, tmp_path):
    converters = list(mls.devices.converters)
    path = tmp_path / "calibration.json"
    written = Calibration("mls", gain_x={BPMS[0]: 1.1}, offset_y_mm={BPMS[1]: -0.2},
                          converter_scale={converters[0]: 0.98}, provenance={"orm": {"steerers": 3}})
    written.save(path)
    assert Calibration.load(path, "mls", BPMS, converters) == written
    good = json.loads(path.read_text())
    for change, words in (({"machine": "bessy2"}, "not of 'mls'"), ({"format": 7}, "format"),
                          ({"gain_x": {"NO-SUCH-BPM": 1.0}}, "NO-SUCH-BPM"),
                          ({"gain_y": {BPMS[0]: "x"}}, "not a number"),
                          ({"offset_x_mm": {BPMS[0]: float("nan")}}, "not finite"),
                          ({"converter_scale": [1]}, "table")):
        path.write_text(json.dumps(good | change))
        with pytest.raises(CalibrationError, match=words):
            Calibration.load(path, "mls", BPMS, converters)
    path.write_text("{")
    with pytest.raises(CalibrationError, match="calibration.json"):
        Calibration.load(path, "mls", BPMS, converters)


def test_an_orm_that_is_not_one_is_refused(mls):
    for bad in ({}, {"steerers": ["HS1P2K1RP"], "bpms": BPMS, "mm_per_A": [[1.0]]},
                {"steerers": ["HS1P2K1RP"], "bpms": BPMS, "mm_per_A": [[float("nan")]] * (2 * len(BPMS))}):
        with pytest.raises(CalibrationError):
            fit_response(mls, "mls", bad)
