"""The pytest plugin, used the way a downstream project uses it: pytest runs in a folder of its own,
with no conftest of ours and no EPICS settings, and finds the fixtures through the entry point."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECKS = '''
import os

import epics
import pytest


@pytest.mark.twin(machine="mls", ideal=True)
class TestMarkers:
    @pytest.mark.twin(seed=17)
    def test_class_and_function_markers_merge(self, twin):
        assert (twin.machine, twin.seed) == ("mls", 17)
        assert epics.caget(twin.pv("SEED"), timeout=5) == 17
        assert os.environ["EPICS_CA_ADDR_LIST"] == f"127.0.0.1:{twin.ca_port}"
        pytest.twin_env = dict(twin.env)

    def test_the_environment_is_restored_after_a_twin(self):
        assert "EPICS_CA_ADDR_LIST" not in os.environ
        assert "EPICS_PVA_ADDR_LIST" not in os.environ


def test_session_options_choose_the_session_twin(twin_session):
    assert twin_session.machine == "mls"
    assert epics.caget(twin_session.pv("SEED"), timeout=5) == 11


@pytest.fixture(scope="module")
def module_twin(tmp_path_factory):
    from twinioc.ioc.pytest_plugin import running_twin

    with running_twin(machine="mls", ideal=True, prefix="MOD:", state_dir=tmp_path_factory.mktemp("m")) as twin:
        yield twin


def test_running_twin_serves_a_fixture_of_another_scope(module_twin):
    assert epics.caget("MOD:SEED", timeout=5) is not None
    assert os.environ["EPICS_CA_ADDR_LIST"] == f"127.0.0.1:{module_twin.ca_port}"


@pytest.mark.twin(machine="mls", ideal=True, seed=3)
def test_a_failing_test_shows_the_twin_log(twin):
    assert epics.caget(twin.pv("SEED"), timeout=5) == -1


@pytest.mark.twin(machine="mls", colour="red")
def test_an_unknown_setting_is_an_error(twin):
    pass
'''


def run_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                           "--basetemp", str(folder / "tmp"), *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)


def no_twin_left(folder: Path) -> None:
    running = subprocess.run(["pgrep", "-f", str(folder / "tmp")], capture_output=True, text=True).stdout
    assert not running.strip(), f"twins still running after pytest ended: {running}"


def readme_example() -> str:
    """The Python block of the README's section on the plugin."""
    section = (ROOT / "README.md").read_text().split("## In CI: the pytest plugin", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_downstream_examples_pass_with_the_fixtures_alone(tmp_path):
    shutil.copy(ROOT / "examples" / "ci" / "test_control_room.py", tmp_path)
    (tmp_path / "test_readme_example.py").write_text(readme_example())
    done = run_pytest(tmp_path, "test_control_room.py", "test_readme_example.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b9 passed\b", done.stdout), done.stdout
    no_twin_left(tmp_path)


def test_markers_options_environment_and_failure_reports(tmp_path):
    (tmp_path / "test_checks.py").write_text(CHECKS)
    done = run_pytest(tmp_path, "--twin-machine", "mls", "--twin-seed", "11")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    for passed in ("test_class_and_function_markers_merge", "test_the_environment_is_restored_after_a_twin",
                   "test_session_options_choose_the_session_twin",
                   "test_running_twin_serves_a_fixture_of_another_scope"):
        assert re.search(rf"^PASSED .*{passed}", out, re.M), out
    assert re.search(r"^FAILED .*test_a_failing_test_shows_the_twin_log", out, re.M), out
    assert re.search(r"twinioc log \(mls, .*\)", out) and "iocRun: All initialization complete" in out, out
    assert re.search(r"^ERROR .*test_an_unknown_setting_is_an_error", out, re.M), out
    assert "twin settings: " in out and "'colour'" in out, out
    no_twin_left(tmp_path)
