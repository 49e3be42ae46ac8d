"""The README's container section and the Dockerfile say the same thing (the image itself is not built
in CI: `.ci/container_steps.py` runs its steps; see the README)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib

import pytest
from conftest import ROOT
from twinioc.ioc.config import Config
from twinioc.model.tables import MachineTables

EPICS_PORTS = {"5064/tcp", "5064/udp", "5065/udp", "5075/tcp", "5076/udp"}  # CA, CA repeater, PVA


def load_steps():
    spec = importlib.util.spec_from_file_location("container_steps", ROOT / ".ci" / "container_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[str]]:
    steps: dict[str, list[str]] = {}
    for instruction, arguments in load_steps().instructions(ROOT / "Dockerfile"):
        steps.setdefault(instruction, []).append(arguments)
    return steps


@pytest.fixture(scope="module")
def section() -> str:
    return (ROOT / "README.md").read_text().split("\n## Container\n", 1)[1].split("\n## ", 1)[0]


def docker_runs(section: str) -> list[list[str]]:
    commands = re.sub(r"\\\n", " ", section.split("```sh", 1)[1].split("```", 1)[0])
    return [shlex.split(line.split("#")[0]) for line in commands.splitlines() if line.startswith("docker run")]


def test_the_image_exposes_the_epics_ports_and_the_readme_publishes_exactly_those(dockerfile, section):
    exposed = {port for line in dockerfile["EXPOSE"] for port in line.split()}
    assert exposed == EPICS_PORTS
    runs = docker_runs(section)
    assert len(runs) == 2
    for run in runs:
        published = [run[i + 1] for i, word in enumerate(run) if word == "-p"]
        assert {mapping.split(":", 1)[1] for mapping in published} == exposed
        assert all(mapping.split(":")[0] == mapping.split(":")[1].split("/")[0] for mapping in published)


def test_the_readme_runs_both_machines_with_the_image_it_builds(dockerfile, section):
    image = re.search(r"docker build -t (\S+) \.", section).group(1)
    cmd = load_steps().exec_form(dockerfile["CMD"][-1])
    machines = []
    for run in docker_runs(section):
        args = run[run.index(image) + 1:]
        words = args or cmd  # no arguments: the image's CMD
        machines.append(words[words.index("--machine") + 1])
    assert sorted(machines) == ["bessy2", "mls"]
    for machine in machines:
        assert (ROOT / "startup" / f"{machine}.toml").is_file()


def test_the_entry_point_is_the_installed_command_serving_all_interfaces(dockerfile):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = load_steps().exec_form(dockerfile["ENTRYPOINT"][-1])
    assert entrypoint[0] in scripts
    assert entrypoint[entrypoint.index("--bind") + 1] == "0.0.0.0"


def test_slim_python_non_root_and_the_readmes_install_step(dockerfile, section):
    assert re.fullmatch(r"python:3\.(1[1-9])-slim", dockerfile["FROM"][0])
    assert dockerfile["USER"] and dockerfile["USER"][-1] not in ("root", "0")
    assert "make install" in dockerfile["RUN"]
    assert "`make install`" in section and re.search(r"^install:", (ROOT / "Makefile").read_text(), re.M)
    volume = dockerfile["VOLUME"][-1]
    assert f":{volume}`" in section


def test_the_health_check_reads_a_pv_both_machines_serve(dockerfile, section):
    health = dockerfile["HEALTHCHECK"][-1]
    command = shlex.split(health.split(" CMD ", 1)[1])
    assert "twinioc" in command and command[command.index("twinioc") + 1] == "get"
    pv = command[-1]
    for machine in ("bessy2", "mls"):
        config = Config.for_machine(machine)
        served = {row.pv for row in MachineTables(config.tables).pvs(config.prefix)}
        assert pv in served, (machine, pv)
    assert f"`{pv}`" in section
    options = dict(re.findall(r"--([\w-]+)=(\d+)s", health))
    assert f"every {options['interval']} s" in section and f"start period of {options['start-period']} s" in section
