"""pytest plugin: a running twin as a fixture, for tests of control-room code (hardware in the loop).

Installed with twinioc and registered as the ``pytest11`` entry point ``twinioc``, so that any test
suite in an environment where twinioc is installed gets these fixtures:

``twin``
    Function scope: a fresh twin for each test.
``twin_session``
    Session scope: one twin shared by the whole session.

Each twin runs as its own process on free loopback ports and is torn down afterwards. While it
runs, ``os.environ`` holds the CA and PVA client settings that reach it (and nothing else), so
pyepics, p4p, ``twinioc get`` and any other subprocess find it. pyepics contexts made before the
fixture are reset, so that ``epics.caget`` follows. A p4p ``Context``
reads the environment when it is made: make it inside the test, or use ``twin.pva_context()``.

Choosing the twin::

    @pytest.mark.twin(machine="mls", seed=3, set={"bpm.noise_um": 0})
    def test_something(twin): ...

    @pytest.mark.parametrize("twin", [{"machine": "bessy2"}, {"machine": "mls"}], indirect=True)
    def test_both(twin): ...

Markers on a module, class and function merge, the closest winning; an indirect parameter wins over
all of them. ``twin_session`` takes its settings from the command line (``--twin-machine``,
``--twin-seed``, ``--twin-ideal``) or the ini file (``twin_machine``, ``twin_seed``, ``twin_ideal``),
which are the defaults of ``twin`` too. For other scopes, wrap ``running_twin`` in a fixture::

    @pytest.fixture(scope="module")
    def mls(tmp_path_factory):
        with running_twin(machine="mls", state_dir=tmp_path_factory.mktemp("mls")) as twin:
            yield twin

The settings (``TwinSettings``): machine, seed, ideal, set (startup-file overrides, a mapping or
``"section.key=value"`` strings), optics, rate, faults (a scenario file), prefix, args (any other
``twinioc`` option) and timeout (seconds to wait until it serves).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from .testing import TwinProcess

LOG_TAIL_LINES = 40
_TWINS = pytest.StashKey[list]()  # the twins a test (item) or the session (config) started


@dataclasses.dataclass
class TwinSettings:
    machine: str = "bessy2"
    seed: int | None = None
    ideal: bool = False
    set: Mapping[str, object] | list[str] = dataclasses.field(default_factory=dict)
    optics: str | None = None
    rate: float | None = None
    faults: str | Path | None = None
    prefix: str = "TWIN:"
    args: list[str] = dataclasses.field(default_factory=list)
    timeout: float = 60.0

    def arguments(self) -> list[str]:
        """The ``twinioc`` options of these settings, but for machine, seed, prefix and state dir."""
        overrides = self.set.items() if isinstance(self.set, Mapping) else (item.split("=", 1) for item in self.set)
        args = [f"--set={key}={_toml(value)}" for key, value in overrides]
        if self.ideal:
            args.append("--ideal")
        if self.optics:
            args += ["--optics", self.optics]
        if self.rate is not None:
            args += ["--rate", str(self.rate)]
        if self.faults:
            args += ["--faults", str(self.faults)]
        return args + [str(arg) for arg in self.args]


def _toml(value: object) -> str:
    """A value as the right-hand side of ``--set`` reads it (TOML): booleans lower case."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


class _ClientEnvironment:
    """Points this process's EPICS clients at one twin, and back again afterwards."""

    def __init__(self, values: dict[str, str]):
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        self.saved = {name: os.environ.get(name) for name in self.values}
        os.environ.update(self.values)
        _reset_pyepics()

    def __exit__(self, *exc) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reset_pyepics()


def _reset_pyepics() -> None:
    """A new pyepics context, which reads the EPICS environment afresh (libca reads it when the
    context first searches). Only if pyepics is in use: nothing is imported for it here."""
    ca = sys.modules.get("epics.ca")
    if ca is not None and ca.libca is not None:
        ca.clear_cache()


@contextmanager
def running_twin(settings: TwinSettings | None = None, *, state_dir: Path | None = None,
                 **options) -> Iterator[TwinProcess]:
    """Start a twin, point this process's EPICS clients at it, and stop it afterwards.

    *options* are ``TwinSettings`` fields, applied over *settings*. The twin handed out has
    ``machine``, ``seed``, ``prefix``, ``env`` (the client settings), ``pv(name)`` (a twin-only
    name under the prefix), ``pva_context()``, ``state_dir`` and ``log()``.
    """
    settings = dataclasses.replace(settings or TwinSettings(), **options)
    twin = TwinProcess(settings.machine, *settings.arguments(), state_dir=state_dir, prefix=settings.prefix,
                       timeout=settings.timeout, seed=settings.seed)
    try:
        twin.start()
        with _ClientEnvironment(twin.client_env):
            yield twin
        if twin.process.poll() is not None:
            raise RuntimeError(f"the {settings.machine} twin exited with {twin.process.returncode} during the "
                               f"test:\n{_tail(twin.log())}")
    finally:
        twin.stop()


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("twinioc", "twinioc: a running twin as a fixture")
    group.addoption("--twin-machine", help="machine of the twin fixtures (default bessy2)")
    group.addoption("--twin-seed", type=int, help="seed of the twin fixtures (default: the startup file's)")
    group.addoption("--twin-ideal", action="store_true", default=None,
                    help="twins without imperfections (no noise, errors, ramps, decay)")
    parser.addini("twin_machine", "machine of the twin fixtures", default="bessy2")
    parser.addini("twin_seed", "seed of the twin fixtures", default="")
    parser.addini("twin_ideal", "twins without imperfections", type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "twin(**settings): settings of the `twin` fixture's twin: machine, seed, "
                                       "ideal, set, optics, rate, faults, prefix, args, timeout")


def _defaults(config: pytest.Config) -> TwinSettings:
    seed = config.getoption("twin_seed")
    if seed is None and config.getini("twin_seed"):
        seed = int(config.getini("twin_seed"))
    ideal = config.getoption("twin_ideal")
    return TwinSettings(machine=config.getoption("twin_machine") or config.getini("twin_machine"), seed=seed,
                        ideal=config.getini("twin_ideal") if ideal is None else ideal)


def _settings(request: pytest.FixtureRequest) -> TwinSettings:
    options: dict = {}
    for marker in reversed(list(request.node.iter_markers("twin"))):  # farthest first: the closest wins
        options.update(marker.kwargs)
    options.update(getattr(request, "param", None) or {})
    try:
        return dataclasses.replace(_defaults(request.config), **options)
    except TypeError as err:
        raise pytest.UsageError(f"twin settings: {err}; known: "
                                f"{', '.join(f.name for f in dataclasses.fields(TwinSettings))}") from None


@pytest.fixture
def twin(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwinProcess]:
    """A twin of its own for this test, chosen by ``@pytest.mark.twin(...)`` or an indirect parameter."""
    settings = _settings(request)
    with running_twin(settings, state_dir=tmp_path_factory.mktemp(f"twin-{settings.machine}")) as running:
        request.node.stash[_TWINS] = [*request.node.stash.get(_TWINS, []), running]
        yield running


@pytest.fixture(scope="session")
def twin_session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwinProcess]:
    """One twin for the whole session, chosen by ``--twin-machine`` / ``--twin-seed`` / ``--twin-ideal``."""
    settings = _defaults(request.config)
    with running_twin(settings, state_dir=tmp_path_factory.mktemp(f"twin-session-{settings.machine}")) as running:
        request.config.stash[_TWINS] = [running]
        yield running


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test's report carries the end of each twin's log it used."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        twins = item.stash.get(_TWINS, []) + (item.config.stash.get(_TWINS, [])
                                              if "twin_session" in getattr(item, "fixturenames", ()) else [])
        for running in twins:
            report.sections.append((f"twinioc log ({running.machine}, {running.state_dir})", _tail(running.log())))
