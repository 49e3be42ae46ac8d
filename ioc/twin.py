"""The twin as an IOC: records from the machine's PV table, puts to the model, beam state out.

``Twin`` coordinates named parts, each in its own module:

* ``setpoints.SetpointDesk``: what a put on a setpoint, a power switch or the optics mode does; the
  converter bank;
* ``controls.ControlPanel``: the twin's run-time controls (noise, lifetime, top-up, ramps);
* ``fault_desk.FaultDesk``: ``$(P)FAULT:*``, a scenario's schedule, trips, the converter status;
* ``snapshots.SnapshotDesk``: ``$(P)SNAPSHOT:*``, the twin's whole state by name;
* ``orbit_feedback.OrbitFeedback``: the ring's slow orbit feedback (its switch, status and reference);
* ``inert.InertDesk``: settings the twin keeps that drive nothing (legacy names);
* ``put_log.PutLog``: the journal entry of every put;
* ``publisher.Publisher``: readings and readbacks to records, with their alarms;
* ``physics.Supervisor``: the physics worker, replaced when it dies or hangs.

Every tick (``rate_hz``, or at once after a put) the converters move, the ones that moved go to the
physics worker as one batch, the worker reports the new lattice version and beam state, the beam
lives or dies, and the publisher shows it. ``signals.py`` says what each PV's signal is.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from importlib import import_module
from pathlib import Path

from twinioc.model.lifetime import BeamLifetime, CurrentMonitor
from twinioc.model.realism import StoredBeam
from twinioc.model.state import BeamState, Change, Equilibrium
from twinioc.model.tables import MachineTables, PvRow

from . import signals
from .config import Config
from .controls import ControlPanel, RunTime
from .equilibrium import EquilibriumWorker, Lattice
from .fault_desk import FaultDesk
from .inert import InertDesk
from .journal import Journal
from .orbit_feedback import OrbitFeedback
from .physics import OPTICS_KINDS, MagnetErrors, StartSettings, Step, Supervisor
from .publisher import Publisher
from .put_log import START, PutLog
from .replay import Envelope
from .setpoints import SetpointDesk
from .signals import Publication
from .snapshots import SnapshotDesk, TwinParts

log = logging.getLogger("twinioc")

MIN_TICK_GAP = 0.01  # s: puts bring the next tick forward, but ticks start at most this often
NO_BEAM = "no beam stored: inject ($(P)BEAM:INJECT) or enable top-up"


class Twin:
    """The coordinator: owns the lock that every part shares, the wake-up a put gives, the tick loop
    and the order of a tick; builds the records of the PV table through the parts that serve them."""

    def __init__(self, config: Config, tables: MachineTables, state_dir: Path, supervisor: Supervisor,
                 magnet_errors: MagnetErrors, build=None, equilibria: EquilibriumWorker | None = None):
        """*build*: the record builders, ``records`` (softioc's) unless stand-ins are given;
        *equilibria*: the equilibrium's worker (none: no equilibrium, the lifetime from gas alone)."""
        self.config, self.tables = config, tables
        records = self._build = build or import_module("twinioc.ioc.records")
        self.rows = tables.pvs(config.prefix)
        signals.check(self.rows, tables)
        self.lock, self._wake, self._stop = threading.Lock(), threading.Event(), threading.Event()
        size, keep = int(config.journal_max_mb * 1e6), config.journal_keep
        self.put_log = PutLog(Journal(state_dir / "journal.jsonl", size, keep))
        self.versions = Journal(state_dir / "lattice.jsonl", size, keep)
        realism = config.realism
        self.beam = StoredBeam(config.beam_current_mA, config.lifetime_h, config.topup, config.topup_band_mA,
                               config.fill_rate_mA_per_s, current=config.beam_current_mA)
        self.magnet_errors, self.supervisor = magnet_errors, supervisor
        self.publisher = Publisher(tables, self.rows, realism, records)
        self.converter_scale: dict[str, float] = {}  # converter -> the scale a calibration measured
        self.faults = FaultDesk(list(tables.converters), tables.bpm_names, self.lock, self._wake, self.put_log,
                                self.result, lambda device: self.setpoints.bank.outputs[device].on, records)
        self.setpoints = SetpointDesk(tables.optics, self.lock, self._wake, self.put_log, self.faults.setpoint_fault,
                                      records)
        self.setpoints.on_power = lambda device: self.faults.show()
        self.lifetime = BeamLifetime(config.lifetime_h, config.gas_lifetime_h)
        self.current_monitor = CurrentMonitor((signals.SHORT_WINDOW_S, signals.LONG_WINDOW_S),
                                              config.current_noise_mA, self.publisher.random["current_noise"])
        self.equilibria, self.equilibrium = equilibria, None
        self.run_time = RunTime(self.beam, self.publisher.bpm_errors, realism, self.lifetime)
        self.controls = ControlPanel(self.run_time, self.lock, self._wake, self.put_log, records)
        self.inert = InertDesk(self.rows, self.put_log, records)
        steerers = [name for name, c in tables.converters.items() if c.kind in ("hsteerer", "vsteerer")]
        max_step = {name: step for name, step in Envelope.for_machine(config).max_step.items() if name in steerers}
        feedback = config.feedback
        self.feedback = OrbitFeedback(self.setpoints, self.put_log, len(tables.bpms), max_step, feedback.period_s,
                                      feedback.correction, feedback.enabled, records)
        self.beam_physics = {"equilibrium": config.equilibrium.as_dict() if config.equilibrium else None,
                             "gas_lifetime_h": config.gas_lifetime_h, "current_noise_mA": config.current_noise_mA}
        parts = TwinParts(self.setpoints, self.controls, self.faults, self.publisher, self.beam, self.magnet_errors,
                          self.beam_physics)
        self.snapshots = SnapshotDesk(state_dir / "snapshots", config.machine, parts, self.lock, self.put_log,
                                      self.result, records)
        self._results: list = []  # the command_result records
        self.state: BeamState | None = None
        self._carried: list[int] = []  # puts the next lattice line is to name

    # -- records --------------------------------------------------------------------------------

    def build(self) -> list[str]:
        """Create every record of the PV table, each by the part that serves its signal; return the
        names served."""
        by_role = {role: self.publisher.add for role in ("reading", "readback", "bpm_reading", "array", "names",
                                                         "table")}
        by_role |= {"setpoint": self.setpoints.add_setpoint, "power_switch": self.setpoints.add_switch,
                    "optics_mode": self.setpoints.add_optics, "control": self.controls.add,
                    "converter_status": self.faults.add_status, "inert_setting": self.inert.add_setting,
                    "inert_readback": self.inert.add_readback, "orbit_feedback": self.feedback.add,
                    "replay_marker": self.setpoints.add_replay_marker}
        by_signal = {"fault_add": self.faults.add_command, "fault_clear": self.faults.add_command,
                     "fault_list": self.faults.add_report, "fault_count": self.faults.add_report,
                     "snapshot_save": self.snapshots.add_command, "snapshot_restore": self.snapshots.add_command,
                     "snapshot_list": self.snapshots.add_report, "seed": self.snapshots.add_report,
                     "command_result": self._add_result}
        for row in self.rows:
            (by_signal.get(row.signal) or by_role[signals.SIGNALS[row.signal].role])(row)
        self.publisher.finish()
        return [row.pv for row in self.rows]

    def _add_result(self, row: PvRow) -> object:
        record = self._build.longstring(row)
        self._results.append(record)
        return record

    def result(self, text: str) -> str:
        """Say what a command did, with the time: the same outcome twice is still a new result.
        Returns *text*, for the journal."""
        log.info("%s", text)
        stamp = f" (at {datetime.now(UTC).strftime('%H:%M:%S.%f')[:-3]} UTC)"
        for record in self._results:
            record.set(text[:255 - len(stamp)] + stamp)
        return text

    # -- start ----------------------------------------------------------------------------------

    def restore_setpoints(self, values: dict[str, float]) -> list[str]:
        """Before the IOC runs: show *values* (from the journal) in the setpoint records; return the
        devices this twin does not have."""
        self.setpoints.set_setpoints({d: v for d, v in values.items() if d in self.setpoints.setpoints})
        return sorted(set(values) - set(self.setpoints.setpoints))

    def start(self) -> None:
        """The physics worker is ready: the converters start at their setpoints as the records hold
        them, every record shows where it starts, and the first tick sends every output to the model."""
        self.supervisor.wait_ready()
        self._start_in_operation(self.supervisor.worker.start)
        self.setpoints.start(self.supervisor.worker.kinds, self.config.realism.slew_rates)
        self.feedback.start(self.supervisor.worker.steerers)
        self.run_time.bank = self.setpoints.bank
        self.controls.show()
        self.faults.show()
        self.snapshots.show()
        self.versions.append({"event": "start", "machine": self.config.machine,
                              "seed": self.magnet_errors.settings.seed, "version": self.supervisor.version,
                              "beam_physics": self.beam_physics})

    def _start_in_operation(self, start: StartSettings) -> None:
        """A fresh twin in operation: the settings its correction found become the setpoints, as one
        journal entry of source ``start``."""
        if start.note:
            log.info("start in operation: %s", start.note)
        if start.settings:
            self.setpoints.set_setpoints(start.settings, lambda: self.put_log.accepted(
                "start", "", "operation", detail=start.note, setpoints=start.settings, source=START))
            log.info("start in operation: %d converters set (steerers and tune knobs)", len(start.settings))

    # -- the tick -------------------------------------------------------------------------------

    def run(self) -> None:
        """Tick at the configured rate until ``stop()`` or until the physics cannot go on (``fatal``).

        A put does not wait for the next tick: it wakes the loop (at most every ``MIN_TICK_GAP``),
        and the period starts again from there.
        """
        period = 1.0 / self.config.rate_hz
        last = next_tick = time.monotonic()
        while not self._stop.is_set() and self.fatal is None:
            now = time.monotonic()
            dt, last = now - last, now
            try:
                self.tick(dt, now)
            except Exception:  # noqa: BLE001 - a publication bug must not stop the IOC
                log.exception("the tick failed")
            next_tick = max(next_tick + period, time.monotonic())
            if self._wake.wait(max(0.0, next_tick - time.monotonic())):
                self._wake.clear()
                time.sleep(max(0.0, now + MIN_TICK_GAP - time.monotonic()))
                next_tick = time.monotonic()

    @property
    def fatal(self) -> str | None:
        """Why the twin cannot go on, if it cannot."""
        return self.supervisor.fatal

    def tick(self, dt: float, now: float) -> None:
        """One tick: converters move, one batch goes to the model, the beam lives or dies, one
        publication. Without a model (a worker starting), the readbacks go on and the readings wait."""
        available = self.supervisor.available()
        with self.lock:
            moved = self.setpoints.advance(dt, now, self.faults.tripped())
            if self.supervisor.fresh:  # a new worker: every converter as it stands
                moved = self._outputs()
            refusals = self.setpoints.take_refusals()
            self._carried += self.setpoints.carried(moved)
            errors = self.magnet_errors.take_unsent() if available else None
        for device, reason in refusals:
            self.setpoints.refuse(device, reason)
        self.faults.strike(now)
        step = self._step(moved, errors) if available else None
        self._follow_equilibrium(step, errors)
        if step is None:
            self.publisher.publish_readbacks(self._outputs(), changed=bool(moved))
            self.publisher.without_model(self._publication(self.state, alive=False))
            return
        with self.lock:
            self.beam.lifetime_h, _ = self.lifetime.now(self.equilibrium, self.beam.current)
            self.beam.advance(dt, holdable=step.state.stable)
        self._follow_optics(step, errors)
        self.feedback.tick(self._publish(step), now)

    def _follow_optics(self, step: Step, errors) -> None:
        """Give the feedback the orbit response the step brought, or tell it that the optics moved."""
        kinds = self.supervisor.worker.kinds
        if step.response is not None:
            self.feedback.take_response(step.response)
        elif errors is not None or any(kinds.get(d) in OPTICS_KINDS for d in step.applied):
            self.feedback.optics_changed()

    def _follow_equilibrium(self, step: Step | None, errors) -> None:
        """Hand a new lattice to the equilibrium's worker; take its newest answer if one came."""
        if self.equilibria is None:
            return
        if step is not None and (step.applied or errors is not None):
            self.equilibria.request(Lattice(step.state.version, self._in_lattice(self._outputs()),
                                            self.magnet_errors.settings))
        fresh = self.equilibria.poll()
        if fresh is not None:
            self.equilibrium = fresh
            self.versions.append({"version": fresh.version, "equilibrium": _summary(fresh)})

    def _step(self, moved: dict[str, float], errors) -> Step | None:
        """The model's step for the outputs that *moved* (the last state if nothing changed); None
        if the worker failed."""
        quantities, fresh = self.supervisor.worker.quantities, self.supervisor.fresh
        if fresh:
            self.feedback.optics_changed()  # a new worker: the response comes again with its first step
        response = self.feedback.asks_response()
        if not (moved or errors or response or self.state is None):
            return Step(self.state)
        step = self.supervisor.step([Change(d, quantities[d], v) for d, v in self._in_lattice(moved).items()],
                                    errors, response)
        if step is None:
            return None
        if step.note:
            log.warning("physics: %s", step.note)
        if step.applied or errors is not None:
            entry = {"version": step.state.version, "outputs": step.applied}
            if fresh and self.supervisor.restarts:
                entry["event"] = "restart"  # a new worker: every output, as after a start
            if self._carried:
                entry["puts"], self._carried = self._carried, []
            if errors is not None:
                entry["magnet_errors"] = errors.as_dict()
            self.versions.append(entry)
        return step

    def calibrate(self, calibration) -> None:
        """Model the calibrated machine (a ``model.calibration.Calibration``): its BPMs read with the
        measured gains and offsets instead of the seed's, its magnet converters act with the measured scales."""
        errors = self.publisher.bpm_errors
        for i, name in enumerate(self.tables.bpm_names):
            for plane, gains, offsets in ((0, calibration.gain_x, calibration.offset_x_mm),
                                          (1, calibration.gain_y, calibration.offset_y_mm)):
                errors.gain[plane, i] = gains.get(name, errors.gain[plane, i])
                errors.offset[plane, i] = offsets[name] * 1e-3 if name in offsets else errors.offset[plane, i]
        self.converter_scale = {name: scale for name, scale in calibration.converter_scale.items()
                                if self.tables.converters[name].kind not in ("rf", "cavity")}

    def _in_lattice(self, outputs: dict[str, float]) -> dict[str, float]:
        """The converter outputs as the lattice feels them: scaled where a calibration says so."""
        return {name: value * self.converter_scale.get(name, 1.0) for name, value in outputs.items()}

    def _outputs(self) -> dict[str, float]:
        return {name: out.output for name, out in self.setpoints.bank.outputs.items()}

    def _publish(self, step: Step) -> Publication:
        """Setpoint alarms, readbacks, then the readings, as the BPMs and faults show them."""
        first, self.state = self.state is None, step.state
        self.setpoints.settled(step.applied)
        for device, reason in step.refused.items():
            self.setpoints.refuse(device, reason)
        self.publisher.publish_readbacks(self._outputs(), changed=bool(step.applied) or first)
        publication = self._publication(step.state, self.beam.alive)
        self.publisher.publish(publication)
        return publication

    def _publication(self, state: BeamState | None, alive: bool) -> Publication:
        reading = state
        if alive:
            x, y = self.faults.read(*self.publisher.read_bpms(state))
            reading = replace(state, x=x, y=y)
        if state is None or state.stable:
            reason = "" if alive else NO_BEAM.replace("$(P)", self.config.prefix)
        else:
            reason = state.reason
        current = self.current_monitor.read(time.monotonic(), self.beam.current)
        lifetime, source = self.lifetime.now(self.equilibrium, self.beam.current)
        return Publication(state, reading, current, lifetime, alive, reason, self.put_log.seq,
                           self.supervisor.restarts, self.supervisor.status, equilibrium=self.equilibrium,
                           equilibrium_status=self.equilibria.status if self.equilibria else "none",
                           lifetime_source=source.replace("$(P)", self.config.prefix),
                           touschek_h=self.lifetime.touschek_h(self.equilibrium, self.beam.current),
                           gas_h=self.lifetime.gas_h,
                           measured_lifetime_h=self.current_monitor.lifetimes_h(time.monotonic()),
                           dose_per_lost_watt=self.config.dose_per_lost_watt,
                           bpm_buffer_slots=self.tables.bpm_buffer_slots)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()  # the journals stay open: puts may come until the IOC exits, and each is flushed


def _summary(equilibrium: Equilibrium) -> dict:
    """An equilibrium as the lattice journal keeps it: what it is, in the units of its PVs."""
    e = equilibrium
    if e.reason:
        return {"reason": e.reason}
    return {"emittance_nm": [round(v * 1e9, 6) for v in e.emittance], "energy_spread": e.energy_spread,
            "bunch_length_mm": e.bunch_length * 1e3, "damping_ms": [t * 1e3 for t in e.damping_times],
            "energy_loss_keV": e.energy_loss / 1e3, "momentum_acceptance": e.momentum_acceptance,
            "touschek_h": e.touschek_lifetime / 3600, "bunch_current_mA": e.bunch_current * 1e3,
            "beam_sizes_um": {p: [v * 1e6 for v in sizes] for p, sizes in e.beam_sizes.items()},
            "compute_ms": e.compute_seconds * 1e3}
