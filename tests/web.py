"""The measurement service as a process for the tests: ``twinioc web`` on a free loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from twinioc.ioc.testing import free_port, stop_group

_EMPTY_CATALOG: list[Path] = []


def empty_catalog() -> Path:
    """An empty tiled catalog, made once per test session (``tiled catalog init`` is a subprocess of a
    few seconds): a fresh state folder starts from a copy of it, as it would start from its own."""
    if not _EMPTY_CATALOG:
        folder = Path(tempfile.mkdtemp(prefix="twinioc-tiled-"))
        subprocess.run([sys.executable, "-m", "tiled", "catalog", "init", str(folder / "catalog.db")],
                       check=True, capture_output=True, timeout=120)
        _EMPTY_CATALOG.append(folder / "catalog.db")
    return _EMPTY_CATALOG[0]


class WebProcess:
    """``twinioc web`` for *machine*, reaching the twins of *env* (their client settings)."""

    def __init__(self, machine: str, env: dict[str, str], state_dir: Path, prefix: str | None = None,
                 *args: str, timeout: float = 90.0):
        self.machine, self.env, self.state_dir, self.timeout = machine, env, Path(state_dir), timeout
        self.port = free_port()
        self.args = [*(["--prefix", prefix] if prefix else []), *args]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.state_dir / "web.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "twinioc.ioc.cli", "web", "--machine", self.machine, "--port", str(self.port),
                "--state-dir", str(self.state_dir), *self.args]

    def start(self) -> WebProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")} | self.env
        self.state_dir.mkdir(parents=True, exist_ok=True)
        catalog = self.state_dir / "tiled" / "catalog.db"
        if not catalog.exists():
            catalog.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(empty_catalog(), catalog)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"twinioc web exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/api/machine", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"twinioc web not serving after {self.timeout} s:\n{self.log()}")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_group(self.process, signal.SIGINT, timeout=60)  # SIGINT: uvicorn shuts the service down

    def __enter__(self) -> WebProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def epics_env() -> dict[str, str]:
    """The EPICS client settings of this process (the session's twins), for a service to reach them."""
    return {k: v for k, v in os.environ.items() if k.startswith("EPICS_")}


def wait_done(client: httpx.Client, id: str, timeout: float = 300.0) -> dict:
    """Poll a measurement until it has finished; its record."""
    deadline = time.monotonic() + timeout
    while True:
        record = client.get(f"/api/measurements/{id}").json()
        if record["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


def measure(client: httpx.Client, body: dict, timeout: float = 300.0) -> dict:
    """Post a measurement and wait for it; its record, which must be done."""
    response = client.post("/api/measurements", json=body)
    assert response.status_code == 202, response.text
    record = wait_done(client, response.json()["id"], timeout)
    assert record["status"] == "done", record
    return record
