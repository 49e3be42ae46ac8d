"""The equilibrium beam through CA: emittance, energy spread, bunch length, beam sizes and the Touschek
lifetime of the running twins, against pyAT's own computations of the same lattices in the test."""

from __future__ import annotations

import math
import warnings

import at
import epics
import numpy as np
import pytest
from at.acceptance.touschek import get_lifetime
from ca import ca_process, caget, wait_for
from conftest import DB, MLS_PREFIX
from twinioc.ioc.config import IDEAL, Config
from twinioc.ioc.signals import SIGNALS
from twinioc.ioc.testing import TwinProcess
from twinioc.model import Engine
from twinioc.model.lattice_io import load_lattice
from twinioc.model.state import Change
from twinioc.model.tables import MachineTables

PREFIXES = {"bessy2": "TWIN:", "mls": MLS_PREFIX}


def settled(prefix: str, timeout: float = 30.0) -> int:
    """Wait until the equilibrium of the published lattice version is published; return the version."""
    version = caget(prefix + "LATTICE:VERSION")
    reached = wait_for(lambda: caget(prefix + "EMITTANCE:VERSION"), lambda v: v >= version, timeout)
    assert reached >= version, f"no equilibrium for lattice version {version}"
    return version


def put_and_settle(pv: str, value, prefix: str) -> None:
    """Put; when it changes the setting, wait for the new lattice version and its equilibrium."""
    before, unchanged = caget(prefix + "LATTICE:VERSION"), caget(pv, as_string=isinstance(value, str)) == value
    assert epics.caput(pv, value, wait=True, timeout=5) == 1
    if not unchanged:
        assert wait_for(lambda: caget(prefix + "LATTICE:VERSION"), lambda v: v > before) > before
    settled(prefix)


def lattice(machine: str) -> at.Lattice:
    return load_lattice(DB / machine / "lattice.json").disable_6d(copy=True)


def at_centre(ring: at.Lattice, index: int):
    """pyAT's linear optics at the centre of element *index* (at the element itself if thin)."""
    if ring[index].Length:
        ring = at.Lattice(ring[:index] + ring[index].divide([0.5, 0.5]) + ring[index + 1:], **ring.attrs)
        index += 1
    _, _, optics = ring.get_optics(refpts=[index])
    return optics[0]


@pytest.mark.parametrize("machine", ["bessy2", "mls"])
def test_the_ideal_rings_equilibrium_matches_pyats_radiation_integrals(machine, twins):
    prefix = PREFIXES[machine]
    settled(prefix)
    expected = lattice(machine).radiation_parameters()
    assert caget(prefix + "EMITTANCE:X") * 1e-9 == pytest.approx(expected.emittances[0], rel=0.01)
    assert caget(prefix + "ENERGY:SPREAD") == pytest.approx(expected.sigma_e, rel=0.01)
    bunch_length = caget(prefix + "BUNCH:LENGTH") * 1e-3
    assert bunch_length == pytest.approx(expected.sigma_l, rel=0.01)
    # and the analytic bunch length, σz = α_c c σδ / (2π f_s)
    analytic = expected.alphac * 299_792_458.0 * expected.sigma_e / (2 * math.pi * expected.f_s)
    assert bunch_length == pytest.approx(analytic, rel=0.03)
    damping = [caget(prefix + f"DAMPING:{plane}") * 1e-3 for plane in "XYS"]
    np.testing.assert_allclose(damping, expected.Tau, rtol=0.01)
    assert caget(prefix + "ENERGY:LOSS") * 1e3 == pytest.approx(expected.U0, rel=0.001)
    assert 0 < caget(prefix + "EMITTANCE:COMPUTE:TIME") < 10_000


@pytest.mark.parametrize("machine", ["bessy2", "mls"])
def test_beam_sizes_follow_the_optics_at_their_source_points(machine, twins):
    """σ = √(εβ + (ησδ)²) with pyAT's optics at each source point's centre (the ideal ring has no
    vertical dispersion: σy = √(εy βy), εy being the model's floor and opening-angle emittance)."""
    prefix = PREFIXES[machine]
    settled(prefix)
    ring = lattice(machine)
    expected = ring.radiation_parameters()
    emittance_y = caget(prefix + "EMITTANCE:Y") * 1e-9
    names = [e.FamName for e in ring]
    rows = [r for r in MachineTables(DB / machine).pvs(prefix) if r.signal in SIGNALS and SIGNALS[r.signal].by_point]
    assert len(rows) >= 4
    for row in rows:
        optics = at_centre(ring, names.index(row.device))
        if row.signal == "beam_size_x_um":
            sigma = math.sqrt(expected.emittances[0] * optics.beta[0] + (optics.dispersion[0] * expected.sigma_e) ** 2)
        else:
            sigma = math.sqrt(emittance_y * optics.beta[1])
        assert caget(row.pv) * 1e-6 == pytest.approx(sigma, rel=0.02), row.pv


def mode_emittance(mode: str) -> float:
    """pyAT's radiation-integral emittance of the MLS in optics *mode* (its table's settings)."""
    engine = Engine.from_folder(DB / "mls")
    settings = MachineTables(DB / "mls").optics[mode]
    engine.apply([Change(d, engine.devices.converters[d].quantity, v) for d, v in settings.items()])
    return engine.ring.radiation_parameters().emittances[0]


def test_the_low_emittance_optics_lowers_the_emittance_by_pyats_ratio(mls_ioc):
    prefix = MLS_PREFIX
    settled(prefix)
    user = caget(prefix + "EMITTANCE:X")
    put_and_settle(prefix + "OPTICS:MODE", "low_emittance", prefix)
    try:
        low = caget(prefix + "EMITTANCE:X")
    finally:
        put_and_settle(prefix + "OPTICS:MODE", "user", prefix)
    expected = mode_emittance("low_emittance") / mode_emittance("user")
    assert low / user == pytest.approx(expected, rel=0.03)
    assert expected < 0.9  # the mode's purpose


def pyat_touschek_h(ring: at.Lattice, voltage: float, emittance_y: float, acceptance: float) -> tuple[float, float]:
    """pyAT's Touschek lifetime (h) of *ring* with its cavities at *voltage* (V), 150 mA in 80 bunches,
    the momentum acceptance min(RF bucket from Qs, *acceptance*); and the bunch length (m)."""
    ring = ring.deepcopy()
    ring.set_rf_voltage(voltage)
    p = ring.radiation_parameters()
    phi = math.asin(p.U0 / voltage)
    qs = math.sqrt(ring.harmonic_number * p.alphac * voltage * math.cos(phi) / (2 * math.pi * ring.energy))
    bucket = 2 * qs / (ring.harmonic_number * p.alphac) * math.sqrt(1 - (math.pi / 2 - phi) * math.tan(phi))
    refs = np.array([i for i, e in enumerate(ring) if e.Length > 0])
    momap = np.tile([min(bucket, acceptance), -min(bucket, acceptance)], (len(refs), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lifetime, *_ = get_lifetime(ring, emittance_y, 0.150 / 80, emitx=p.emittances[0], sigs=p.sigma_l,
                                    sigp=p.sigma_e, momap=momap, refpts=refs, interpolate=False, epsrel=1e-6)
    return lifetime / 3600, p.sigma_l


def test_doubling_the_cavity_voltage_shortens_the_bunch_by_root_two_and_moves_the_touschek_lifetime(mls_ioc):
    """From 250 to 500 kV the bucket grows from 1.0 % to 1.5 % (the lattice's 2 % does not limit it) and
    the bunch shrinks by √2: the Touschek lifetime changes as pyAT computes it for both."""
    prefix = MLS_PREFIX
    readings = {}
    try:
        for kilovolt in (250.0, 500.0):
            put_and_settle("PAHRP:setVoltCav", kilovolt, prefix)
            readings[kilovolt] = {name: caget(prefix + name) for name in
                                  ("BUNCH:LENGTH", "LIFETIME:TOUSCHEK", "EMITTANCE:Y", "MOMENTUM:ACCEPTANCE")}
    finally:
        put_and_settle("PAHRP:setVoltCav", 500.0, prefix)
    low, high = readings[250.0], readings[500.0]
    assert high["BUNCH:LENGTH"] / low["BUNCH:LENGTH"] == pytest.approx(1 / math.sqrt(2), rel=0.03)
    ring = lattice("mls")
    acceptance = Config.for_machine("mls").equilibrium.momentum_acceptance
    expected = {kv: pyat_touschek_h(ring, kv * 1e3, readings[kv]["EMITTANCE:Y"] * 1e-9, acceptance)
                for kv in readings}
    ratio = high["LIFETIME:TOUSCHEK"] / low["LIFETIME:TOUSCHEK"]
    assert ratio == pytest.approx(expected[500.0][0] / expected[250.0][0], rel=0.03)
    assert high["MOMENTUM:ACCEPTANCE"] > low["MOMENTUM:ACCEPTANCE"]
    assert ratio > 1.2  # a larger bucket outweighs the denser bunch


OPENING_ANGLE_LIMIT = 1e-12  # m rad: a flat BESSY II's vertical emittance is below it (test_model_equilibrium)
ROLLED = ["errors.roll_urad=300", "equilibrium.vertical_emittance_floor_pm=0"]


def test_rolled_quadrupoles_raise_the_vertical_emittance_as_pyats_envelope_says(tmp_path):
    """The same seeded rolls in the test's own lattice: pyAT's envelope gives the vertical emittance
    the coupling makes (the wedges matter little on BESSY II's shallow bends)."""
    with TwinProcess("bessy2", "--ideal", *(f"--set={s}" for s in ROLLED), state_dir=tmp_path) as twin:
        code = ("import time\n"
                "version, deadline = epics.caget('TWIN:LATTICE:VERSION', timeout=5), time.time() + 60\n"
                "while (epics.caget('TWIN:EMITTANCE:VERSION', timeout=5) or 0) < version and time.time() < deadline:\n"
                "    time.sleep(0.1)\n"
                "print(epics.caget('TWIN:EMITTANCE:Y', timeout=5), epics.caget('TWIN:EMITTANCE:X', timeout=5))")
        emittance_y, emittance_x = (float(v) * 1e-9 for v in ca_process(twin.client_env, code).split())
    tables = MachineTables(DB / "bessy2")
    engine = Engine.from_tables(tables)
    engine.misalign(Config.for_machine("bessy2", IDEAL + ROLLED).realism.magnet_error_settings.draw(tables))
    rolled = engine.ring.enable_6d(copy=True).envelope_parameters()
    assert emittance_y == pytest.approx(rolled.emittances[1], rel=0.05)
    assert emittance_y > 10 * OPENING_ANGLE_LIMIT  # the flat ring's vertical emittance, raised by the rolls
    assert emittance_x == pytest.approx(rolled.emittances[0], rel=0.02)
