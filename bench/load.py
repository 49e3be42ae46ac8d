"""A Channel Access monitor load from a small C client (bench/monitor_load.c), for benchmarks.

    with MonitorLoad(pvs, contexts=20, seconds=10, env=twin.client_env) as load:
        ...                       # measure the IOC meanwhile
        figures = load.result()   # {"contexts", "pvs", "connected", "seconds", "events", ...}

Each context is a separate CA client with its own TCP circuit, so the server sees ``contexts``
clients. A Python client spends ~30 µs of CPU per event in callbacks; this one ~8-12 µs, nearly all
of it in the kernel (recv and thread wake-ups of the 20 circuits), measured on a 2-core VM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "monitor_load.c"
BUILD_DIR = HERE / ".build"


def _epics_paths() -> tuple[list[Path], Path]:
    """Include folders and the library folder of the epicscorelibs wheel."""
    from epicscorelibs import path as epics_path

    include = Path(epics_path.include_path)
    # Older wheels keep the OS and compiler headers in subfolders; newer ones flatten them.
    includes = [include] + [p for p in (include / "os" / "Linux", include / "compiler" / "gcc") if p.is_dir()]
    return includes, Path(epics_path.lib_path)


def build(out_dir: Path = BUILD_DIR) -> Path:
    """Compile monitor_load.c into *out_dir* unless an up-to-date binary is there; return its path."""
    out_dir = Path(out_dir)
    binary = out_dir / "monitor_load"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found on PATH: it is needed to build bench/monitor_load.c")
    out_dir.mkdir(parents=True, exist_ok=True)
    includes, lib_path = _epics_paths()
    # Build under a temporary name and rename: a run of the old binary or a concurrent build is unharmed.
    partial = out_dir / f".monitor_load.{os.getpid()}"
    command = [gcc, "-O2", "-pthread", "-Wall", "-Wextra", *(f"-I{p}" for p in includes), str(SOURCE),
               "-o", str(partial), f"-L{lib_path}", f"-Wl,-rpath,{lib_path}", "-lca", "-lCom"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(command)}):\n{done.stderr}")
    os.replace(partial, binary)
    return binary


class MonitorLoad:
    """Run monitor_load against *pvs* in the background: *contexts* CA clients, each monitoring them all."""

    def __init__(self, pvs: list[str], contexts: int = 20, seconds: float = 10.0,
                 env: dict[str, str] | None = None, binary: Path | None = None):
        self.pvs = list(pvs)
        self.contexts = contexts
        self.seconds = seconds
        self.binary = Path(binary) if binary is not None else build()
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[str] | None = None
        self.stderr = ""
        self._output: tuple[str, str] | None = None
        self._result: dict | None = None

    def start(self) -> MonitorLoad:
        """Start the load (``with`` does this)."""
        self.process = subprocess.Popen(
            [str(self.binary), repr(float(self.seconds)), str(self.contexts)], env=self.env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdin, self.process.stdin = self.process.stdin, None  # communicate() must not touch it again
        assert stdin is not None
        try:
            with stdin:
                stdin.write("".join(f"{pv}\n" for pv in self.pvs))
        except BrokenPipeError:
            pass  # it exited at once; result() reports its stderr
        return self

    def result(self, timeout: float | None = None) -> dict:
        """Wait for the run to end; its JSON figures plus ``returncode`` (2: not all channels connected).

        RuntimeError when it printed no figures (bad arguments, a thread that could not start).
        """
        if self._result is None:
            if timeout is None:
                timeout = self.seconds + 60.0  # up to 10 s to connect, then the run, then the teardown
            self._result = self._collect(timeout)
        return self._result

    def stop(self) -> None:
        """End the load early if it still runs; it still prints its figures on SIGTERM."""
        if self.process is None or self._output is not None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self._output = self.process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self._output = self.process.communicate()

    def _collect(self, timeout: float) -> dict:
        if self.process is None:
            raise RuntimeError("MonitorLoad was not started")
        if self._output is None:
            self._output = self.process.communicate(timeout=timeout)
        stdout, self.stderr = self._output
        lines = stdout.strip().splitlines()
        try:
            figures = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            raise RuntimeError(f"monitor_load exited with {self.process.returncode} and no result:\n"
                               f"{self.stderr}") from None
        figures["returncode"] = self.process.returncode
        return figures

    def __enter__(self) -> MonitorLoad:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
