"""Orbit correction over Channel Access only: measure the orbit response matrix, correct with SVD.

    twinioc --machine mls                                   # one shell: the twin, on 127.0.0.1
    export EPICS_CA_ADDR_LIST=127.0.0.1 EPICS_CA_AUTO_ADDR_LIST=NO   # another shell, the twin's env
    python examples/orbit_correction.py --machine mls
    python examples/orbit_correction.py --machine bessy2 --save-response bessy2.npz

Everything goes through pyepics: ``EPICS_CA_ADDR_LIST`` and friends choose the machine (or twin).
Nothing here knows about the twin; the script does what one would do in the control room:

1. Measure the response matrix. One steerer at a time gets a small step on its setpoint (a put
   that completes), the script waits until the readback shows it (the converters ramp), then
   averages a few BPM readings stamped after that readback (the BPMs are noisy), and subtracts a
   reference orbit. The next steerer's step and the previous steerer's restore go out together,
   so each steerer costs one ramp and a few orbit updates. The reference orbit is read before and
   after the scan, and interpolated in time (a drifting machine). On the twin (25 Hz) this takes
   about 12 s for BESSY II's 112 steerers and 4.5 s for the MLS's 28 (the whole run 14 s and 6 s).
2. Correct. Per plane, x readings with the horizontal steerers and y with the vertical ones, the
   steerer change is -gain · R⁺ · reading, where R⁺ is the pseudo-inverse of the measured matrix:
   truncated SVD, keeping the singular values above ``--rcond`` (default 0.1 %) of the largest, or
   the ``--keep`` largest, optionally Tikhonov-damped (``--tikhonov``, a fraction of the largest
   singular value). The default keeps every singular value of both twins' matrices (condition
   numbers 30-650): the smallest ones turn a µm of reading noise into a few mA, which is harmless,
   and they halve BESSY II's residual orbit against a 1 % cut. A steerer that would
   leave its range (the setpoint's DRVL/DRVH, read from the IOC) is clipped to its limit and held
   there, and the plane solved again with the others; ``--max-change`` scales a whole step down so
   that no steerer moves more than that. The target is zero readings: with BPM offsets that is not
   the beam through the quadrupoles' centres (beam-based alignment, ``bba.py``, finds those).

The RMS printed is about zero, sqrt(mean(reading²)), in µm, per plane. The last line of the output
is JSON (machine, rms before and after, per iteration, seconds) for scripts and tests to read.

Readings: BESSY II publishes the whole orbit in ``ORBITCC:rdPos`` (nm, x0, y0, x1, y1, ...), the
order given by ``ORBITCC:rdBpmNames``; the MLS has only the per-BPM ``<bpm>:rdX`` / ``:rdY`` (mm),
which are monitored one by one (``--orbit-pv ''`` does that for BESSY II too). Setpoints are
``<steerer>:set`` / ``:rdbk`` on BESSY II, ``:setCur`` / ``:rdCur`` on the MLS.

Steerer and BPM lists are configuration data, not something CA serves: by default they are read from
the tables the twin is built from, ``db/<machine>/converters.csv`` (rows of kind ``hsteerer`` /
``vsteerer``) and ``db/<machine>/bpms.csv`` (in the machine's BPM order); ``--tables`` points
elsewhere, ``--hsteerers`` / ``--vsteerers`` / ``--bpms`` name them outright.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import epics
import numpy as np

INVALID = 3  # EPICS alarm severity: the reading means nothing (no beam)


@dataclass(frozen=True)
class Machine:
    setpoint: str  # PV suffixes of a converter's setpoint and readback
    readback: str
    orbit_pv: str  # one waveform with the whole orbit (nm, x0, y0, ...), or "" for per-BPM PVs
    names_pv: str  # the BPM names in that waveform's order
    step: float  # A, the default steerer step of the response measurement


MACHINES = {
    # 0.05 A is 39 µrad on an HS4: an orbit change of up to 1 mm
    "bessy2": Machine(":set", ":rdbk", "ORBITCC:rdPos", "ORBITCC:rdBpmNames", 0.05),
    # 0.1 A is 130 µrad (H) / 96 µrad (V): up to 1.1 mm
    "mls": Machine(":setCur", ":rdCur", "", "", 0.1),
}
DEFAULT_TABLES = Path(__file__).resolve().parents[1] / "db"


class BeamLost(RuntimeError):
    pass


def default_names(tables: Path) -> tuple[list[str], list[str], list[str]]:
    """Horizontal steerers, vertical steerers and BPMs as the machine's configuration tables list them."""
    with (tables / "converters.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    with (tables / "bpms.csv").open(newline="") as f:
        bpms = [r["name"] for r in sorted(csv.DictReader(f), key=lambda r: int(r["index"]))]
    return ([r["name"] for r in rows if r["kind"] == "hsteerer"], [r["name"] for r in rows if r["kind"] == "vsteerer"],
            bpms)


class Monitors:
    """The last few (timestamp, value) of some PVs, kept by CA monitors; the timestamps are the IOC's."""

    def __init__(self, names: list[str], history: int = 256, timeout: float = 5.0):
        self.names = names
        self.cond = threading.Condition()
        self.history = [deque(maxlen=history) for _ in names]
        self.pvs = [epics.PV(name, form="time", auto_monitor=True, callback=partial(self._update, i))
                    for i, name in enumerate(names)]
        deadline = time.monotonic() + timeout
        for pv in self.pvs:
            if not pv.wait_for_connection(timeout=max(0.1, deadline - time.monotonic())):
                raise TimeoutError(f"{pv.pvname} does not connect")
        # The first value of each comes with its subscription. pyepics subscribes from its connection
        # callback, and libca sends the request with the next flush: without one, the last PV's may wait.
        while time.monotonic() < deadline:
            epics.ca.flush_io()
            with self.cond:
                if self.cond.wait_for(lambda: all(self.history), timeout=0.05):
                    break
        if not all(self.history):
            raise TimeoutError(f"no value from {[n for n, h in zip(names, self.history, strict=True) if not h]}")

    def _update(self, i: int, value=None, timestamp=None, severity=0, **_) -> None:
        with self.cond:
            self.history[i].append((timestamp, np.array(value, dtype=float), severity))
            self.cond.notify_all()

    def latest(self, i: int) -> tuple[float, np.ndarray, int]:
        with self.cond:
            return self.history[i][-1]

    def close(self) -> None:
        for pv in self.pvs:
            pv.disconnect()


class Orbit:
    """BPM readings (mm), fresh ones only: stamped later than a given time."""

    def __init__(self, bpms: list[str], orbit_pv: str = "", names_pv: str = ""):
        self.bpms = bpms
        if orbit_pv:
            served = [str(n) for n in epics.caget(names_pv, timeout=5)]
            missing = sorted(set(bpms) - set(served))
            if missing:
                raise SystemExit(f"{names_pv} lacks {missing}")
            self.index = np.array([served.index(b) for b in bpms])
            self.monitors = Monitors([orbit_pv])
        else:
            self.index = None
            self.monitors = Monitors([f"{b}:rdX" for b in bpms] + [f"{b}:rdY" for b in bpms])

    def _decode(self, values: list[np.ndarray]) -> np.ndarray:
        if self.index is not None:  # nm, interleaved x0, y0, x1, y1, ...
            return values[0].reshape(-1, 2).T[:, self.index] * 1e-6
        return np.array(values).reshape(2, -1)

    def read(self, samples: int, after: float | None = None, quiet: float = 1.0) -> np.ndarray:
        """The mean of *samples* readings stamped after *after* (s since the epoch; default now), (2, nbpm).

        A PV that posts nothing new for *quiet* s has not changed (a noiseless machine repeats
        itself, and CA posts only changes): its last value counts as fresh.
        """
        after = time.time() if after is None else after
        deadline = time.monotonic() + quiet
        monitors = self.monitors
        taken: dict[int, list] = {}
        waiting = set(range(len(monitors.names)))

        def fresh(i: int) -> list:
            """The first *samples* entries stamped after *after* (the history is in time order)."""
            entries = []
            for entry in reversed(monitors.history[i]):
                if entry[0] <= after:
                    break
                entries.append(entry)
            return entries[::-1][:samples]

        with monitors.cond:
            while waiting:
                for i in list(waiting):
                    entries = fresh(i)
                    if len(entries) == samples:
                        taken[i] = entries
                        waiting.discard(i)
                left = deadline - time.monotonic()
                if waiting and left <= 0:
                    for i in waiting:
                        taken[i] = fresh(i) or [monitors.history[i][-1]]
                    break
                if waiting:
                    monitors.cond.wait(left)
        taken = [taken[i] for i in range(len(monitors.names))]
        bad = [monitors.names[i] for i, t in enumerate(taken) if any(sev >= INVALID for _, _, sev in t)]
        if bad:
            raise BeamLost(f"readings INVALID (no beam?): {', '.join(bad[:5])}")
        orbit = self._decode([np.mean([value for _, value, _ in t], axis=0) for t in taken])
        if not np.all(np.isfinite(orbit)):
            broken = sorted({self.bpms[j] for j in np.flatnonzero(~np.all(np.isfinite(orbit), axis=0))})
            raise RuntimeError(f"BPMs without a reading: {broken} (leave them out with --bpms)")
        return orbit


class Steerers:
    """Setpoints (put with completion) and monitored readbacks of the steerers' converters."""

    def __init__(self, names: list[str], machine: Machine, tolerance: float, timeout: float = 30.0):
        self.names, self.tolerance, self.timeout = names, tolerance, timeout
        self.setpoints = [epics.PV(n + machine.setpoint, auto_monitor=False) for n in names]
        self.readbacks = Monitors([n + machine.readback for n in names])
        self.low, self.high = np.full(len(names), -np.inf), np.full(len(names), np.inf)
        for i, pv in enumerate(self.setpoints):
            if not pv.wait_for_connection(timeout=5):
                raise TimeoutError(f"{pv.pvname} does not connect")
            limits = pv.get_ctrlvars(timeout=5) or {}
            low, high = limits.get("lower_ctrl_limit", 0.0), limits.get("upper_ctrl_limit", 0.0)
            if low < high:  # DRVL = DRVH = 0: no limits
                self.low[i], self.high[i] = low, high

    def get(self) -> np.ndarray:
        return np.array([pv.get(timeout=5, use_monitor=False) for pv in self.setpoints], dtype=float)

    def put_back(self, values: np.ndarray) -> None:
        """Put *values* on every steerer whose setpoint differs, without waiting for the readbacks."""
        for pv, value in zip(self.setpoints, values, strict=True):
            if pv.get(timeout=5, use_monitor=False) != value:
                pv.put(float(value), wait=True, timeout=5)

    def set(self, values: dict[int, float]) -> float:
        """Put *values* (steerer index -> A) at once, each with completion; wait until every readback
        shows its setpoint. Returns the IOC's time stamp of the latest of those readbacks."""
        for i, value in values.items():
            if not self.low[i] <= value <= self.high[i]:
                raise ValueError(f"{self.names[i]}: {value} A is beyond [{self.low[i]}, {self.high[i]}]")
            self.setpoints[i].put(float(value), use_complete=True)
        epics.ca.flush_io()
        deadline = time.monotonic() + self.timeout
        pending, stamp = dict(values), 0.0
        while pending:
            for i in [i for i in pending if self.setpoints[i].put_complete]:
                when, value, _ = self.readbacks.latest(i)
                if abs(float(value) - pending[i]) <= self.tolerance:
                    stamp = max(stamp, when)
                    del pending[i]
            if pending and time.monotonic() > deadline:
                late = [f"{self.names[i]} ({self.readbacks.latest(i)[1]:.4f}, not {v:.4f} A)"
                        for i, v in pending.items()]
                raise TimeoutError(f"readbacks did not follow within {self.timeout} s: {', '.join(late)}")
            time.sleep(0.005)
        return stamp


def measure_response(steerers: Steerers, orbit: Orbit, step: float, samples: int, settle: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Response of the readings to every steerer, (2, nbpm, nsteerer) in mm/A, and the steps taken (A).

    One-sided differences from where the steerers stand. A steerer whose step would leave its range
    is stepped the other way. Every steerer is back where it was afterwards, also on an error.
    """
    start = steerers.get()
    steps = np.where(start + step <= steerers.high, step, -step)
    shifted: list[np.ndarray] = []
    times: list[float] = []
    before = (time.time(), orbit.read(4 * samples))
    previous = None
    done = False
    try:
        for k in range(len(steerers.names)):
            change = {k: start[k] + steps[k]}
            if previous is not None:  # the last one back, in the same go
                change[previous] = start[previous]
            stamp = steerers.set(change) + settle
            shifted.append(orbit.read(samples, after=stamp))
            times.append(stamp)
            previous = k
        stamp = steerers.set({previous: start[previous]}) + settle
        done = True
    finally:
        if not done:  # whatever went wrong: every steerer back to where it was
            steerers.put_back(start)
    after = (stamp, orbit.read(4 * samples, after=stamp))
    # the reference orbit at each step, interpolated in time between the two measured ones
    drift = after[1] - before[1]
    span = max(after[0] - before[0], 1e-9)
    response = np.empty((2, len(orbit.bpms), len(steerers.names)))
    for k, (when, reading) in enumerate(zip(times, shifted, strict=True)):
        reference = before[1] + drift * (when - before[0]) / span
        response[:, :, k] = (reading - reference) / steps[k]
    print(f"orbit drift during the measurement: x {rms(drift[0]):.2f} um, y {rms(drift[1]):.2f} um rms")
    return response, steps


def rms(values_mm: np.ndarray) -> float:
    """RMS about zero, in µm, of values in mm."""
    return float(np.sqrt(np.mean(np.square(values_mm)))) * 1e3


def pseudo_inverse(matrix: np.ndarray, rcond: float, keep: int | None, tikhonov: float
                   ) -> tuple[np.ndarray, int, float]:
    """R⁺ by truncated (and optionally damped) SVD; also how many singular values it keeps and the smallest."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    kept = s >= rcond * s[0]
    if keep is not None:
        kept[keep:] = False
    damping = (tikhonov * s[0]) ** 2
    factors = np.where(kept, s / (s**2 + damping), 0.0)
    return (vt.T * factors) @ u.T, int(kept.sum()), float(s[kept][-1])


def correction(response: np.ndarray, reading: np.ndarray, current: np.ndarray, low: np.ndarray,
               high: np.ndarray, gain: float, rcond: float, keep: int | None, tikhonov: float
               ) -> tuple[np.ndarray, list[int]]:
    """New setpoints of one plane's steerers for -gain·reading, within the limits; and those clipped.

    A steerer the solution takes beyond a limit is set to that limit and left out; the others are
    solved again for what remains, until none is beyond.
    """
    free = np.ones(len(current), dtype=bool)
    new = current.copy()
    clipped: list[int] = []
    while free.any():
        wanted = -gain * reading - response[:, ~free] @ (new[~free] - current[~free])
        inverse, _, _ = pseudo_inverse(response[:, free], rcond, keep, tikhonov)
        trial = current[free] + inverse @ wanted
        index = np.flatnonzero(free)
        beyond = (trial < low[index]) | (trial > high[index])
        new[index] = np.clip(trial, low[index], high[index])
        if not beyond.any():
            break
        free[index[beyond]] = False
        clipped += [int(i) for i in index[beyond]]
    return new, clipped


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--machine", choices=sorted(MACHINES), default="bessy2")
    parser.add_argument("--tables", type=Path, help="folder with converters.csv and bpms.csv "
                        "(default: the project's db/<machine>)")
    parser.add_argument("--hsteerers", nargs="+", help="horizontal steerers (default: the tables' hsteerer rows)")
    parser.add_argument("--vsteerers", nargs="+", help="vertical steerers (default: the tables' vsteerer rows)")
    parser.add_argument("--bpms", nargs="+", help="BPMs (default: all of the tables' bpms.csv)")
    parser.add_argument("--orbit-pv", help="orbit waveform (nm, x0, y0, ...); '' reads each BPM's :rdX/:rdY "
                        "(default: ORBITCC:rdPos on BESSY II, per-BPM on the MLS)")
    parser.add_argument("--step", type=float, help="steerer step of the measurement, A (BESSY II 0.05, MLS 0.1)")
    parser.add_argument("--samples", type=int, default=3, help="BPM readings averaged per orbit")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="s to wait after a readback shows its setpoint, before the readings count")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="readback within this of the setpoint, A")
    parser.add_argument("--iterations", type=int, default=3, help="correction steps")
    parser.add_argument("--gain", type=float, default=0.8, help="fraction of the computed correction applied per step")
    parser.add_argument("--rcond", type=float, default=1e-3,
                        help="keep singular values above this fraction of the largest")
    parser.add_argument("--keep", type=int, help="keep at most this many singular values per plane")
    parser.add_argument("--tikhonov", type=float, default=0.0,
                        help="Tikhonov damping, as a fraction of the largest singular value")
    parser.add_argument("--max-change", type=float, help="largest change of any steerer in one step, A "
                        "(a larger step is scaled down as a whole)")
    parser.add_argument("--save-response", type=Path, help="write the measured response matrix to this .npz")
    parser.add_argument("--response", type=Path, help="use this saved response matrix instead of measuring")
    parser.add_argument("--measure-only", action="store_true", help="measure (and save) the response, correct nothing")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --response: read the orbit, print the first correction, put nothing")
    args = parser.parse_args(argv)
    if args.dry_run and not args.response:
        parser.error("--dry-run puts nothing, and measuring the response puts: give a saved one with --response")

    machine = MACHINES[args.machine]
    tables = args.tables or DEFAULT_TABLES / args.machine
    if not (args.hsteerers and args.vsteerers and args.bpms):
        if not (tables / "converters.csv").is_file():
            parser.error(f"no configuration tables in {tables}: give --tables or --hsteerers/--vsteerers/--bpms")
        hsteerers, vsteerers, bpms = default_names(tables)
    hsteerers, vsteerers, bpms = args.hsteerers or hsteerers, args.vsteerers or vsteerers, args.bpms or bpms
    names = hsteerers + vsteerers
    horizontal = np.arange(len(names)) < len(hsteerers)
    orbit_pv = machine.orbit_pv if args.orbit_pv is None else args.orbit_pv

    started = time.monotonic()
    orbit = Orbit(bpms, orbit_pv, machine.names_pv)
    steerers = Steerers(names, machine, args.tolerance)
    print(f"{args.machine}: {len(hsteerers)} H + {len(vsteerers)} V steerers, {len(bpms)} BPMs "
          f"({orbit_pv or 'per-BPM :rdX/:rdY'}); connected in {time.monotonic() - started:.1f} s")

    seconds = {}
    if args.response:
        saved = np.load(args.response)
        if list(saved["steerers"]) != names or list(saved["bpms"]) != bpms:
            raise SystemExit(f"{args.response} is for other steerers or BPMs")
        response = saved["response"]
    else:
        t0 = time.monotonic()
        start = steerers.get()
        response, steps = measure_response(steerers, orbit, args.step or machine.step, args.samples, args.settle)
        seconds["measure"] = time.monotonic() - t0
        print(f"response of {len(names)} steerers measured in {seconds['measure']:.1f} s")
        if args.save_response:
            np.savez(args.save_response, response=response, steps=steps, setpoints=start, steerers=np.array(names),
                     horizontal=horizontal, bpms=np.array(bpms), machine=args.machine,
                     units="mm/A; response[plane (0: x, 1: y), bpm, steerer]")
            print(f"response saved to {args.save_response}")

    planes = [(0, "x", response[0][:, horizontal], horizontal), (1, "y", response[1][:, ~horizontal], ~horizontal)]
    for _, label, matrix, _ in planes:
        _, kept, smallest = pseudo_inverse(matrix, args.rcond, args.keep, args.tikhonov)
        s = np.linalg.svd(matrix, compute_uv=False)
        print(f"plane {label}: singular values {s[0]:.3g} ... {s[-1]:.3g} mm/A; kept {kept} of {len(s)} "
              f"(smallest kept {smallest:.3g}), Tikhonov {args.tikhonov:g} of the largest")

    history = []
    t0 = time.monotonic()
    reading = orbit.read(2 * args.samples)
    iterations = 0 if args.measure_only else args.iterations
    for iteration in range(iterations + 1):
        history.append({"x": rms(reading[0]), "y": rms(reading[1])})
        line = f"iteration {iteration}: rms x = {history[-1]['x']:8.1f} um, y = {history[-1]['y']:8.1f} um"
        if iteration == iterations:
            print(line)
            break
        current = steerers.get()
        new = current.copy()
        clipped = []
        for p, _, matrix, mask in planes:
            plane_new, plane_clipped = correction(matrix, reading[p], current[mask], steerers.low[mask],
                                                  steerers.high[mask], args.gain, args.rcond, args.keep, args.tikhonov)
            new[mask] = plane_new
            clipped += [names[i] for i in np.flatnonzero(mask)[plane_clipped]]
        change = new - current
        if args.max_change and np.max(np.abs(change)) > args.max_change:
            change *= args.max_change / np.max(np.abs(change))
            new = current + change
        print(f"{line}; step: max |dI| = {np.max(np.abs(change)):.4f} A"
              + (f", at their limits: {', '.join(clipped)}" if clipped else ""))
        if args.dry_run:
            predicted = reading + np.stack([response[0] @ change, response[1] @ change])
            for i in np.flatnonzero(change):
                print(f"  {names[i]}{machine.setpoint}: {current[i]:+.4f} -> {new[i]:+.4f} A")
            print(f"dry run: nothing put; predicted rms x = {rms(predicted[0]):.1f} um, y = {rms(predicted[1]):.1f} um")
            break
        stamp = steerers.set({i: new[i] for i in np.flatnonzero(change)}) + args.settle
        reading = orbit.read(2 * args.samples, after=stamp)
    seconds["correct"] = time.monotonic() - t0
    seconds["total"] = time.monotonic() - started
    result = {"machine": args.machine, "rms_before_um": history[0], "rms_after_um": history[-1],
              "iterations": history, "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    print(f"rms before x={history[0]['x']:.1f} y={history[0]['y']:.1f} after x={history[-1]['x']:.1f} "
          f"y={history[-1]['y']:.1f} um in {seconds['total']:.1f} s")
    print(json.dumps(result))
    sys.stdout.flush()
    orbit.monitors.close()
    steerers.readbacks.close()
    return result


if __name__ == "__main__":
    try:
        main()
    except BeamLost as err:
        raise SystemExit(f"orbit_correction: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit("orbit_correction: interrupted") from None
