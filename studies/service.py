"""The measurement service: requests in, one plan at a time, results kept.

``MeasurementService`` owns a RunEngine on a worker thread of its own, the queue of requests, the
records (``MeasurementRecords``) and the run store (``RunStore``). A request is checked in full
before it is queued (kind, parameters, device names, whether the target may be measured), so that a
bad one never reaches the machine. A running plan is cancelled by aborting the RunEngine: the plan's
cleanup puts its setpoints back. Should the service die during a plan, the setpoints it meant to put
back are on disk, and the next start puts them back before it takes new requests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from concurrent.futures import Future
from pathlib import Path

import bluesky.plan_stubs as bps
import numpy as np
from aioca import caget
from bluesky import RunEngine
from bluesky.utils import TransitionError

from .analysis import plain
from .context import Envelope, Instruments, PlanContext, Restorer, serves_seed
from .machine import LayoutError, MachineLayout
from .plans import check_names, plan_of
from .records import MeasurementRecords, now
from .requests import RequestError, parse
from .store import RunStore

log = logging.getLogger(__name__)
ASK_AGAIN_S = 30.0


class MeasurementService:
    """One machine's measurements: a queue, a RunEngine on its own thread, the records and the runs."""

    def __init__(self, layout: MachineLayout, state_dir: Path, tiled_url: str | None = None,
                 tiled_api_key: str | None = None, allow_machine: bool = False):
        self.layout, self.state_dir, self.allow_machine = layout, Path(state_dir), allow_machine
        self.records = MeasurementRecords(self.state_dir)
        self.runs = RunStore(self.state_dir, tiled_url, tiled_api_key)
        self.engine = RunEngine(context_managers=[], call_returns_result=True)
        self.engine.subscribe(self.runs.callback())
        self._run_uids: list[str] = []
        self.engine.subscribe(lambda name, doc: self._run_uids.append(doc["uid"]) if name == "start" else None)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._current: str | None = None
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._is_twin: bool | None = None
        self._asked_at = -float("inf")  # when the target last said it is not a twin
        self._instruments: Instruments | None = None
        self._worker = threading.Thread(target=self._work, name="measurements", daemon=True)
        self.engine.log.logger.addFilter(self._not_a_cancel)

    def _not_a_cancel(self, record: logging.LogRecord) -> bool:
        """Keep the RunEngine's 'Run aborted' (with its traceback) out of the log when we cancelled."""
        return not (record.getMessage() == "Run aborted" and self._current in self._cancelled)

    # -- the target -------------------------------------------------------------------------------

    def call(self, coroutine, timeout: float = 10.0):
        """Run *coroutine* on the RunEngine's event loop (where the devices live) and return its result."""
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self.engine.loop)
        return future.result(timeout)

    def is_twin(self) -> bool:
        """Whether the target serves ``<prefix>SEED``: a yes holds, a no is asked again after
        ``ASK_AGAIN_S`` (a twin that was not up yet), not on every call (each asking waits 2 s)."""
        if not self._is_twin and time.monotonic() - self._asked_at > ASK_AGAIN_S:
            self._is_twin = serves_seed(self.layout, self.engine.loop)
            self._asked_at = time.monotonic()
        return bool(self._is_twin)

    @property
    def instruments(self) -> Instruments:
        if self._instruments is None or self._instruments.is_twin != self.is_twin():
            self._instruments = Instruments(self.layout, self.is_twin())
        return self._instruments

    # -- requests -------------------------------------------------------------------------------

    def submit(self, body: object) -> dict:
        """Check and queue a request; its record. ``RequestError`` (nothing queued) if it cannot run."""
        kind, params = parse(body)
        try:
            check_names(self.layout, kind, params)
        except LayoutError as err:
            raise RequestError(str(err)) from None
        if kind == "orbit_correction" and params["response"] != "model":
            self._measured_response(params["response"])
        if not self.is_twin() and not self.allow_machine:
            raise RequestError(f"the target does not serve {self.layout.seed_pv}: it is not a twin, and this "
                               "service was not started with --allow-machine", 403)
        record = self.records.create(kind, params, self._devices(kind, params))
        self._queue.put(record["id"])
        return record

    def _devices(self, kind: str, params: dict) -> list[str]:
        """The devices a measurement sets: what its record is found by."""
        if kind == "bba":
            return [params["quadrupole"], self.layout.converter_of_magnet(params["quadrupole"]).name]
        if kind in ("dispersion", "chromaticity"):
            return [self.layout.rf.name]
        if kind == "tune_response":
            return list(params["converters"])
        if kind == "orbit_correction" and params["response"] != "model":
            return list(self._measured_response(params["response"])["steerers"])
        return list(params.get("steerers") or [c.name for c in self.layout.steerers()])

    def _measured_response(self, id: str) -> dict:
        try:
            record = self.records.get(id)
        except KeyError:
            raise RequestError(f"no measurement {id!r} to take the response from", 404) from None
        if record["kind"] != "orm" or record["status"] != "done":
            raise RequestError(f"measurement {id} is not a finished orbit response matrix")
        return record["result"]

    def cancel(self, id: str) -> dict:
        record = self.records.get(id)  # KeyError: unknown
        with self._lock:
            if record["status"] == "queued":
                self._cancelled.add(id)
                self.records.update(id, status="cancelled", finished=now(), error="cancelled before it ran")
            elif record["status"] == "running" and self._current == id:
                self._cancelled.add(id)
                try:
                    self.engine.abort(reason=f"measurement {id} cancelled")
                except TransitionError:  # it ended just now, on its own: as it ended
                    self._cancelled.discard(id)
        return self.records.get(id)

    # -- the worker -----------------------------------------------------------------------------

    def start(self) -> MeasurementService:
        self._recover()
        self._worker.start()
        return self

    def _recover(self) -> None:
        """Put back what a run that died with the service left, and queue again what was queued."""
        for record in self.records.list(status="running"):
            saved = record.get("restore") or {}
            note = "the service stopped during the run"
            if saved.get("setpoints") or saved.get("feedback"):
                try:
                    self.engine(self._put_back(saved))
                    note += (f"; its setpoints were put back ({len(saved.get('setpoints') or {})} converters"
                             f"{', and the orbit feedback' if saved.get('feedback') else ''})")
                except Exception as err:  # noqa: BLE001 - say so; the record keeps what to restore
                    note += f"; putting its setpoints back failed: {err}"
            self.records.update(record["id"], status="failed", finished=now(), error=note)
        for record in self.records.list(status="queued"):
            self._queue.put(record["id"])

    def _put_back(self, saved: dict):
        """Plan: the setpoints a dead run had changed back to their values before, then its feedback mode."""
        ctx = PlanContext(self.instruments, Restorer(None if self.is_twin() else Envelope.of(self.layout)))
        for name, value in (saved.get("setpoints") or {}).items():
            ctx.restorer.original[name], ctx.restorer.devices[name] = value, ctx.converter(name)
        yield from ctx.instruments.connect(*ctx.restorer.devices.values())
        yield from ctx.restorer.restore()
        feedback = ctx.instruments.feedback
        if saved.get("feedback") and feedback is not None:
            yield from ctx.instruments.connect(feedback)
            yield from bps.mv(feedback.mode, saved["feedback"])

    def _work(self) -> None:
        while True:
            id = self._queue.get()
            if id is None:
                return
            with self._lock:
                if id in self._cancelled or self.records.get(id)["status"] != "queued":
                    continue
                self._current = id
                self.records.update(id, status="running", started=now())
            try:
                self._run(id)
            finally:
                with self._lock:
                    self._current = None

    def _run(self, id: str) -> None:
        record = self.records.get(id)
        ctx = PlanContext(self.instruments, Restorer(
            envelope=None if self.is_twin() else Envelope.of(self.layout),
            on_record=lambda saved: self.records.update(id, restore=saved)),
            progress=lambda fraction: self.records.update(id, progress=round(float(fraction), 4)))
        produced = {}

        def plan():
            params = record["params"]
            measured = None
            if record["kind"] == "orbit_correction" and params["response"] != "model":
                measured = self._measured_response(params["response"])
            produced["analysis"] = yield from plan_of(record["kind"], ctx, params, measured)

        self._run_uids.clear()
        error = None
        try:
            self.engine(plan())
        except Exception as err:  # noqa: BLE001 - the plan failed: its record says why
            error = f"{type(err).__name__}: {err}"
            if id in self._cancelled:
                log.info("measurement %s cancelled", id)
            else:
                log.warning("measurement %s failed:\n%s", id, traceback.format_exc())
        run_uid = self._run_uids[0] if self._run_uids else None
        if id in self._cancelled:
            self.records.update(id, status="cancelled", finished=now(), run_uid=run_uid, restore=None,
                                error="cancelled; every setpoint it changed was put back")
        elif error or "analysis" not in produced:
            self.records.update(id, status="failed", finished=now(), run_uid=run_uid, restore=None,
                                error=error or "the plan ended without a result")
        else:
            analysis = produced["analysis"].to_dict()
            self.records.update(id, status="done", progress=1.0, finished=now(), run_uid=run_uid, restore=None,
                                result=analysis["result"], raw=analysis["raw"], provenance=analysis["provenance"])

    def stop(self) -> None:
        self._queue.put(None)
        if self._current is not None:
            self.cancel(self._current)
        self._worker.join(timeout=60)
        self.runs.close()
        self.records.close()

    # -- reading the machine --------------------------------------------------------------------

    def state(self) -> dict:
        """The machine now: orbit (mm) with the BPM names, tunes (fractional and kHz), current, and on
        a twin its lattice version."""
        layout = self.layout
        orbit = layout.orbit
        names = [orbit.waveform] if orbit.waveform else [*orbit.x, *orbit.y]
        names += [layout.role("tune_h_khz"), layout.role("tune_v_khz"), layout.rf.readback, layout.role("beam_current")]
        twin = self.is_twin()
        if twin:
            names += [layout.role("version"), layout.seed_pv]
        values = self.call(caget(names, timeout=5.0))
        count = 1 if orbit.waveform else 2 * len(orbit.bpms)
        raw = values[:count]
        if orbit.waveform:
            interleaved = np.asarray(raw[0], float) * orbit.waveform_to_mm
            x, y = interleaved[0::2], interleaved[1::2]
        else:
            x, y = np.array(raw[:len(orbit.bpms)], float), np.array(raw[len(orbit.bpms):], float)
        h, v, rf_khz, current = (float(value) for value in values[count:count + 4])
        revolution_khz = rf_khz / self.instruments.engine.ring.harmonic_number
        state = {"machine": layout.name, "target": "twin" if twin else "machine", "bpms": list(orbit.bpms),
                 "orbit_x_mm": x, "orbit_y_mm": y, "tune_x": h / revolution_khz, "tune_y": v / revolution_khz,
                 "tune_h_khz": h, "tune_v_khz": v, "rf_khz": rf_khz, "current_mA": current, "time": now()}
        if twin:
            state["lattice_version"], state["seed"] = int(values[-2]), int(values[-1])
        return plain(state)
