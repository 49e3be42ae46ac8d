"""The dashboard in a headless Chromium: how often the orbit plot is redrawn, and how long a steerer
put takes to show in it.

    python bench/bench_dashboard.py [--machines bessy2 mls] [--puts 20] [--window 20]

Per machine: an ideal twin (its feedback off) with 1 µm of BPM noise, so that every publication
changes the orbit, and ``twinioc web`` beside it, fresh state folders, free loopback ports. The page
counts its orbit graph's redraws (Plotly's ``plotly_afterplot``) and stamps each with the plotted
reading of the BPM the steerer moves most. Figures:

- refresh: redraws per second over *window* s, against the twin's orbit publications per second
  seen over CA in the same window (the ratio: how many of the twin's updates the page shows);
- latency: from a ``caput`` of the steerer (±0.5 A, alternating, *puts* times) to the first redraw
  that shows the change, against the time the same change takes to arrive over CA (a monitor of the
  orbit); medians and 90th percentiles;
- the web process's resident memory after the run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
from browser import chromium, graph_data, missing, wait_for  # noqa: E402
from twinioc.ioc.testing import TwinProcess  # noqa: E402
from twinioc.model import Engine  # noqa: E402
from twinioc.studies.machine import DB, MachineLayout  # noqa: E402
from web import WebProcess  # noqa: E402

STEERER = {"bessy2": "HS4P2D1R", "mls": "HS1P2K1RP"}
STEP_A = 0.5
NOISE_UM = 1.0

# in the page: every redraw of the orbit graph, stamped, with the reading (x) of the BPM named arguments[0]
WATCH = """
const graph = document.querySelector('#orbit .js-plotly-plot');
const bpm = arguments[0];
window.redraws = [];
graph.on('plotly_afterplot', () => {
  const trace = graph._fullData.find(t => t.name === 'BPM readings');
  if (trace) window.redraws.push([Date.now() / 1000, trace.y[trace.text.indexOf(bpm)]]);
});
return true;
"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class OrbitWatch:
    """The twin's orbit over CA: each publication's arrival time and the reading of one BPM."""

    def __init__(self, layout: MachineLayout, bpm: int):
        import epics

        self.arrivals: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        orbit = layout.orbit
        if orbit.waveform:
            self.pv = epics.PV(orbit.waveform, auto_monitor=True,
                               callback=lambda value, **kw: self._add(value[2 * bpm] * orbit.waveform_to_mm))
        else:
            self.pv = epics.PV(orbit.x[bpm], auto_monitor=True, callback=lambda value, **kw: self._add(value))
        self.pv.wait_for_connection(10)

    def _add(self, value: float) -> None:
        with self._lock:
            self.arrivals.append((time.time(), float(value)))

    def since(self, t: float) -> list[tuple[float, float]]:
        with self._lock:
            return [a for a in self.arrivals if a[0] >= t]


def first_change(entries, since: float, before: float, threshold: float) -> float | None:
    for stamp, value in entries:
        if stamp >= since and value is not None and abs(value - before) > threshold:
            return stamp
    return None


def bench(machine: str, puts: int, window: float) -> dict:
    import epics

    engine = Engine.from_folder(DB / machine)
    column = engine.orbit_response([STEERER[machine]])[:len(engine.devices.bpms), 0] * STEP_A * 1e3  # mm
    bpm = int(np.argmax(np.abs(column)))
    threshold = 0.5 * abs(column[bpm])
    with tempfile.TemporaryDirectory(prefix=f"bench-dashboard-{machine}-") as folder:
        with TwinProcess(machine, "--ideal", state_dir=Path(folder) / "twin") as twin:
            os.environ.update(twin.client_env)  # before pyepics makes its context: one machine per process
            layout = MachineLayout.load(machine)
            assert epics.caput(layout.role("bpm_noise_um"), NOISE_UM, wait=True, timeout=5)
            with WebProcess(machine, twin.client_env, Path(folder) / "web") as web:
                driver = chromium()
                try:
                    return measure(driver, web, layout, bpm, threshold, puts, window)
                finally:
                    driver.quit()


def measure(driver, web, layout, bpm: int, threshold: float, puts: int, window: float) -> dict:
    import epics

    driver.get(web.url)
    assert wait_for(lambda: (g := graph_data(driver, "orbit")) and len(g[0]["y"]), 60), "no orbit plotted"
    driver.execute_script(WATCH, layout.orbit.bpms[bpm])
    watch = OrbitWatch(layout, bpm)
    time.sleep(2.0)
    start = time.time()
    time.sleep(window)
    redraws = [r for r in driver.execute_script("return window.redraws;") if r[0] >= start]
    published = watch.since(start)
    setpoint = layout.converter(STEERER[layout.name]).setpoint
    original = epics.caget(setpoint, timeout=5)
    page_s, ca_s = [], []
    for k in range(puts):
        before = watch.since(0)[-1][1]
        put_at = time.time()
        epics.caput(setpoint, original + (STEP_A if k % 2 == 0 else 0.0), wait=True, timeout=5)
        shown = wait_for(lambda put_at=put_at, before=before: first_change(
            driver.execute_script("return window.redraws;"), put_at, before, threshold), 5.0, period=0.02)
        arrived = first_change(watch.since(put_at), put_at, before, threshold)
        if shown:
            page_s.append(shown - put_at)
        if arrived:
            ca_s.append(arrived - put_at)
        time.sleep(0.5)
    epics.caput(setpoint, original, wait=True, timeout=5)
    rss_kb = int(next(line.split()[1] for line in Path(f"/proc/{web.process.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS")))
    return {"redraws_hz": len(redraws) / window, "published_hz": len(published) / window,
            "page_median_s": statistics.median(page_s) if page_s else float("nan"),
            "page_p90_s": percentile(page_s, 90), "ca_median_s": statistics.median(ca_s) if ca_s else float("nan"),
            "ca_p90_s": percentile(ca_s, 90), "shown": len(page_s), "puts": puts, "rss_mb": rss_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", nargs="+", default=["bessy2", "mls"])
    parser.add_argument("--puts", type=int, default=20)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    why = missing()
    if why:
        sys.exit(f"bench_dashboard: {why}")
    if not args.no_header:
        print(f"{'machine':8} {'redraws/s':>9} {'twin/s':>7} {'shown':>6} {'put→plot med s':>14} {'p90 s':>6} "
              f"{'put→CA med s':>12} {'p90 s':>6} {'plot−CA s':>9} {'web RSS MB':>10}", flush=True)
    if len(args.machines) > 1:  # pyepics keeps its first context: each machine in a process of its own
        for machine in args.machines:
            subprocess.run([sys.executable, __file__, "--machines", machine, "--puts", str(args.puts),
                            "--window", str(args.window), "--no-header"], check=True)
        return
    for machine in args.machines:
        r = bench(machine, args.puts, args.window)
        print(f"{machine:8} {r['redraws_hz']:9.2f} {r['published_hz']:7.2f} {r['shown']:3d}/{r['puts']:<2d} "
              f"{r['page_median_s']:14.3f} {r['page_p90_s']:6.3f} {r['ca_median_s']:12.3f} {r['ca_p90_s']:6.3f} "
              f"{r['page_median_s'] - r['ca_median_s']:9.3f} {r['rss_mb']:10.0f}", flush=True)


if __name__ == "__main__":
    main()
