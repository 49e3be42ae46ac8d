"""The imperfections of model/realism.py, and misaligned magnets against linear optics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from physics import orbit_response, relative_error
from twinioc.model.realism import BpmErrors, ConverterBank, Misalignment, StoredBeam, draw_misalignments, streams


def test_converters_ramp_at_their_slew_rate_and_switch_off_to_zero():
    bank = ConverterBank({"HS1": "hsteerer", "RF": "rf"}, {"hsteerer": 5.0}, {"HS1": 0.0, "RF": 500.0})
    bank.set("HS1", 1.0)
    bank.set("RF", 501.0)
    assert bank.advance(0.1) == {"HS1": pytest.approx(0.5), "RF": 501.0}  # the RF has no slew: it jumps
    assert bank.advance(0.1) == {"HS1": pytest.approx(1.0)}
    assert bank.advance(0.1) == {} and not bank.ramping
    bank.switch("HS1", False)
    assert bank.advance(0.1) == {"HS1": pytest.approx(0.5)}
    assert bank.outputs["HS1"].setpoint == 1.0  # the setpoint is kept while off
    bank.advance(1.0)
    assert bank.outputs["HS1"].output == 0.0
    bank.switch("HS1", True)
    bank.set_slew({})  # ramping off: outputs jump
    assert bank.advance(0.1) == {"HS1": 1.0}


def test_bpm_noise_has_its_sigma_and_never_repeats():
    n, sigma = 28, 5e-6
    errors = BpmErrors.draw(n, streams(3)["bpm_errors"], noise=sigma)
    rng = streams(3)["bpm_noise"]
    x, y = np.linspace(-1e-3, 1e-3, n), np.zeros(n)
    readings = np.array([errors.read(x, y, rng)[0] for _ in range(100)])
    assert np.std(readings - x, axis=0).mean() == pytest.approx(sigma, rel=0.1)
    assert len({tuple(r) for r in readings}) == 100


def test_bpm_errors_offset_gain_and_roll():
    errors = BpmErrors.draw(1000, streams(4)["bpm_errors"], offset=100e-6, gain=0.02, roll=1e-3)
    assert np.std(errors.offset) == pytest.approx(100e-6, rel=0.1)
    assert np.std(errors.gain - 1) == pytest.approx(0.02, rel=0.1)
    assert np.std(errors.roll) == pytest.approx(1e-3, rel=0.1)
    x, y = np.full(1000, 1e-3), np.zeros(1000)
    xm, ym = errors.read(x, y, streams(4)["bpm_noise"])  # no noise configured: exact
    np.testing.assert_allclose(xm, errors.gain[0] * np.cos(errors.roll) * 1e-3 + errors.offset[0])
    np.testing.assert_allclose(ym, -errors.gain[1] * np.sin(errors.roll) * 1e-3 + errors.offset[1])


def test_the_same_seed_gives_the_same_numbers():
    def run(seed):
        s = streams(seed)
        errors = BpmErrors.draw(5, s["bpm_errors"], offset=1e-4, noise=1e-6)
        return np.concatenate([np.ravel(errors.read(np.zeros(5), np.zeros(5), s["bpm_noise"])) for _ in range(10)])

    np.testing.assert_array_equal(run(11), run(11))
    assert not np.array_equal(run(11), run(12))


def test_current_decays_with_its_lifetime_and_top_up_holds_the_band():
    beam = StoredBeam(300.0, lifetime_h=1.0, topup=False, band=(299.0, 301.0), fill_rate=5.0, current=300.0)
    beam.advance(360.0, holdable=True)
    assert beam.current == pytest.approx(300.0 * math.exp(-0.1))
    beam.topup = True
    seen = [beam.advance(0.1, holdable=True) for _ in range(20000)]
    assert max(seen[1000:]) <= 301.0 and min(seen[1000:]) >= 299.0 - 300 * 0.1 / 3600  # one tick's decay


def test_beam_dies_with_the_machine_and_comes_back_by_injection():
    beam = StoredBeam(150.0, lifetime_h=math.inf, topup=False, fill_rate=50.0, current=150.0)
    beam.advance(0.1, holdable=False)
    assert not beam.alive
    beam.advance(1.0, holdable=True)
    assert not beam.alive  # no top-up: the beam stays lost
    beam.inject()
    beam.advance(1.0, holdable=True)
    assert beam.current == pytest.approx(50.0)
    beam.advance(10.0, holdable=True)
    assert beam.current == 150.0 and not beam.injecting


def test_misalignments_have_their_sigma():
    errors = draw_misalignments([f"Q{i}" for i in range(2000)], streams(5)["magnet_errors"], 30e-6, 1e-4)
    assert np.std([e.dx for e in errors.values()]) == pytest.approx(30e-6, rel=0.1)
    assert np.std([e.roll for e in errors.values()]) == pytest.approx(1e-4, rel=0.1)
    assert max(abs(e.dy) for e in errors.values()) <= 90e-6  # cut at 3 sigma


@pytest.mark.parametrize("machine, magnet, plane", [("mls", "Q2M1K3RP", 0), ("mls", "Q3M2L2RP", 1),
                                                    ("bessy2", "Q4M1D3R", 0), ("bessy2", "Q3M2T4R", 1)])
def test_a_shifted_quadrupole_kicks_the_orbit_by_k_l_dx(request, machine, magnet, plane):
    """A quadrupole displaced by d acts on the centred beam as a kick θ = K·L·d (thick: ∫K ds · d)."""
    engine = request.getfixturevalue(machine)
    design = engine.ring.deepcopy()
    element = next(w.element for c in engine.devices.converters.values() for w in c.windings if w.magnet == magnet)
    shift = 50e-6
    engine.misalign({magnet: Misalignment(shift if plane == 0 else 0.0, shift if plane == 1 else 0.0)})
    state = engine.compute(chromaticity=False)
    k = engine.ring[element].PolynomB[1] * (1 if plane == 0 else -1)
    expected = orbit_response(design, engine._bpm_refs, element, plane, k * engine.ring[element].Length * shift)
    measured = state.x if plane == 0 else state.y
    assert np.max(np.abs(expected)) > 1e-5
    assert relative_error(measured, expected) < 0.05


def test_an_orbit_beyond_the_aperture_loses_the_beam(mls):
    from twinioc.model import Change

    mls.aperture = (30e-3, 15e-3)
    assert mls.compute().stable
    mls.apply([Change("VS3P1L2RP", "current", 7.0), Change("VS3P2L2RP", "current", 7.0)])
    lost = mls.compute()
    assert not lost.stable and "aperture" in lost.reason


@pytest.mark.parametrize("machine", ["bessy2", "mls"])
def test_the_engine_agrees_with_pyat_on_a_misaligned_ring(request, machine):
    """The engine's own Newton orbit, one-turn matrix and off-momentum tunes against pyAT's closed orbit,
    linear optics, chromaticity and momentum compaction, on a ring with shifted and rolled (coupling)
    magnets, after a series of changes (each search starts from the last orbit) and an RF step."""
    import at
    from twinioc.model import Change

    engine = request.getfixturevalue(machine)
    magnets = [w.magnet for kind in ("quadrupole", "sextupole")
               for c in engine.devices.of_kind(kind) for w in c.windings]
    engine.misalign(draw_misalignments(magnets, streams(7)["magnet_errors"], 40e-6, 2e-4))
    rng = np.random.default_rng(3)
    steerers = [c.name for c in engine.devices.of_kind("hsteerer") + engine.devices.of_kind("vsteerer")]
    quadrupole = engine.devices.of_kind("quadrupole")[0]
    rf = engine.devices.rf
    for step in range(4):
        changes = [Change(s, "current", float(rng.uniform(-0.05, 0.05))) for s in rng.choice(steerers, 5)]
        changes.append(Change(quadrupole.name, "current", quadrupole.default * (1 + 0.002 * step)))
        if step == 3:
            changes.append(Change(rf.name, rf.quantity, rf.default + 0.2))  # kHz: a momentum offset of some 1e-4
        engine.apply(changes)
        state = engine.compute(chromaticity=True)
        assert state.stable, state.reason

        dct = -engine.circumference * (state.rf_frequency - engine.design_rf) / state.rf_frequency
        orbit0, orbits = at.find_orbit4(engine.ring, refpts=engine._bpm_sorted, dct=dct)
        orbits = orbits[engine._bpm_order]
        np.testing.assert_allclose(state.x, orbits[:, 0], atol=1e-9, rtol=1e-6)
        np.testing.assert_allclose(state.y, orbits[:, 2], atol=1e-9, rtol=1e-6)
        assert state.momentum_offset == pytest.approx(orbit0[4], abs=1e-10)
        _, ringdata, optics = engine.ring.get_optics(refpts=engine._optics_refs, orbit=orbit0, get_chrom=True)
        np.testing.assert_allclose(state.tune, optics.mu[-1] / (2 * math.pi), atol=1e-7)
        np.testing.assert_allclose(state.chromaticity, ringdata.chromaticity, atol=2e-3)
        assert state.momentum_compaction == pytest.approx(at.get_mcf(engine.ring, dp=orbit0[4]), rel=1e-4)
    assert abs(state.momentum_offset) > 1e-5
