"""The run store: Bluesky runs of ophyd-async devices written to a real, in-process tiled catalog."""

import threading

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from ophyd_async.core import Array1D, StandardReadable, StandardReadableFormat, init_devices, soft_signal_rw
from twinioc.studies.store import RunStore

N_BPM = 123


class Orbit(StandardReadable):
    """A stand-in for the orbit readback: two arrays of BPM readings and the beam current."""

    def __init__(self, name: str = "") -> None:
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.orbit_x = soft_signal_rw(Array1D[np.float64], np.zeros(N_BPM))
            self.orbit_y = soft_signal_rw(Array1D[np.float64], np.zeros(N_BPM))
            self.current = soft_signal_rw(float, 0.0)
        super().__init__(name=name)


@pytest.fixture
def engine() -> RunEngine:
    return RunEngine(context_managers=[])


@pytest.fixture
def orbit(engine: RunEngine) -> Orbit:
    with init_devices():
        orbit = Orbit()
    return orbit


def measure(orbit: Orbit, readings: list[dict], md: dict, events: int = 3):
    """A run of `events` events of changing orbit readings; what each read() gave is appended to `readings`."""
    rng = np.random.default_rng(7)
    yield from bps.open_run(md=md)
    for i in range(events):
        yield from bps.mv(orbit.orbit_x, rng.normal(size=N_BPM), orbit.orbit_y, rng.normal(size=N_BPM))
        yield from bps.mv(orbit.current, 300.0 - i)
        readings.append((yield from bps.trigger_and_read([orbit])))
    yield from bps.close_run()


def test_a_run_reads_back_as_written_and_survives_a_restart(tmp_path, engine, orbit):
    store = RunStore(tmp_path)
    engine.subscribe(store.callback())
    readings: list[dict] = []
    (uid,) = engine(measure(orbit, readings, md={"kind": "x", "study": "orbit"}))

    run = store.run(uid)
    assert run["start"]["uid"] == uid and run["start"]["kind"] == "x"
    assert run["stop"]["exit_status"] == "success"
    primary = run["streams"]["primary"]
    for field in ("orbit-orbit_x", "orbit-orbit_y", "orbit-current"):
        assert primary[field] == [np.asarray(r[field]["value"]).tolist() for r in readings]
    assert len(primary["orbit-orbit_x"][0]) == N_BPM
    assert len(primary["time"]) == 3
    with pytest.raises(KeyError):
        store.run("no-such-uid")
    store.close()

    store = RunStore(tmp_path)
    try:
        assert store.search(kind="x") == [uid]
        assert store.search(kind="x", study="orbit") == [uid]
        assert store.search(kind="y") == []
        assert store.run(uid)["streams"]["primary"]["orbit-current"] == [300.0, 299.0, 298.0]
    finally:
        store.close()


def test_a_run_engine_in_a_worker_thread_writes_to_the_store(tmp_path, orbit):
    store = RunStore(tmp_path)
    uids: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            engine = RunEngine(context_managers=[])
            engine.subscribe(store.callback())
            uids.extend(engine(bp.count([orbit], num=2, md={"kind": "threaded"})))
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(60)
    try:
        assert not worker.is_alive() and not errors
        assert store.search(kind="threaded") == uids
        assert len(store.run(uids[0])["streams"]["primary"]["orbit-orbit_y"]) == 2
    finally:
        store.close()
