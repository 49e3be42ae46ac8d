from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DB = ROOT / "db"
REFERENCE = ROOT.parent / "shared" / "reference"
# The MLS twin of the test session carries its own prefix: both twins serve the twin-only names,
# and one client reaches both.
MLS_PREFIX = "TWIN:MLS:"


@pytest.fixture
def reference() -> Path:
    """The public reference files, where this checkout has them beside it."""
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is not beside this checkout")
    return REFERENCE


@pytest.fixture
def bessy2():
    from twinioc.model import Engine

    return Engine.from_folder(DB / "bessy2")


@pytest.fixture
def mls():
    from twinioc.model import Engine

    return Engine.from_folder(DB / "mls")


@pytest.fixture(scope="session")
def twins(tmp_path_factory):
    """An ideal BESSY II and an ideal MLS twin, side by side on free loopback ports, for the session.

    Both start at once; the client environment (CA and PVA) reaches both of them. Ideal: the tests
    that use them compare with the exact model; the realism tests start twins of their own.
    """
    import os

    from twinioc.ioc.testing import TwinProcess, client_env

    both = {"bessy2": TwinProcess("bessy2", "--ideal", state_dir=tmp_path_factory.mktemp("bessy2")),
            "mls": TwinProcess("mls", "--ideal", state_dir=tmp_path_factory.mktemp("mls"), prefix=MLS_PREFIX)}
    try:
        for twin in both.values():
            twin.launch()
        for twin in both.values():
            twin.wait_ready()
        os.environ.update(client_env(*both.values()))
        yield both
    finally:
        for twin in both.values():
            twin.stop()
    for twin in both.values():
        assert "Traceback" not in twin.log(), twin.log()


@pytest.fixture(scope="module")
def mls_web(twins, tmp_path_factory):
    """``twinioc web`` on the session's MLS twin, one per test module (its records its own)."""
    from web import WebProcess, epics_env

    with WebProcess("mls", epics_env(), tmp_path_factory.mktemp("mls-web"), MLS_PREFIX) as web:
        yield web
    assert "Traceback" not in web.log(), web.log()


@pytest.fixture(scope="module")
def bessy2_web(twins, tmp_path_factory):
    from web import WebProcess, epics_env

    with WebProcess("bessy2", epics_env(), tmp_path_factory.mktemp("bessy2-web")) as web:
        yield web
    assert "Traceback" not in web.log(), web.log()


@pytest.fixture(scope="session")
def bessy2_ioc(twins):
    return twins["bessy2"]


@pytest.fixture(scope="session")
def mls_ioc(twins):
    return twins["mls"]


@pytest.fixture(scope="session")
def pva(twins):
    from p4p.client.thread import Context
    from twinioc.ioc.testing import pva_conf

    context = Context("pva", conf=pva_conf(*twins.values()), useenv=False)
    yield context
    context.close()
