"""The twin under a control room's load, measured from outside as a user sees it.

    python bench/bench_twin.py --machine bessy2 [--clients 20] [--seconds 15] [--puts 100] [--results DIR]

One run:

1. starts the twin (the machine's startup file: every imperfection on) on free loopback ports and
   times it until its CA server listens and until every PV of its table has connected;
2. starts the monitor load: *clients* separate CA clients (one C program, one CA context each),
   each monitoring the orbit waveform and every per-BPM PV;
3. refresh and caget: a driver puts a steerer and a quadrupole 5 times a second, so that the model
   recomputes (with chromaticity), while this process counts the orbit waveform's monitor updates
   over CA (pyepics) and PVA (p4p) and times caget round trips;
4. latency: with the driver stopped, a second steerer is put back and forth; the latency is the time
   from the put to the first orbit monitor update that has moved along that steerer's orbit response
   by more than 6 sigma of the BPM noise;
5. memory and CPU share of the IOC and its physics process, read from /proc;
6. after the twin has stopped, the naive baseline on the same machine: what a virtual accelerator
   that recomputes everything (6D optics at every element, chromaticity, emittance) needs per change.

Prints one table and writes it, with the date and the CPU, to ``bench/results/<machine>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from twinioc.ioc.testing import TwinProcess
from twinioc.model.tables import MachineTables

HERE = Path(__file__).resolve().parent
DB = HERE.parent / "db"
PREFIX = "TWIN:"
TARGETS = {"refresh_hz": (">=", 25.0), "latency_p50_ms": ("<=", 50.0), "latency_p99_ms": ("<=", 120.0),
           "caget_p99_ms": ("<=", 5.0), "startup_s": ("<=", 3.0), "rss_mb": ("<=", 400.0)}


@dataclass
class Figures:
    machine: str
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q)) if samples else float("nan")


# -- the twin's processes, from /proc -------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """*pid* and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[-2][-40:] if pid else ""


class CpuShare:
    """CPU time of processes over a window, as a share of one core."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.start = time.monotonic(), {p: cpu_seconds(p) for p in pids}

    def shares(self) -> dict[int, float]:
        wall = time.monotonic() - self.start[0]
        return {p: (cpu_seconds(p) - self.start[1][p]) / wall for p in self.pids}


# -- the measurements ---------------------------------------------------------------------------

def time_startup(twin: TwinProcess, names: list[str]) -> tuple[float, float]:
    """Seconds from launch until the CA server accepts connections, and until all *names* connect.

    The first is polled with TCP connects, not CA searches: libca backs off between the searches of
    a name that nobody answered, which would add its own delay to the figure.
    """
    import socket

    from epics import ca

    started = time.monotonic()
    twin.launch()
    while True:
        try:
            socket.create_connection(("127.0.0.1", twin.ca_port), timeout=0.1).close()
            break
        except OSError:
            if twin.process.poll() is not None or time.monotonic() - started > 60:
                raise RuntimeError(f"the twin did not start:\n{twin.log()}") from None
            time.sleep(0.01)
    listening = time.monotonic() - started
    ca.initialize_libca()
    chids = [ca.create_channel(n, connect=False, auto_cb=False) for n in names]
    deadline = time.monotonic() + 30
    while not all(ca.isConnected(c) for c in chids):
        if time.monotonic() > deadline:
            missing = [n for n, c in zip(names, chids, strict=True) if not ca.isConnected(c)]
            raise RuntimeError(f"{len(missing)} PVs did not connect: {missing[:5]}")
        ca.poll(0.01)
    every = time.monotonic() - started
    for c in chids:
        ca.clear_channel(c)
    return listening, every


class OrbitMonitor:
    """A pyepics monitor of the orbit waveform that keeps (arrival time, value)."""

    def __init__(self, name: str):
        import epics

        self.updates: list[tuple[float, np.ndarray]] = []
        self.lock = threading.Lock()
        self.pv = epics.PV(name, auto_monitor=True, form="native")
        if not self.pv.wait_for_connection(10):
            raise RuntimeError(f"{name} did not connect")
        self.pv.add_callback(self._on_update)

    def _on_update(self, value=None, **_):
        arrived = time.perf_counter()
        with self.lock:
            self.updates.append((arrived, np.array(value, dtype=float)))

    def since(self, t: float) -> list[tuple[float, np.ndarray]]:
        with self.lock:
            return [u for u in self.updates if u[0] > t]

    def before(self, t: float, n: int) -> list[np.ndarray]:
        """The last *n* values that arrived before *t*."""
        with self.lock:
            return [v for a, v in self.updates if a <= t][-n:]


def drive(stop: threading.Event, steerer: tuple[str, float], quadrupole: tuple[str, float]) -> None:
    """Keep the model busy: new steerer and quadrupole setpoints 5 times a second."""
    import epics

    rng = np.random.default_rng(1)
    while not stop.wait(0.2):
        epics.caput(steerer[0], steerer[1] + rng.uniform(-0.02, 0.02))
        epics.caput(quadrupole[0], quadrupole[1] * (1 + rng.uniform(-2e-4, 2e-4)))


def time_cagets(stop: threading.Event, names: list[str], samples: list[float]) -> None:
    import epics

    i = 0
    while not stop.wait(0.01):
        name = names[i % len(names)]
        start = time.perf_counter()
        value = epics.caget(name, timeout=2)
        if value is not None:
            samples.append(time.perf_counter() - start)
        i += 1


def measure_latency(monitor: OrbitMonitor, steerer: tuple[str, float], puts: int, step: float) -> list[float]:
    """Put the steerer between two values; seconds from each put to the first orbit update that moved."""
    import epics

    name, centre = steerer
    settled = {}
    for sign in (1, -1):
        epics.caput(name, centre + sign * step, wait=True)
        time.sleep(2.0)  # the ramp ends; then the last second of updates is the settled orbit
        settled[sign] = np.array([v for _, v in monitor.since(time.perf_counter() - 1.0)])
    response = settled[1].mean(axis=0) - settled[-1].mean(axis=0)
    direction = response / np.linalg.norm(response)
    quiet = settled[-1] @ direction
    threshold = 6 * max(float(np.std(quiet)), 1e-3 * float(np.linalg.norm(response)))
    rng = np.random.default_rng(2)
    latencies, sign = [], 1
    for _ in range(puts):
        baseline = float(np.mean(monitor.before(time.perf_counter(), 3), axis=0) @ direction)
        start = time.perf_counter()
        epics.caput(name, centre + sign * step)
        deadline = start + 2.0
        while time.perf_counter() < deadline:
            moved = [a for a, v in monitor.since(start) if abs(v @ direction - baseline) > threshold]
            if moved:
                latencies.append(moved[0] - start)
                break
            time.sleep(0.002)
        sign = -sign
        time.sleep(rng.uniform(0.25, 0.4))  # the ramp ends, and puts do not line up with the ticks
    return latencies


def naive_seconds(machine: str, repeat: int = 5) -> tuple[float, float]:
    """Median seconds of the naive full recomputation, and of the engine's compute with chromaticity."""
    code = f"""
import statistics, time, numpy as np, sys
sys.path.insert(0, {str(HERE)!r})
from bench_engine import naive_recompute, median_seconds
from twinioc.ioc.config import Config
from twinioc.model.engine import build_engine
from twinioc.model import Change
config = Config.for_machine({machine!r})
engine = build_engine(config.tables, config.realism)
steerer = engine.devices.of_kind("hsteerer")[0].name
rng = np.random.default_rng(1)
def step():
    engine.apply([Change(steerer, "current", float(rng.uniform(-0.02, 0.02)))])
    engine.compute(chromaticity=True)
ring6 = engine.ring.enable_6d(copy=True)
print(median_seconds(lambda: naive_recompute(ring6), {repeat}), median_seconds(step, 20))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    naive, engine = out.stdout.split()[-2:]
    return float(naive), float(engine)


# -- one run ------------------------------------------------------------------------------------

def run(machine: str, clients: int, seconds: float, puts: int, settings: list[str] = ()) -> Figures:
    from load import MonitorLoad, build

    build(HERE / ".build")
    tables = MachineTables(DB / machine)
    rows = tables.pvs(PREFIX)
    kinds = {c.name: (c.kind, c.default) for c in tables.converters.values()}
    names = [r.pv for r in rows if r.record != "table"]
    orbit = next(r.pv for r in rows if r.signal in ("orbit", "orbit_x"))
    bpm_pvs = [r.pv for r in rows if r.signal in ("bpm_x", "bpm_y")]
    setpoints = {r.device: r.pv for r in rows if r.signal == "setpoint"}
    steerers = [d for d in setpoints if kinds[d][0] == "hsteerer"]
    quadrupole = next(d for d in setpoints if kinds[d][0] == "quadrupole")
    figures = Figures(machine)

    twin = TwinProcess(machine, *(f"--set={s}" for s in settings),
                       state_dir=Path(tempfile.mkdtemp(prefix=f"bench-{machine}-")), prefix=PREFIX)
    os.environ.update(twin.client_env)
    try:
        first, every = time_startup(twin, names)
        figures.values |= {"startup_first_s": first, "startup_s": every}
        import epics

        epics.caget(f"{PREFIX}UPDATES", timeout=5)
        pids = process_tree(twin.process.pid)
        with MonitorLoad([orbit, *bpm_pvs], contexts=clients, seconds=seconds * 2 + puts * 0.45 + 10,
                         env=twin.client_env) as load:
            time.sleep(2.0)  # the load connects and subscribes
            monitor = OrbitMonitor(orbit)
            from p4p.client.thread import Context

            pva, pva_updates = Context("pva", conf=twin.pva_conf, useenv=False), []
            subscription = pva.monitor(orbit, lambda value: pva_updates.append(time.perf_counter()))
            stop, caget_samples = threading.Event(), []
            threads = [threading.Thread(target=drive, args=(stop, (setpoints[steerers[0]], kinds[steerers[0]][1]),
                                                            (setpoints[quadrupole], kinds[quadrupole][1]))),
                       threading.Thread(target=time_cagets, args=(stop, [names[1], f"{PREFIX}UPDATES"],
                                                                  caget_samples))]
            for t in threads:
                t.start()
            time.sleep(2.0)
            cpu = CpuShare(pids)
            updates0, t0 = epics.caget(f"{PREFIX}UPDATES"), time.perf_counter()
            count0, pva0 = len(monitor.since(0)), len(pva_updates)
            time.sleep(seconds)
            refresh = (len(monitor.since(0)) - count0) / (time.perf_counter() - t0)
            pva_refresh = (len(pva_updates) - pva0) / (time.perf_counter() - t0)
            subscription.close()
            pva.close()
            published = (epics.caget(f"{PREFIX}UPDATES") - updates0) / (time.perf_counter() - t0)
            compute_ms = epics.caget(f"{PREFIX}COMPUTE:TIME")
            shares = cpu.shares()
            stop.set()
            for t in threads:
                t.join()
            figures.values |= {
                "refresh_hz": refresh, "pva_refresh_hz": pva_refresh, "published_hz": published,
                "compute_ms": compute_ms,
                "caget_p50_ms": percentile(caget_samples, 50) * 1e3,
                "caget_p99_ms": percentile(caget_samples, 99) * 1e3, "caget_n": len(caget_samples),
                "cpu_ioc": shares[pids[0]] * 100, "cpu_physics": sum(shares[p] for p in pids[1:]) * 100}
            time.sleep(1.0)
            latencies = measure_latency(monitor, (setpoints[steerers[-1]], kinds[steerers[-1]][1]), puts, 0.02)
            figures.values |= {"latency_p50_ms": percentile(latencies, 50) * 1e3,
                               "latency_p99_ms": percentile(latencies, 99) * 1e3,
                               "latency_n": len(latencies), "latency_missed": puts - len(latencies)}
            figures.values["rss_mb"] = sum(rss_mb(p) for p in pids)
            figures.values["rss_ioc_mb"] = rss_mb(pids[0])
            load.stop()
            result = load.result()
        figures.values |= {"load_events_per_s": result["events_per_s"],
                           "load_per_client_per_s": statistics.median(result["per_context_per_s"]),
                           "load_clients": result["contexts"], "load_pvs": result["pvs"]}
    finally:
        twin.stop()
    naive, engine = naive_seconds(machine)
    figures.values |= {"naive_ms": naive * 1e3, "engine_ms": engine * 1e3}
    return figures


# -- the report ---------------------------------------------------------------------------------

def verdict(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    op, target = TARGETS[key]
    ok = value >= target if op == ">=" else value <= target
    return f"{op} {target:g}: {'met' if ok else 'NOT MET'}"


def table(f: Figures) -> str:
    v = f.values
    naive_hz = 1e3 / v["naive_ms"]
    rows = [
        ("refresh: orbit monitor updates per second", f"{v['refresh_hz']:.1f} Hz", "refresh_hz",
         f"{v['refresh_hz'] / naive_hz:.0f}x naive ({naive_hz:.1f} Hz)"),
        ("  the same waveform over PVA (p4p monitor)", f"{v['pva_refresh_hz']:.1f} Hz", "", ""),
        ("  publications per second (TWIN:UPDATES)", f"{v['published_hz']:.1f} Hz", "", ""),
        ("  model compute per tick (TWIN:COMPUTE:TIME, last)", f"{v['compute_ms']:.1f} ms", "", ""),
        ("caput -> first orbit update that moved, p50", f"{v['latency_p50_ms']:.1f} ms", "latency_p50_ms",
         f"naive >= {v['naive_ms']:.0f} ms ({v['naive_ms'] / v['latency_p50_ms']:.0f}x)"),
        ("caput -> first orbit update that moved, p99", f"{v['latency_p99_ms']:.1f} ms", "latency_p99_ms",
         f"{v['latency_n']} puts, {v['latency_missed']} missed"),
        ("caget round trip under compute, p50", f"{v['caget_p50_ms']:.2f} ms", "", f"{v['caget_n']} cagets"),
        ("caget round trip under compute, p99", f"{v['caget_p99_ms']:.2f} ms", "caget_p99_ms", ""),
        ("start-up: CA server listening", f"{v['startup_first_s']:.2f} s", "", ""),
        ("start-up: every PV connected", f"{v['startup_s']:.2f} s", "startup_s", ""),
        ("resident memory, IOC + physics", f"{v['rss_mb']:.0f} MB", "rss_mb", f"IOC {v['rss_ioc_mb']:.0f} MB"),
        ("CPU share: IOC process", f"{v['cpu_ioc']:.0f} %", "", "of one core"),
        ("CPU share: physics process", f"{v['cpu_physics']:.0f} %", "", "of one core"),
        ("monitor load delivered", f"{v['load_events_per_s']:.0f} ev/s", "",
         f"{v['load_clients']} clients x {v['load_pvs']} PVs, {v['load_per_client_per_s']:.0f} ev/s each"),
        ("engine: compute() with chromaticity, median", f"{v['engine_ms']:.1f} ms", "",
         f"{v['naive_ms'] / v['engine_ms']:.0f}x faster than naive"),
        ("naive: 6D optics everywhere + chrom + emittance", f"{v['naive_ms']:.0f} ms", "", "per change"),
    ]
    lines = [f"| {f.machine} | figure | target | note |", "|---|---|---|---|"]
    lines += [f"| {label} | {value} | {verdict(key, v[key]) if key else ''} | {note} |"
              for label, value, key, note in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default="bessy2")
    parser.add_argument("--clients", type=int, default=20, help="monitoring CA clients (default 20)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the refresh window")
    parser.add_argument("--puts", type=int, default=100, help="puts for the latency percentiles")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a startup setting for the twin, e.g. equilibrium.enabled=false")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where <machine>.md goes")
    args = parser.parse_args()

    figures = run(args.machine, args.clients, args.seconds, args.puts, args.set)
    import at

    header = (f"{datetime.date.today().isoformat()}, {cpu_model()} ({os.cpu_count()} cores), "
              f"Python {platform.python_version()}, pyAT {at.__version__}; "
              f"`python bench/bench_twin.py --machine {args.machine} --clients {args.clients} "
              f"--seconds {args.seconds:g} --puts {args.puts}{''.join(f' --set {s}' for s in args.set)}`")
    report = f"{header}\n\n{table(figures)}\n"
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.machine}.md").write_text(f"# {args.machine}: the twin under load\n\n{report}")


if __name__ == "__main__":
    main()
