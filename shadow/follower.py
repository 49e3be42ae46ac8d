"""The live shadow: the source's values into the model, the model's predictions and residuals out.

``Follower`` owns the shadow's records (one per ``serve.SERVED`` row, built in one loop), the
``SourceWatch`` on the IOC's asyncio loop, and one thread that feeds changed converter values to
the model, publishes its predictions, and compares them with the source's readings as they arrive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from pathlib import Path

import numpy as np
from twinioc.ioc.alarms import COMM_ALARM, INVALID_ALARM, NO_ALARM, UDF_ALARM
from twinioc.studies.analysis import rms
from twinioc.studies.machine import MachineLayout

from .model import Prediction, ShadowModel
from .serve import EMITTANCE_PERIOD_S, MODEL_READINGS, SERVED, STALE_S, STATUS_PERIOD_S
from .source import SourceWatch

log = logging.getLogger("twinioc.shadow")


class Follower:
    """The shadow's records, its watch of the source, and the thread that keeps the model in step."""

    def __init__(self, layout: MachineLayout, model: ShadowModel, prefix: str, state_dir: Path | None = None,
                 calibration_name: str = ""):
        self.layout, self.model, self.prefix = layout, model, prefix
        self.watch = SourceWatch(layout)
        self.state_dir = state_dir
        self.calibration_name = calibration_name
        self.records: dict[str, object] = {}
        self.prediction: Prediction | None = None
        self._running = False
        self._thread: threading.Thread | None = None
        self._loop = None
        self._connected: bool | None = None
        self._orbit_seen = 0
        self._emittance_at = -math.inf
        self._emittance_version = -1

    # -- records ------------------------------------------------------------------------------------

    def build(self) -> None:
        from softioc import builder

        n, bpms = len(self.layout.orbit.bpms), list(self.layout.orbit.bpms)
        makers = {
            "ai": lambda name, egu, desc: builder.aIn(name, initial_value=math.nan, EGU=egu, PREC=4, DESC=desc),
            "waveform": lambda name, egu, desc: builder.WaveformIn(name, np.full(n, np.nan), EGU=egu, DESC=desc),
            "names": lambda name, egu, desc: builder.WaveformIn(name, initial_value=bpms),
            "bi": lambda name, egu, desc: builder.boolIn(name, "NO", "YES", ZSV="MAJOR", initial_value=0, DESC=desc),
            "longin": lambda name, egu, desc: builder.longIn(name, initial_value=0, DESC=desc),
            "text": lambda name, egu, desc: builder.longStringIn(name, initial_value="", length=4096),
        }
        for served in SERVED:
            self.records[served.suffix] = makers[served.kind](self.prefix + served.suffix, served.unit,
                                                               served.description[:40])
        builder.LoadDatabase()

    def _set(self, suffix: str, value, valid: bool = True) -> None:
        severity, status = (NO_ALARM, NO_ALARM) if valid else (INVALID_ALARM, COMM_ALARM)
        self.records[suffix].set(value, severity=severity, alarm=status)

    # -- running ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the IOC, subscribe to the source on its loop, and start following."""
        from softioc import asyncio_dispatcher, softioc

        dispatcher = asyncio_dispatcher.AsyncioDispatcher()
        softioc.iocInit(dispatcher)
        self._loop = dispatcher.loop
        self._set("CALIBRATION", self.calibration_name or "none")
        asyncio.run_coroutine_threadsafe(self.watch.subscribe(), self._loop).result(30)
        self._running = True
        self._thread = threading.Thread(target=self._follow, name="shadow-follow", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._running = False
        self.watch.changed.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._loop:
            asyncio.run_coroutine_threadsafe(self.watch.unsubscribe(), self._loop).result(5)

    def _follow(self) -> None:
        status_at = -math.inf
        while self._running:
            self.watch.changed.wait(STATUS_PERIOD_S)
            self.watch.changed.clear()
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - a failing model must not end the shadow: say so, go on
                log.exception("shadow step failed")
                self._set("MODEL:STATUS", f"the model failed: {type(err).__name__}: {err}")
                for suffix in MODEL_READINGS:
                    self.records[suffix].set_alarm(INVALID_ALARM, UDF_ALARM)
                self.prediction = None  # the next step computes and publishes everything afresh
                time.sleep(STATUS_PERIOD_S)
            if time.monotonic() - status_at >= STATUS_PERIOD_S:
                status_at = time.monotonic()
                self.publish_status()

    def step(self) -> None:
        """Feed what changed at the source to the model; publish the model, then the comparison."""
        values = self.watch.converter_values()
        if values or self.prediction is None:
            refused = self.model.set(values)
            self.prediction = self.model.predict()
            self._set("MODEL:REFUSED", "; ".join(f"{name}: {why}" for name, why in sorted(refused.items())))
            self.publish_model()
        if self.watch.orbit_updates != self._orbit_seen or values:
            self._orbit_seen = self.watch.orbit_updates
            self.publish_comparison()
        if (self.model.engine.version != self._emittance_version
                and time.monotonic() - self._emittance_at >= EMITTANCE_PERIOD_S):
            self._emittance_at, self._emittance_version = time.monotonic(), self.model.engine.version
            ex, ey = self.model.emittance_nm()
            valid = self.connected
            self._set("EMITTANCE:X", ex, valid)
            self._set("EMITTANCE:Y", ey, valid)

    @property
    def connected(self) -> bool:
        age = time.time() - self.watch.newest_stamp()
        return bool(age < STALE_S and self.watch.connected_share() > 0)

    def publish_model(self) -> None:
        p, valid = self.prediction, self.connected and self.prediction.stable
        self._set("ORBIT:X", p.x_mm, valid)
        self._set("ORBIT:Y", p.y_mm, valid)
        for suffix, value in (("TUNE:X", p.tune[0]), ("TUNE:Y", p.tune[1]), ("CHROM:X", p.chromaticity[0]),
                              ("CHROM:Y", p.chromaticity[1])):
            self._set(suffix, float(value), valid)
        self._set("MODEL:STATUS", "" if p.stable else f"no stable beam in the model: {p.reason or 'unstable'}")
        self._set("MODEL:VERSION", int(p.version))
        self._set("MODEL:COMPUTE:TIME", p.compute_s * 1e3)

    def measured_tunes(self) -> np.ndarray:
        """The source's fractional tunes, from its tune monitor (kHz) and the revolution frequency."""
        revolution = self.prediction.revolution_khz if self.prediction else math.nan
        return np.array(self.watch.tunes_khz()) / revolution

    def publish_comparison(self) -> None:
        p, valid = self.prediction, self.connected and self.prediction.stable
        x, y = self.watch.orbit_mm()
        rx, ry = x - p.x_mm, y - p.y_mm
        for suffix, value in (("ORBIT:MEASURED:X", x), ("ORBIT:MEASURED:Y", y), ("ORBIT:RESIDUAL:X", rx),
                              ("ORBIT:RESIDUAL:Y", ry), ("ORBIT:RESIDUAL:X:RMS", rms(rx)),
                              ("ORBIT:RESIDUAL:Y:RMS", rms(ry))):
            self._set(suffix, value, valid)
        measured = self.measured_tunes()
        for i, plane in enumerate("XY"):
            self._set(f"TUNE:MEASURED:{plane}", float(measured[i]), valid)
            self._set(f"TUNE:RESIDUAL:{plane}", float(measured[i] - p.tune[i]), valid)

    def publish_status(self) -> None:
        connected = self.connected
        self._set("SOURCE:CONNECTED", int(connected))
        self._set("SOURCE:LAG", time.time() - self.watch.newest_stamp())
        unanswered = self.watch.unanswered()
        self._set("SOURCE:UNANSWERED", " ".join(unanswered))
        self._set("SOURCE:UNANSWERED:COUNT", len(unanswered))
        if connected != self._connected:
            self._connected = connected
            log.warning("source %s", "connected" if connected else "gone: the model's readings are INVALID")
            self._log_link(connected)
            if not connected:
                for suffix in MODEL_READINGS:
                    self.records[suffix].set_alarm(INVALID_ALARM, COMM_ALARM)
            elif self.prediction is not None:
                self.publish_model()
                self.publish_comparison()

    def _log_link(self, connected: bool) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "source.jsonl").open("a") as f:
            f.write(json.dumps({"time": time.time(), "connected": connected}) + "\n")
