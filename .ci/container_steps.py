"""Run the Dockerfile's own steps without Docker: install, start, health check, client, stop, restart.

There is no Docker engine on the build machines, so this reads the Dockerfile and does what a build
and a `docker run` would do, in a fresh folder with a fresh virtual environment:

1. COPY: the build context (the project, less .dockerignore's names) into <tmp>/home/twin/twinioc.
2. RUN: every step after USER, in that folder ("make install" makes a new .venv there). The steps
   before USER (apt-get, useradd) need root and the base image: they are skipped, and only checked
   for what they provide (make).
3. ENV, ENTRYPOINT and CMD: the twin starts as the image starts it, once with the default CMD and
   once with `--machine mls` (as the README's `docker run` does).
4. HEALTHCHECK: its command runs until it succeeds (within the start period and retries) and must
   fail once the twin has stopped.
5. The image's command-line client (`twinioc get|put`) writes a setpoint over CA and reads it
   over PVA; SIGTERM (what `docker stop` sends) must end the twin within the stop grace period, and
   the setpoint must be back after a restart on the same state volume.

Where a container would differ, CI keeps to loopback: the servers bind 127.0.0.1 instead of
0.0.0.0, on free ports, and the sentinel search goes to 127.0.0.1 instead of the broadcast address.
Paths under /home/twin are mapped into the temporary folder. Exit status 0 when every step passed.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_HOME = "/home/twin"
STOP_GRACE_S = 10.0  # docker stop's default


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                            if not line.lstrip().startswith("#")))
    return [(word.upper(), rest.strip()) for word, _, rest in
            (line.strip().partition(" ") for line in joined.splitlines() if line.strip())]


def exec_form(arguments: str) -> list[str]:
    return json.loads(arguments) if arguments.startswith("[") else ["sh", "-c", arguments]


def ignored(relative: Path, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in patterns)


def copy_context(target: Path) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if path.is_file() and not ignored(relative, patterns):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)


def loopback_env() -> dict[str, str]:
    """The ports and addresses CI uses where the container has its own network namespace: the ones
    the project's tests give a twin (``ioc/testing.py``, standard library only, loaded from the
    source tree since this runs before anything is installed)."""
    spec = importlib.util.spec_from_file_location("twinioc_testing", ROOT / "ioc" / "testing.py")
    testing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(testing)
    ports = testing.TwinProcess(state_dir=Path(tempfile.gettempdir()))  # its free ports, nothing started
    return {**ports.server_env, **ports.client_env}


class Image:
    """What the Dockerfile builds, laid out under a temporary home."""

    def __init__(self, dockerfile: Path, home: Path):
        self.steps = instructions(dockerfile)
        self.home = home
        self.env = {"HOME": str(home), "LANG": "C.UTF-8",
                    "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                            if not (sys.prefix != sys.base_prefix and p.startswith(sys.prefix)))}
        self.workdir = home
        self.entrypoint: list[str] = []
        self.cmd: list[str] = []
        self.health: list[str] = []
        self.health_options: dict[str, float] = {}
        self.volumes: list[Path] = []

    def here(self, text: str) -> str:
        return text.replace(IMAGE_HOME, str(self.home))

    def build(self) -> None:
        user_set = False
        for instruction, arguments in self.steps:
            arguments = self.here(arguments)
            if instruction == "USER":
                user_set = True
            elif instruction == "WORKDIR":
                self.workdir = Path(arguments)
                self.workdir.mkdir(parents=True, exist_ok=True)
            elif instruction == "COPY":
                step(f"COPY {arguments}", lambda: copy_context(self.workdir))
            elif instruction == "RUN" and not user_set:
                print(f"-- skipped (root, base image): RUN {arguments[:70]}...")
                if "make" in arguments.split() and not shutil.which("make"):
                    fail("the skipped step installs make, and this machine has none")
            elif instruction == "RUN":
                step(f"RUN {arguments}", lambda a=arguments: run(["sh", "-c", a], self.workdir, self.env))
            elif instruction == "ENV":
                for name, value in re.findall(r'(\w+)=("[^"]*"|\S+)', arguments):
                    self.env[name] = re.sub(r"\$(\w+)|\$\{(\w+)\}",
                                            lambda m: self.env.get(m.group(1) or m.group(2), ""), value.strip('"'))
            elif instruction == "VOLUME":
                self.volumes += [Path(v) for v in (json.loads(arguments) if arguments.startswith("[")
                                                   else arguments.split())]
            elif instruction == "HEALTHCHECK":
                options, _, command = arguments.partition(" CMD ")
                self.health = ["sh", "-c", command.strip()]
                self.health_options = {k: float(v.rstrip("s")) for k, v in re.findall(r"--([\w-]+)=(\S+)", options)}
            elif instruction == "ENTRYPOINT":
                self.entrypoint = exec_form(arguments)
            elif instruction == "CMD":
                self.cmd = exec_form(arguments)

    def start(self, args: list[str] | None, network: dict[str, str], log: Path) -> subprocess.Popen:
        command = [("127.0.0.1" if part == "0.0.0.0" else part) for part in self.entrypoint + (args or self.cmd)]
        print(f"-- start: {shlex.join(command)}")
        with log.open("ab") as out:
            return subprocess.Popen(command, cwd=self.workdir, env={**self.env, **network}, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def healthy(self, network: dict[str, str]) -> bool:
        done = subprocess.run(self.health, cwd=self.workdir, env={**self.env, **network}, capture_output=True,
                              text=True, timeout=self.health_options.get("timeout", 30))
        return done.returncode == 0

    def client(self, network: dict[str, str], *args: str) -> str:
        done = subprocess.run(["twinioc", *args], cwd=self.workdir, env={**self.env, **network},
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            fail(f"twinioc {shlex.join(args)} -> {done.returncode}\n{done.stdout}{done.stderr}")
        return done.stdout


def run(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=cwd, env=env)
    if done.returncode != 0:
        fail(f"{shlex.join(command)} -> exit {done.returncode}")


def step(title: str, action) -> None:
    print(f"-- {title}", flush=True)
    started = time.monotonic()
    action()
    print(f"   done in {time.monotonic() - started:.1f} s", flush=True)


def fail(message: str) -> None:
    print(f"container steps: FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def stop(process: subprocess.Popen) -> float:
    """SIGTERM, as `docker stop` sends; the seconds until the twin exited."""
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        fail(f"the twin did not end within {STOP_GRACE_S} s of SIGTERM (docker would kill it)")
    if code != 0:
        fail(f"the twin exited with {code} on SIGTERM")
    return time.monotonic() - started


def steerer_setpoint(image: Image, machine: str) -> str:
    """The setpoint PV of the machine's first horizontal steerer (the PV names differ per machine)."""
    import csv

    with (image.workdir / "db" / machine / "converters.csv").open() as table:
        steerer = next(row["name"] for row in csv.DictReader(table) if row["kind"] == "hsteerer")
    with (image.workdir / "db" / machine / "pvs.csv").open() as table:
        return next(row["pv"] for row in csv.DictReader(table)
                    if row["device"] == steerer and row["signal"] == "setpoint")


def feedback_switch(image: Image, machine: str) -> str:
    """The PV that switches the machine's slow orbit feedback (a real name, or the twin's own)."""
    import csv

    with (image.workdir / "db" / machine / "pvs.csv").open() as table:
        pv = next(row["pv"] for row in csv.DictReader(table)
                  if row["signal"] in ("feedback_run_mode", "feedback_switch"))
    return pv.replace("$(P)", "TWIN:")


def check_machine(image: Image, machine: str, args: list[str] | None, log: Path) -> None:
    network = loopback_env()
    process = image.start(args, network, log)
    try:
        deadline = time.monotonic() + image.health_options.get("start-period", 30) + \
            image.health_options.get("retries", 3) * image.health_options.get("interval", 10)
        started = time.monotonic()
        while not image.healthy(network):
            if process.poll() is not None or time.monotonic() > deadline:
                fail(f"{machine}: never healthy; log:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        print(f"   {machine}: healthy {time.monotonic() - started:.1f} s after the start")
        setpoint, switch = steerer_setpoint(image, machine), feedback_switch(image, machine)
        image.client(network, "put", switch, "0")  # as an operator does before steering by hand
        time.sleep(1.5)  # a correction under way ends
        value = float(image.client(network, "get", setpoint).split()[-1]) + 0.125
        image.client(network, "put", setpoint, repr(value))
        over_pva = float(image.client(network, "get", "--pva", setpoint).split()[-1])
        if over_pva != value:
            fail(f"{machine}: put {value} over CA, read {over_pva} over PVA")
        print(f"   {machine}: `twinioc put` over CA, `twinioc get --pva`: {setpoint} = {over_pva}")
        time.sleep(0.5)
    finally:
        seconds = stop(process) if process.poll() is None else float("nan")
    print(f"   {machine}: SIGTERM ended it in {seconds:.1f} s")
    if image.healthy(network):
        fail(f"{machine}: the health check passes with the twin stopped")
    process = image.start(args, network, log)
    try:
        while not image.healthy(network):
            if process.poll() is not None:
                fail(f"{machine}: restart failed; log:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        again = float(image.client(network, "get", setpoint).split()[-1])
        if again != value:
            fail(f"{machine}: {setpoint} was {value} before the restart and is {again} after it")
        print(f"   {machine}: after a restart on the same volume {setpoint} = {again}")
        if image.client(network, "get", switch).split()[-1] not in ("0", "OFF"):
            fail(f"{machine}: the orbit feedback, switched off ({switch} = 0), is on again after the restart")
    finally:
        stop(process)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="twinioc-container-") as tmp:
        image = Image(ROOT / "Dockerfile", Path(tmp) / "home" / "twin")
        image.build()
        if not image.health or not image.entrypoint:
            fail("the Dockerfile has no HEALTHCHECK or no ENTRYPOINT")
        for volume in image.volumes:
            volume.mkdir(parents=True, exist_ok=True)
        log = Path(tmp) / "twin.log"
        step("machine bessy2 (the default CMD)", lambda: check_machine(image, "bessy2", None, log))
        step("machine mls (docker run ... twinioc --machine mls)",
             lambda: check_machine(image, "mls", ["--machine", "mls"], log))
        if "Traceback" in log.read_text():
            fail(f"a traceback in the twin's log:\n{log.read_text()[-3000:]}")
    print("container steps: passed")


if __name__ == "__main__":
    main()
