"""Start a twin as a subprocess on free loopback ports, for tests and benchmarks.

    with TwinProcess("bessy2") as twin:
        os.environ.update(twin.client_env)   # before pyepics/p4p make their contexts
        ...

Each twin gets its own CA server, CA repeater, PVA server and PVA broadcast ports on 127.0.0.1, so
that several can run side by side and none talks to anything but loopback. ``client_env(*twins)``
lets one client reach several at once (give them different ``prefix``es: the twin-only names would
clash otherwise).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


_HANDED_OUT: set[int] = set()  # ports this process gave to a twin: free again the moment they are checked


def free_port() -> int:
    """A port that is free for both TCP and UDP on loopback right now, and not handed out before by
    this process (two twins made one after the other, before either binds, must not share one)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((LOOPBACK, port))
                except OSError:
                    continue
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


class TwinProcess:
    def __init__(self, machine: str = "bessy2", *args: str, state_dir: Path | None = None,
                 prefix: str = "TWIN:", timeout: float = 60.0, seed: int | None = None, config: Path | None = None):
        """*machine*: a startup file of ``startup/``; *config*: a startup file of your own instead."""
        self.machine = machine
        self.config = config
        self.seed = seed  # None: the startup file's (the twin publishes it as <prefix>SEED)
        if seed is not None:
            args = (*args, "--seed", str(seed))
        self.args = [*args, "--prefix", prefix]
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix=f"twinioc-{machine}-"))
        self.prefix = prefix
        self.ready_pv = f"{prefix}UPDATES"
        self.timeout = timeout
        self.ca_port, self.repeater_port, self.pva_port, self.pva_broadcast = (free_port() for _ in range(4))
        self.process: subprocess.Popen | None = None
        self.log_path = self.state_dir / "ioc.log"
        self.startup_seconds = float("nan")
        self._started = float("nan")

    @property
    def server_env(self) -> dict[str, str]:
        return {
            "EPICS_CA_SERVER_PORT": str(self.ca_port),
            "EPICS_CA_REPEATER_PORT": str(self.repeater_port),
            "EPICS_CAS_INTF_ADDR_LIST": LOOPBACK,
            "EPICS_CAS_BEACON_ADDR_LIST": LOOPBACK,
            "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
            "EPICS_CA_ADDR_LIST": LOOPBACK,
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVAS_INTF_ADDR_LIST": LOOPBACK,
            "EPICS_PVAS_SERVER_PORT": str(self.pva_port),
            "EPICS_PVAS_BROADCAST_PORT": str(self.pva_broadcast),
            "EPICS_PVAS_BEACON_ADDR_LIST": LOOPBACK,
            "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
        }

    @property
    def client_env(self) -> dict[str, str]:
        """What a CA or PVA client needs to find this twin and nothing else."""
        return client_env(self)

    env = client_env

    def pv(self, name: str) -> str:
        """The full name of a twin-only PV: ``pv("SEED")`` is ``TWIN:SEED`` under the default prefix."""
        return f"{self.prefix}{name}"

    @property
    def pva_conf(self) -> dict[str, str]:
        """The client settings for ``p4p.client.thread.Context('pva', conf=..., useenv=False)``."""
        return pva_conf(self)

    def pva_context(self):
        """A p4p client context that reaches this twin and nothing else (close it when done)."""
        from p4p.client.thread import Context

        return Context("pva", conf=self.pva_conf, useenv=False)

    def start(self) -> TwinProcess:
        """Start the twin and wait until it serves."""
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> TwinProcess:
        """Start the twin's process without waiting (``wait_ready`` waits)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
        env.update(self.server_env)
        command = self.command()
        self._started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def command(self) -> list[str]:
        which = ["--config", str(self.config)] if self.config else ["--machine", self.machine]
        return [sys.executable, "-m", "twinioc.ioc.cli", *which, "--state-dir", str(self.state_dir), *self.args]

    def wait_ready(self) -> None:
        """Poll with bare CA name searches (cheap, in this process) until the server answers, then
        read the publication counter with pyepics in a fresh process until it has published."""
        from .sentinel import answered

        deadline = time.monotonic() + self.timeout
        env = {**os.environ, **self.client_env}
        probe = ("import sys, epics; v = epics.caget(sys.argv[1], timeout=0.5, connection_timeout=0.5); "
                 "sys.exit(0 if v is not None and v > 0 else 1)")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"twin exited with {self.process.returncode}:\n{self.log()}")
            if not answered([self.ready_pv], [(LOOPBACK, self.ca_port)], timeout=0.05):
                time.sleep(0.05)  # nobody on the port yet answers at once (ICMP port unreachable)
                continue
            done = subprocess.run([sys.executable, "-c", probe, self.ready_pv], env=env,
                                  capture_output=True)
            if done.returncode == 0:
                self.startup_seconds = time.monotonic() - self._started
                return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"twin not ready after {self.timeout} s:\n{self.log()}")

    @property
    def started_at(self) -> float:
        """When the twin's process was launched (``time.monotonic()``)."""
        return self._started

    def worker_pid(self) -> int:
        """The pid of the twin's physics worker (after a restart, the new one's)."""
        (worker,) = [pid for pid in self._workers() if _priority(pid) == _priority(self.process.pid)]
        return worker

    def equilibrium_pid(self) -> int:
        """The pid of the twin's equilibrium worker, which runs at a lower priority (SCHED_IDLE)."""
        (worker,) = [pid for pid in self._workers() if _priority(pid) != _priority(self.process.pid)]
        return worker

    def _workers(self) -> list[int]:
        """The twin's child processes started by multiprocessing (from any of its threads)."""
        root = Path(f"/proc/{self.process.pid}/task")
        children = [int(pid) for task in root.iterdir() for pid in (task / "children").read_text().split()]
        return [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_group(self.process, sig, timeout=10)

    def __enter__(self) -> TwinProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ShadowProcess(TwinProcess):
    """``twinioc shadow`` following *source* (a started ``TwinProcess``), on free loopback ports of its own."""

    def __init__(self, source: TwinProcess, *args: str, prefix: str = "SHADOW:", state_dir: Path | None = None,
                 timeout: float = 60.0):
        super().__init__(source.machine, state_dir=state_dir or tempfile.mkdtemp(prefix="twinioc-shadow-"),
                         prefix=prefix, timeout=timeout)
        self.source = source
        self.args = ["--source-ca-addr", f"{LOOPBACK}:{source.ca_port}",
                     "--source-pva-addr", f"{LOOPBACK}:{source.pva_broadcast}", "--prefix", prefix, *args]
        self.ready_pv = f"{prefix}SOURCE:CONNECTED"
        self.log_path = self.state_dir / "shadow.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "twinioc.ioc.cli", "shadow", "--machine", self.machine,
                "--state-dir", str(self.state_dir), *self.args]


def stop_group(process: subprocess.Popen | None, sig: int, timeout: float) -> None:
    """Send *sig* to the process group of *process* (started with ``start_new_session``), wait up to
    *timeout* s, then kill the group."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def client_env(*twins: TwinProcess) -> dict[str, str]:
    """The CA and PVA client settings that reach *twins* (all on loopback) and nothing else."""
    first = twins[0]
    return {
        "EPICS_CA_ADDR_LIST": " ".join(f"{LOOPBACK}:{t.ca_port}" for t in twins),
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_SERVER_PORT": str(first.ca_port),
        "EPICS_CA_REPEATER_PORT": str(first.repeater_port),
        "EPICS_PVA_ADDR_LIST": " ".join(f"{LOOPBACK}:{t.pva_broadcast}" for t in twins),
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_SERVER_PORT": str(first.pva_port),
        "EPICS_PVA_BROADCAST_PORT": str(first.pva_broadcast),
    }


def pva_conf(*twins: TwinProcess) -> dict[str, str]:
    """Settings for ``p4p.client.thread.Context('pva', conf=..., useenv=False)`` that reach *twins*."""
    return {k: v for k, v in client_env(*twins).items() if k.startswith("EPICS_PVA")}


def _priority(pid: int) -> tuple[int, int]:
    """The scheduling policy and the nice value (field 19 of /proc/PID/stat) of process *pid*."""
    return os.sched_getscheduler(pid), int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
