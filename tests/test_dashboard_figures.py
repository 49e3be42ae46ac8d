"""The dashboard's figures without a browser: the resonance lines of the tune diagram, the beam
sizes at the BPMs against pyAT's own envelope of the same lattice, the saved states."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DB
from twinioc.dashboard.figures import beam_size_values, resonance_lines, result_figure
from twinioc.dashboard.saved import SavedStates
from twinioc.model.lattice_io import load_lattice


def test_resonance_lines_in_the_unit_square():
    """m·Qx + n·Qy = p, 1 ≤ |m|+|n| ≤ 4, each line once (2·Qx = 2 is Qx = 1), corners alone left out.
    Counted by hand: order 1 the square's four sides; order 2 Qx = ½, Qy = ½ and the two diagonals;
    order 3 Qx, Qy = ⅓, ⅔ and two lines each of 2Qx ± Qy and Qx ± 2Qy; order 4 Qx, Qy = ¼, ¾,
    three each of 3Qx ± Qy and Qx ± 3Qy, two each of 2Qx ± 2Qy."""
    lines = resonance_lines(4)
    assert {k: len(v) for k, v in lines.items()} == {1: 4, 2: 4, 3: 12, 4: 20}
    for order, segments in lines.items():
        for (x0, y0), (x1, y1) in segments:
            assert all(0 <= v <= 1 for v in (x0, y0, x1, y1)) and (x0, y0) != (x1, y1)
            # the segment lies on a line of its order: some m, n with |m|+|n| = order through both ends
            assert any(abs(m * (x1 - x0) + n * (y1 - y0)) < 1e-12
                       and abs(m * x0 + n * y0 - round(m * x0 + n * y0)) < 1e-12
                       for m in range(-order, order + 1) for n in range(0, order + 1) if abs(m) + n == order)


@pytest.mark.parametrize("machine", ["mls", "bessy2"])
def test_beam_sizes_against_pyat_envelope(machine, request):
    """σx = √(βx εx + (ηx σδ)²) from the model's optics at the BPMs, with pyAT's equilibrium emittance
    and energy spread, against √Σ11 of pyAT's Ohmi envelope at the same BPMs: within 1 %."""
    engine = request.getfixturevalue(machine)
    ring = load_lattice(DB / machine / "lattice.json").enable_6d(copy=True)
    refs = np.array([b.element for b in engine.devices.bpms])
    order = np.argsort(refs)
    start, beam, envelope = ring.ohmi_envelope(refpts=refs[order])
    sigma_x_um = np.sqrt(envelope["r66"][:, 0, 0])[np.argsort(order)] * 1e6
    sizes = beam_size_values(engine.bpm_optics(), beam.mode_emittances[0] * 1e9, 0.0, np.sqrt(start["r66"][4, 4]))
    assert np.max(np.abs(sizes["x"] / sigma_x_um - 1)) < 0.01
    assert np.all(sizes["y"] == 0)  # no vertical emittance, no vertical dispersion: no vertical size


def test_bba_result_plot_crosses_where_the_result_says():
    """The dotted line of a BBA plot at its zero crossing, the fit line through zero there."""
    slope, intercept = 2.0, -0.3
    positions = np.linspace(-0.5, 0.5, 5)
    record = {"id": "a", "kind": "bba", "status": "done", "params": {"planes": ["x"]},
              "result": {"quadrupole": "Q", "crossing_um": [-intercept / slope * 1e3], "offset_um": [150.0],
                         "sigma_um": [1.0], "bpm": "B"},
              "raw": {"x": {"positions_mm": positions.tolist(), "response_size_mm": (slope * positions + intercept)
                            .tolist(), "fit_slope": slope, "fit_intercept_mm": intercept}}}
    figure = result_figure(record)
    (shape,) = figure.layout.shapes
    fit = next(t for t in figure.data if t.name == "fit x")
    assert shape.x0 == pytest.approx(0.15)
    assert np.interp(shape.x0, fit.x, fit.y) == pytest.approx(0.0, abs=1e-12)


def test_saved_states(tmp_path):
    saved = SavedStates(tmp_path)
    saved.save("before", {"orbit_x_mm": [0.1, 0.2], "tune_x": 0.17})
    saved.save("after", {"orbit_x_mm": [0.3, 0.4], "tune_x": 0.18})
    assert set(saved.names()) == {"after", "before"}
    assert SavedStates(tmp_path).get("before")["orbit_x_mm"] == [0.1, 0.2]  # on disk, for the next start
    for bad in ("", "a b", "x" * 41, None, "../up"):
        with pytest.raises(ValueError):
            saved.save(bad, {})
    saved.path.write_text("{not json")  # a damaged file is kept aside, and saving starts again
    assert saved.names() == [] and saved.path.with_suffix(".damaged").read_text() == "{not json"
    saved.save("again", {})
    assert saved.names() == ["again"]
