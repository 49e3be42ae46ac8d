"""The IOC's parts without an IOC: stand-in records (``standins.py``), the real tables and journals.

The setpoint desk with the fault desk (delayed, dropped, modified and refused puts), the put log and
the lattice journal, the signal registry's checks, the startup settings, and a whole twin of stand-in
records whose snapshots round-trip.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import DB
from standins import StandIns
from twinioc.ioc import alarms, journal, signals
from twinioc.ioc.config import IDEAL, Config, SettingsError
from twinioc.ioc.fault_desk import FaultDesk
from twinioc.ioc.journal import Journal
from twinioc.ioc.put_log import PutLog
from twinioc.ioc.setpoints import SetpointDesk
from twinioc.ioc.snapshots import Snapshot, SnapshotError
from twinioc.model.tables import MachineTables, PvRow, TableError


def row(pv: str, record: str, device: str = "", signal: str = "", low: object = "", high: object = "",
        description: str = "") -> PvRow:
    return PvRow(pv, record, device, signal, "", "", str(low), str(high), "", "", description, "")


@pytest.fixture
def desks(tmp_path):
    """A setpoint desk and a fault desk for two converters (HS1 ±1 A, Q1 0..100 A) and two BPMs."""
    lock, wake, build, results = threading.Lock(), threading.Event(), StandIns(), []
    put_log = PutLog(Journal(tmp_path / "journal.jsonl"))
    faults = FaultDesk(["HS1", "Q1"], ["BPM1", "BPM2"], lock, wake, put_log,
                       lambda text: results.append(text) or text, lambda device: True, build)
    desk = SetpointDesk({}, lock, wake, put_log, faults.setpoint_fault, build)
    for name, (low, high) in {"HS1": (-1.0, 1.0), "Q1": (0.0, 100.0)}.items():
        desk.add_setpoint(row(f"{name}:set", "ao", name, "setpoint", low, high))
        for status, states in (("power", "OFF/ON"), ("fault", "OK/FAULT")):
            faults.add_status(row(f"{name}:{status}", "mbbi", name, status, description=states))
    faults.add_command(row("TWIN:FAULT:ADD", "command", signal="fault_add"))
    faults.add_report(row("TWIN:FAULT:LIST", "longstring", signal="fault_list"))
    desk.start({"HS1": "hsteerer", "Q1": "quadrupole"}, {})
    return SimpleNamespace(desk=desk, faults=faults, lock=lock, records=build.made, folder=tmp_path, results=results)


def puts(folder) -> list[dict]:
    return [e for e in journal.entries(folder) if e["command"] == "set"]


def test_a_delay_fault_holds_a_command_back_until_its_time(desks):
    desks.faults.add({"kind": "delay", "pattern": "HS1", "seconds": 2.0})
    assert desks.records["HS1:set"].put(0.3)
    (entry,) = puts(desks.folder)
    assert (entry["old"], entry["new"], entry["outcome"], entry["detail"]) == (0.0, 0.3, "accepted",
                                                                                 "delayed 2 s by fault 1")
    now = time.monotonic()
    with desks.lock:
        assert desks.desk.advance(0.04, now + 1.0, set()) == {}
        assert desks.desk.bank.outputs["HS1"].setpoint == 0.0
        moved = desks.desk.advance(0.04, now + 2.1, set())
        assert moved == {"HS1": 0.3}
        assert desks.desk.carried(moved) == [entry["seq"]]  # the next lattice version carries the put


def test_a_dropped_command_never_arrives_and_a_modified_one_stays_within_the_limits(desks):
    desks.faults.add({"kind": "drop", "pattern": "HS1"})
    desks.faults.add({"kind": "modify", "pattern": "Q1", "scale": 2.0, "offset": 1.0})
    assert desks.records["HS1:set"].put(0.5) and desks.records["Q1:set"].put(30.0)
    with desks.lock:
        moved = desks.desk.advance(0.04, time.monotonic(), set())
        assert moved == {"Q1": 61.0} and desks.desk.carried(moved) == [puts(desks.folder)[1]["seq"]]
    assert desks.records["HS1:set"].get() == 0.5  # the setpoint shows the put; the converter never saw it
    assert [e["detail"] for e in puts(desks.folder)] == ["dropped by fault 1", "the converter was given 61 by fault 2"]
    assert desks.records["Q1:set"].put(80.0)
    with desks.lock:
        assert desks.desk.advance(0.04, time.monotonic(), set()) == {"Q1": 100.0}  # 161 A, held to DRVH


def test_nan_is_refused_journaled_and_alarmed_at_the_next_tick_and_a_good_put_clears_it(desks):
    record = desks.records["HS1:set"]
    assert record.put(0.2)
    assert not record.put(math.nan) and record.get() == 0.2
    refused = puts(desks.folder)[-1]
    assert (refused["outcome"], refused["old"], refused["new"]) == ("refused", 0.2, "nan")
    assert refused["detail"] == "nan is not a finite number"
    with desks.lock:
        refusals = desks.desk.take_refusals()
    assert refusals == [("HS1", "nan is not a finite number")]
    desks.desk.refuse(*refusals[0])  # processes the record: the desk knows that is no put
    assert (record.severity, record.status) == (alarms.MINOR_ALARM, alarms.WRITE_ALARM)
    assert len(puts(desks.folder)) == 2 and record.get() == 0.2
    desks.desk.settled({"HS1": 0.2})
    assert record.severity == alarms.NO_ALARM


def test_a_bad_fault_is_refused_with_the_reason_and_a_trip_shows_in_the_status(desks):
    command = desks.records["TWIN:FAULT:ADD"]
    assert not command.put("explode HS1")
    assert desks.results[-1].startswith("refused 'explode HS1': no fault kind 'explode'")
    last = list(journal.entries(desks.folder))[-1]
    assert (last["command"], last["pv"], last["outcome"]) == ("fault", "TWIN:FAULT:ADD", "refused")
    assert command.put("trip Q1")
    assert desks.records["TWIN:FAULT:LIST"].get() == "1: trip Q1 (1 converter)"
    assert (desks.records["Q1:power"].get(), desks.records["Q1:fault"].get()) == (0, 1)
    assert desks.records["Q1:set"].put(50.0)
    with desks.lock:
        moved = desks.desk.advance(0.04, time.monotonic(), desks.faults.tripped())
    assert moved == {} and desks.desk.bank.outputs["Q1"].tripped  # held at zero while tripped
    assert desks.faults.clear("all").startswith("cleared 1 fault")
    with desks.lock:
        assert desks.desk.advance(0.04, time.monotonic(), desks.faults.tripped()) == {"Q1": 50.0}


def test_the_put_log_writes_each_put_and_the_lattice_journal_names_the_version_that_carried_it(tmp_path):
    log = PutLog(Journal(tmp_path / "journal.jsonl"))
    log.hold("TWIN:BPM:NOISE", 1.0)
    control = log.accepted("control", "TWIN:BPM:NOISE", 3.0)
    setpoint = log.accepted("set", "HS1:set", 0.1, device="HS1", old=0.0, detail="at the upper limit")
    refused = log.refused("set", "HS1:set", math.nan, "nan is not a finite number", device="HS1", old=0.1)
    Journal(tmp_path / "lattice.jsonl").append({"version": 7, "outputs": {"HS1": 0.1}, "puts": [setpoint]})
    entries = {e["seq"]: e for e in journal.entries(tmp_path)}
    assert {k: entries[control][k] for k in ("command", "pv", "old", "new", "outcome")} == {
        "command": "control", "pv": "TWIN:BPM:NOISE", "old": 1.0, "new": 3.0, "outcome": "accepted"}
    assert entries[setpoint]["lattice_version"] == 7 and entries[setpoint]["detail"] == "at the upper limit"
    assert entries[control]["lattice_version"] is None and entries[refused]["lattice_version"] is None
    assert (entries[refused]["outcome"], entries[refused]["new"]) == ("refused", "nan")
    lines = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert all("lattice_version" not in line for line in lines)  # a line holds what was known at the put


@pytest.mark.parametrize("machine", ["bessy2", "mls"])
def test_every_row_of_the_tables_names_a_known_signal_of_a_fitting_record_and_device(machine):
    tables = MachineTables(DB / machine)
    rows = tables.pvs("TWIN:")
    signals.check(rows, tables)
    tune = next(r for r in rows if r.signal == "tune_x")
    with pytest.raises(TableError, match=rf"pvs.csv line {tune.line} \(TWIN:TUNE:X\): unknown signal 'tune_xx'"):
        signals.check([replace(tune, signal="tune_xx")], tables)
    with pytest.raises(TableError, match="signal 'tune_x' takes a record of kind ai or .*, not 'ao'"):
        signals.check([replace(tune, record="ao")], tables)
    setpoint = next(r for r in rows if r.signal == "setpoint")
    with pytest.raises(TableError, match="'NOSUCH' is not a converter of this machine"):
        signals.check([replace(setpoint, device="NOSUCH")], tables)


@pytest.mark.parametrize("machine", ["bessy2", "mls"])
def test_every_row_is_built_by_the_part_that_serves_its_signal(machine, tmp_path):
    from twinioc.ioc.physics import MagnetErrors
    from twinioc.ioc.twin import Twin

    config = Config.for_machine(machine)
    build = StandIns()
    twin = Twin(config, MachineTables(config.tables), tmp_path, None, MagnetErrors(
        config.realism.magnet_error_settings), build)
    served = twin.build()
    assert set(served) == set(build.made) | ({"ORBITCC:rdBpm"} if machine == "bessy2" else set())
    assert len(served) == len(MachineTables(config.tables).pvs(config.prefix))


def test_an_unknown_or_mistyped_setting_is_refused_with_the_known_keys():
    with pytest.raises(SettingsError, match=r"no setting 'begin' \(known: machine, tables, prefix, rate_hz"):
        Config.for_machine("mls", ["begin.state=x"])
    with pytest.raises(SettingsError, match="start.state = 'x': it takes operation or commissioning"):
        Config.for_machine("mls", ["start.state=x"])
    with pytest.raises(SettingsError, match=r"orbit_feedback.gain = 0.0: it must be in \(0, 1\]"):
        Config.for_machine("mls", ["orbit_feedback.gain=0"])
    with pytest.raises(SettingsError, match=r"no setting 'beam.lifetme_h' \(known in beam: beam.current_mA"):
        Config.for_machine("mls", ["beam.lifetme_h=2"])
    with pytest.raises(SettingsError, match="rate_hz = 'fast': it takes a number"):
        Config.for_machine("mls", ["rate_hz=fast"])
    with pytest.raises(SettingsError, match="journal.keep = 2.5: it takes an integer"):
        Config.for_machine("mls", ["journal.keep=2.5"])
    for bad, says in (("beam.gas_lifetime_h=0", "beam.gas_lifetime_h = 0.0: it must be > 0"),
                      ("beam.bunches=-1", "beam.bunches = -1: it must be >= 0"),
                      ("equilibrium.vertical_emittance_floor_pm=-5", "floor_pm = -5.0: it must be >= 0"),
                      ("equilibrium.momentum_acceptance=nan", "momentum_acceptance = nan: it must be > 0"),
                      ("beam.lifetime_h=-2", "beam.lifetime_h = -2.0: it takes nan")):
        with pytest.raises(SettingsError, match=says):
            Config.for_machine("mls", [bad])
    config = Config.for_machine("mls", [*IDEAL, "errors.offsets_um.Q2M1K3RP=[120, -80]", "rate_hz=10"])
    assert config.rate_hz == 10.0 and config.realism.magnet_offsets == {"Q2M1K3RP": pytest.approx((120e-6, -80e-6))}
    assert Config.for_machine("mls").rate_hz == 25.0  # the default, stated in startup/defaults.toml only


def snapshot(machine: str = "MLS", n: int = 2) -> Snapshot:
    from twinioc.model.realism import MagnetErrorSettings

    controls = {":bpm_noise_um": 3.0, "HS1:power_switch": 1}
    bpm = {"offset": [[1e-5] * n, [0.0] * n], "gain": [[1.0] * n] * 2, "roll": [0.0] * n, "noise": [1e-6] * n}
    magnets = MagnetErrorSettings(3, 3e-5, 3e-5, 1e-4, {"Q1M1": (1e-4, 0.0)})
    return Snapshot(machine, "2026-12-01T10:00:00.000+00:00", {"HS1": 0.25}, controls, [2], bpm, magnets,
                    [{"kind": "drop", "pattern": "HS1"}], {"current_mA": 120.5, "injecting": False})


def test_a_snapshot_file_round_trips_and_a_foreign_or_broken_one_is_refused():
    saved = snapshot()
    again = Snapshot.from_json(saved.to_json(), "MLS", 2)
    assert again == saved and isinstance(again.controls["HS1:power_switch"], int)
    with pytest.raises(SnapshotError, match="it is of MLS, not BESSY II"):
        Snapshot.from_json(saved.to_json(), "BESSY II", 2)
    with pytest.raises(SnapshotError, match="not those of 3 BPMs"):
        Snapshot.from_json(saved.to_json(), "MLS", 3)
    broken = json.loads(saved.to_json())
    del broken["faults"]
    with pytest.raises(SnapshotError, match="lacks faults"):
        Snapshot.from_json(json.dumps(broken), "MLS", 2)
    broken = json.loads(saved.to_json()) | {"setpoints": {"HS1": "high"}}
    with pytest.raises(SnapshotError, match="cannot be read"):
        Snapshot.from_json(json.dumps(broken), "MLS", 2)


def test_a_whole_twin_of_stand_ins_takes_a_snapshot_and_restores_it_exactly(tmp_path):
    from twinioc.ioc.physics import MagnetErrors
    from twinioc.ioc.twin import Twin

    config = Config.for_machine("mls")  # with BPM calibration errors and magnet errors
    errors = MagnetErrors(config.realism.magnet_error_settings)
    build = StandIns()
    twin = Twin(config, MachineTables(config.tables), tmp_path, None, errors, build)
    twin.build()
    twin.setpoints.start({name: c.kind for name, c in twin.tables.converters.items()}, {})
    twin.run_time.bank = twin.setpoints.bank
    twin.controls.show()
    made = build.made
    assert made["TWIN:SNAPSHOT:SAVE"].put("before")
    before = twin.snapshots.take()
    assert made["HS1P1K1RP:setCur"].put(0.7) and made["TWIN:BPM:NOISE"].put(5.0) and made["TWIN:HS1P1K1RP:POWER"].put(0)
    assert not made["TWIN:BPM:NOISE"].put(math.nan) and made["TWIN:BPM:NOISE"].get() == 5.0  # refused, journaled
    assert [e["outcome"] for e in journal.entries(tmp_path) if e["pv"] == "TWIN:BPM:NOISE"] == ["accepted", "refused"]
    assert made["TWIN:FAULT:ADD"].put("drop Q*") and made["TWIN:OPTICS:MODE"].put(2)
    twin.publisher.bpm_errors.offset[:] = 0.0
    errors.change(replace(errors.settings, seed=99))
    assert not made["TWIN:SNAPSHOT:RESTORE"].put("nosuch")  # refused at once: no such snapshot
    assert made["TWIN:SNAPSHOT:RESTORE"].put("before")
    after = twin.snapshots.take()
    assert replace(after, saved_at="") == replace(before, saved_at="")
    assert made["HS1P1K1RP:setCur"].get() == before.setpoints["HS1P1K1RP"]
    assert made["TWIN:BPM:NOISE"].get() == before.controls[":bpm_noise_um"]
    assert twin.setpoints.bank.outputs["HS1P1K1RP"].on
    assert errors.settings.seed == config.realism.seed and made["TWIN:SEED"].get() == config.realism.seed
    assert np.any(twin.publisher.bpm_errors.offset != 0.0)  # the BPMs' calibration errors came back
    assert made["TWIN:FAULT:LIST"].get() == ""
    restore = [e for e in journal.entries(tmp_path) if e["command"] == "snapshot"][-1]
    assert restore["outcome"] == "accepted" and restore["setpoints"] == before.setpoints


# -- the supervised physics worker ----------------------------------------------------------------


@pytest.fixture
def running(tmp_path):
    """An ideal MLS twin of stand-in records with a real physics worker, ticked by hand."""
    from twinioc.ioc.physics import MagnetErrors, Supervisor
    from twinioc.ioc.twin import Twin

    config = Config.for_machine("mls", IDEAL)
    errors = MagnetErrors(config.realism.magnet_error_settings)
    reports = []
    supervisor = Supervisor(errors.setup(config.tables, None), 10.0, 3, reports.append)
    build = StandIns()
    twin = Twin(config, MachineTables(config.tables), tmp_path, supervisor, errors, build)
    twin.build()
    twin.start()
    twin.tick(0.04, time.monotonic())
    yield SimpleNamespace(twin=twin, records=build.made, reports=reports)
    supervisor.close()


def tick_until(twin, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        twin.tick(0.04, time.monotonic())
        time.sleep(0.02)
    assert condition()


def test_a_killed_worker_is_replaced_and_every_setpoint_is_in_force_again(running):
    import os
    import signal

    from twinioc.model import Change, Engine

    twin, made = running.twin, running.records
    orbit = made["TWIN:ORBIT:X"]
    version = made["TWIN:LATTICE:VERSION"].get()
    assert orbit.severity == alarms.NO_ALARM and version > 0
    os.kill(twin.supervisor.worker.pid, signal.SIGKILL)
    time.sleep(0.2)
    twin.tick(0.04, time.monotonic())  # the first tick after the death
    assert (orbit.severity, orbit.status) == (alarms.INVALID_ALARM, alarms.COMM_ALARM)
    assert made["TUNEZRP:measX"].severity == alarms.INVALID_ALARM
    assert made["TWIN:PHYSICS:RESTARTS"].get() == 1
    assert made["TWIN:PHYSICS:STATUS"].get().startswith("restarting: the worker process ended (killed by signal 9)")
    assert "killed by signal 9" in running.reports[0]
    assert made["HS1P1K1RP:setCur"].put(0.5)  # while no model answers
    tick_until(twin, lambda: orbit.severity == alarms.NO_ALARM)
    assert made["TWIN:LATTICE:VERSION"].get() > version  # the versions go on
    assert made["TWIN:PHYSICS:STATUS"].get().startswith("running") and twin.supervisor.fatal is None
    model = Engine.from_folder(DB / "mls")
    model.apply([Change(name, model.devices.converters[name].quantity, out.output)
                 for name, out in twin.setpoints.bank.outputs.items()])
    assert twin.setpoints.bank.outputs["HS1P1K1RP"].output == 0.5
    np.testing.assert_allclose(np.asarray(made["TWIN:ORBIT:TRUE:X"].get()), model.compute().x * 1e3, atol=1e-9)


def test_a_worker_that_cannot_start_says_why_and_restarts_that_keep_failing_end_the_twin(tmp_path):
    import os
    import shutil
    import signal

    from twinioc.ioc.physics import Supervisor, WorkerFailure, WorkerSetup

    broken = tmp_path / "broken"
    shutil.copytree(DB / "mls", broken)
    (broken / "lattice.json").write_text('{"name": "MLS", "elements": [')
    errors = Config.for_machine("mls").realism.magnet_error_settings
    reports = []
    supervisor = Supervisor(lambda version: WorkerSetup(broken, None, errors, version), 10.0, 2, reports.append)
    with pytest.raises(WorkerFailure, match="the worker could not start: JSONDecodeError"):
        supervisor.wait_ready()
    supervisor.close()

    # the first worker runs; every one after it fails to start
    setups = iter([WorkerSetup(DB / "mls", None, errors, 0)])
    supervisor = Supervisor(lambda version: next(setups, WorkerSetup(broken, None, errors, version)), 10.0, 2,
                            reports.append)
    try:
        supervisor.wait_ready()
        assert supervisor.step([], None) is not None
        os.kill(supervisor.worker.pid, signal.SIGKILL)
        time.sleep(0.2)
        deadline = time.monotonic() + 60
        while supervisor.fatal is None and time.monotonic() < deadline:
            assert not supervisor.available()
            time.sleep(0.05)
        assert supervisor.fatal.startswith("physics: 2 new workers in a row did not come up; the last: the worker "
                                           "could not start: JSONDecodeError")
        assert supervisor.restarts == 2 and "killed by signal 9" in reports[0]
    finally:
        supervisor.close()


def test_a_worker_that_stops_answering_is_replaced_after_the_step_time_out():
    import os
    import signal

    from twinioc.ioc.physics import MagnetErrors, Supervisor

    errors, reports = MagnetErrors(Config.for_machine("mls").realism.magnet_error_settings), []
    supervisor = Supervisor(errors.setup(DB / "mls", None), 1.0, 3, reports.append)
    try:
        supervisor.wait_ready()
        assert supervisor.step([], None) is not None
        hung = supervisor.worker.pid
        os.kill(hung, signal.SIGSTOP)
        asked = time.monotonic()
        assert supervisor.step([], None) is None
        assert 1.0 <= time.monotonic() - asked < 5.0
        assert reports == [f"physics: the worker did not answer within 1 s (pid {hung}); starting another worker"]
        deadline = time.monotonic() + 60
        while not supervisor.available() and time.monotonic() < deadline:
            time.sleep(0.05)
        step = supervisor.step([], None)
        assert step is not None and step.state.stable and supervisor.restarts == 1
        assert not Path(f"/proc/{hung}").exists() or "Z" in Path(f"/proc/{hung}/stat").read_text().split()[2]
    finally:
        supervisor.close()
