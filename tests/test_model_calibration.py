"""The calibration (``model/calibration.py``) against the real MLS lattice: a LOCO-style fit of an orbit
response made by the same model with known errors finds those errors; BBA results become BPM
offsets; a calibration file that is not one of this machine is refused, saying why."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DB
from twinioc.model import Engine
from twinioc.model.calibration import (
    Calibration,
    CalibrationError,
    KnownErrors,
    fit_response,
    response_with_errors,
    with_bba,
)
from twinioc.model.state import Change
from twinioc.model.tables import MachineTables

BPMS = list(MachineTables(DB / "mls").bpm_names)


@pytest.fixture(scope="module")
def known():
    """The MLS with 0.5 % rms gradient errors on its 24 quadrupole converters, 5 % BPM gains and
    steerer scales, and its orbit response as the measurement would give it (1 µm/A of noise)."""
    return response_with_errors(Engine.from_folder(DB / "mls"), np.random.default_rng(7))


def orm(known: KnownErrors, columns: list[int] | None = None) -> dict:
    """The response as an ORM measurement's result, of all steerers or those of *columns*."""
    columns = list(range(len(known.steerers))) if columns is None else columns
    return {"steerers": [known.steerers[j] for j in columns], "bpms": BPMS, "mm_per_A": known.mm_per_A[:, columns]}


def fitted_gains(calibration: Calibration) -> np.ndarray:
    """The BPM gains in the response's row order: x of every BPM, then y."""
    return np.array([calibration.gain_x[b] for b in BPMS] + [calibration.gain_y[b] for b in BPMS])


def test_an_orm_fit_finds_the_gradient_errors_and_the_gains(mls, known):
    calibration = fit_response(mls, "mls", orm(known))
    fitted = np.array([calibration.converter_scale[q] for q in known.quadrupoles])
    # the gradient errors (0.5 % rms): each to 0.1 %
    assert np.max(np.abs(fitted - known.gradient)) < 1e-3, fitted - known.gradient
    # gains and steerer scales: an ORM knows them only up to one factor per plane (g·c, s/c); their
    # products, the response's own scale per BPM and steerer, to 0.2 %
    n = len(BPMS)
    scales = np.array([calibration.converter_scale[s] for s in known.steerers])
    products, true_products = np.outer(fitted_gains(calibration), scales), np.outer(known.gains, known.scales)
    horizontal = {c.name for c in mls.devices.of_kind("hsteerer")}
    for rows, in_plane in ((slice(0, n), True), (slice(n, 2 * n), False)):
        columns = [j for j, s in enumerate(known.steerers) if (s in horizontal) == in_plane]
        ratio = products[rows, columns] / true_products[rows, columns]
        assert np.max(np.abs(ratio - 1)) < 2e-3, (in_plane, np.max(np.abs(ratio - 1)))
    misfit = calibration.provenance["orm"]["misfit_rms_mm_per_A"]
    assert misfit[0] > 50e-3 and misfit[-1] < 1.2e-3, misfit  # from the errors down to the noise


def test_a_step_too_long_is_shortened(mls):
    """3 % gradient errors: the first full step sets a converter beyond its range and the next makes
    the ring unstable (seed 0); halved, they find the errors all the same."""
    large = response_with_errors(mls, np.random.default_rng(0), gradient_rms=0.03)
    calibration = fit_response(mls, "mls", orm(large))
    fitted = np.array([calibration.converter_scale[q] for q in large.quadrupoles])
    assert np.max(np.abs(large.gradient - 1)) > 0.05
    assert np.max(np.abs(fitted - large.gradient)) < 1e-3, fitted - large.gradient


def test_the_fitted_model_predicts_a_steerer_the_fit_did_not_see(mls, known):
    """Fit on all steerers but one; the calibrated model's column of that one is the machine's."""
    left_out = 5
    calibration = fit_response(mls, "mls", orm(known, [j for j in range(len(known.steerers)) if j != left_out]))
    machine_column = known.mm_per_A[:, left_out]
    plain = mls.orbit_response([known.steerers[left_out]])[:, 0] * 1e3
    model = Engine.from_folder(DB / "mls")
    model.apply([Change(q, "current", model.settings[q] * calibration.scale(q)) for q in known.quadrupoles])
    calibrated = fitted_gains(calibration) * model.orbit_response([known.steerers[left_out]])[:, 0] * 1e3
    # the steerer's own scale is unknown to the fit: compare shapes, scaled by least squares
    def residual(column):
        scale = machine_column @ column / (column @ column)
        return np.linalg.norm(machine_column - scale * column) / np.linalg.norm(machine_column)

    print(f"{known.steerers[left_out]}: relative residual {residual(plain):.2e} plain, "
          f"{residual(calibrated):.2e} calibrated")
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
