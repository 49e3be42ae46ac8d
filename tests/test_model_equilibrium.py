"""The equilibrium of the radiating beam (model/equilibrium.py) against pyAT's own methods and against
textbook formulas, on the real lattices. No EPICS here."""

from __future__ import annotations

import math
import warnings

import at
import numpy as np
import pytest
from at.acceptance.touschek import get_lifetime
from conftest import DB
from twinioc.model import equilibrium
from twinioc.model.lattice_io import load_lattice
from twinioc.model.lifetime import BeamLifetime, CurrentMonitor
from twinioc.model.state import Equilibrium, EquilibriumSettings

FILLS = {"bessy2": (300, 300.0, 0.03), "mls": (80, 150.0, 0.02)}  # bunches, mA, lattice acceptance


def ring_of(machine: str) -> at.Lattice:
    return load_lattice(DB / machine / "lattice.json").disable_6d(copy=True)


def settings_of(machine: str, floor_pm: float = 10.0) -> EquilibriumSettings:
    bunches, current, acceptance = FILLS[machine]
    return EquilibriumSettings(bunches, current, acceptance, floor_pm * 1e-12)


@pytest.fixture(scope="module", params=["bessy2", "mls"])
def solved(request):
    ring = ring_of(request.param)
    result = equilibrium.compute(ring, ring.get_rf_frequency(), {}, settings_of(request.param))
    assert not result.reason, result.reason
    return request.param, ring, result


def test_the_equilibrium_agrees_with_pyats_radiation_integrals(solved):
    """The radiation integrals (with the bends' edge terms) are the independent computation."""
    _, ring, result = solved
    integrals = ring.radiation_parameters()
    assert result.emittance[0] == pytest.approx(integrals.emittances[0], rel=0.005)
    assert result.energy_spread == pytest.approx(integrals.sigma_e, rel=0.005)
    assert result.bunch_length == pytest.approx(integrals.sigma_l, rel=0.005)
    np.testing.assert_allclose(result.damping_times, integrals.Tau, rtol=0.005)
    assert result.energy_loss == pytest.approx(integrals.U0, rel=1e-4)


def test_the_methods_differ_by_the_radiation_of_the_edge_wedges(solved):
    """pyAT's envelope without the wedges misses exactly the edge term of I4: J_x(integrals) −
    J_x(envelope) = Σ_edges η h² tan(e) / I2, with η from the linear optics at the edges."""
    machine, ring, _ = solved
    plain = ring.enable_6d(copy=True).envelope_parameters()
    integrals = ring.radiation_parameters()
    edges = []
    for index, element in enumerate(ring):
        if isinstance(element, at.Dipole) and element.BendingAngle:
            h = element.BendingAngle / element.Length
            edges += [(index, h, element.EntranceAngle), (index + 1, h, element.ExitAngle)]
    _, _, optics = ring.get_optics(refpts=[i for i, _, _ in edges])
    wedge_sum = sum(eta * h**2 * math.tan(e) for (_, h, e), eta in zip(edges, optics.dispersion[:, 0], strict=True))
    assert integrals.J[0] - plain.J[0] == pytest.approx(wedge_sum / integrals.i2, rel=0.02)
    if machine == "mls":  # the 20 % the issue saw
        assert plain.emittances[0] / integrals.emittances[0] == pytest.approx(1.227, abs=0.01)


def test_the_touschek_lifetime_agrees_with_pyats_implementation(solved):
    _, ring, result = solved
    refs = np.array([i for i, e in enumerate(ring) if e.Length > 0])
    acceptance = np.tile([result.momentum_acceptance, -result.momentum_acceptance], (len(refs), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lifetime, *_ = get_lifetime(ring, result.emittance[1], result.bunch_current, emitx=result.emittance[0],
                                    sigs=result.bunch_length, sigp=result.energy_spread, momap=acceptance,
                                    refpts=refs, interpolate=False, epsrel=1e-6)
    assert result.touschek_lifetime == pytest.approx(lifetime, rel=1e-3)


def test_the_bucket_height_agrees_with_the_synchrotron_tune(solved):
    """δ_max = 2Qs/(h|α|) · √(1 − (π/2 − φ) tan φ), sin φ = U0/V: the bucket from Qs, another form."""
    _, ring, result = solved
    integrals = ring.radiation_parameters()
    voltage, harmonic = ring.get_rf_voltage(), ring.harmonic_number
    phi = math.asin(integrals.U0 / voltage)
    qs = math.sqrt(harmonic * integrals.alphac * voltage * math.cos(phi) / (2 * math.pi * ring.energy))
    expected = 2 * qs / (harmonic * integrals.alphac) * math.sqrt(1 - (math.pi / 2 - phi) * math.tan(phi))
    assert result.bucket_height == pytest.approx(expected, rel=1e-3)
    assert result.momentum_acceptance == min(result.bucket_height, settings_of("mls").momentum_acceptance
                                             if ring.harmonic_number == 80 else 0.03)


def test_the_opening_angle_sets_the_vertical_emittance_of_a_flat_ring():
    ring = ring_of("bessy2")
    result = equilibrium.compute(ring, ring.get_rf_frequency(), {}, settings_of("bessy2", floor_pm=0.0))
    assert 0.1e-12 < result.emittance[1] < 1e-12  # the quantum limit, under a picometre


def test_beam_sizes_at_a_bend_centre_follow_the_optics():
    ring = ring_of("mls")
    index = [e.FamName for e in ring].index("BM1L2RP")
    result = equilibrium.compute(ring, ring.get_rf_frequency(), {"BM1L2RP": index}, settings_of("mls"))
    pieces = ring[index].divide([0.5, 0.5])
    halved = at.Lattice(ring[:index] + pieces + ring[index + 1:], **ring.attrs)
    _, _, optics = halved.get_optics(refpts=[index + 1])
    beta, eta = optics.beta[0], optics.dispersion[0, 0]
    sigma_x = math.sqrt(result.emittance[0] * beta[0] + (eta * result.energy_spread) ** 2)
    sigma_y = math.sqrt(result.emittance[1] * beta[1])
    assert result.beam_sizes["BM1L2RP"] == pytest.approx((sigma_x, sigma_y), rel=0.01)


@pytest.mark.filterwarnings("ignore:Closed orbit not found")
def test_a_ring_without_rf_bucket_has_no_equilibrium_and_says_why():
    ring = ring_of("mls")
    for cavity in ring.get_elements(at.RFCavity):
        cavity.Voltage = 1e3  # far below the 9 keV lost per turn
    result = equilibrium.compute(ring, ring.get_rf_frequency(), {}, settings_of("mls"))
    assert result.reason and math.isnan(result.emittance[0])


def test_the_touschek_lifetime_scales_with_the_bunch_current():
    e = Equilibrium(1, touschek_lifetime=3600.0, bunch_current=150e-3 / 80, bunches=80)
    assert e.touschek_at(75.0) == pytest.approx(7200.0)
    lifetime = BeamLifetime(override_h=math.nan, gas_h=20.0)
    total, source = lifetime.now(e, 150.0)
    assert total == pytest.approx(1 / (1 / 1.0 + 1 / 20.0)) and source.startswith("physics")
    lifetime.override_h = 3.0
    assert lifetime.now(e, 150.0)[0] == 3.0


def test_the_current_monitor_fits_the_decay_and_starts_again_after_an_injection():
    monitor = CurrentMonitor((10.0, 100.0), noise_mA=1e-3, rng=np.random.default_rng(1))
    tau_s = 600.0
    for tick in range(500):  # 20 s at 25 Hz
        t = tick * 0.04
        monitor.read(t, 150.0 * math.exp(-t / tau_s))
    assert monitor.lifetime_h(10.0) * 3600 == pytest.approx(tau_s, rel=0.02)
    monitor.read(20.04, 150.0)  # refilled
    assert math.isnan(monitor.lifetime_h(10.0))
