from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DB = ROOT / "db"
REFERENCE = ROOT.parent / "shared" / "reference"


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


@pytest.fixture(scope="session")
def bessy2_ioc(tmp_path_factory):
    """A BESSY II twin on free loopback ports for the whole session; the client env points at it."""
    import os

    from twinioc.ioc.testing import TwinProcess

    twin = TwinProcess("bessy2", state_dir=tmp_path_factory.mktemp("bessy2"))
    twin.start()
    os.environ.update(twin.client_env)
    yield twin
    twin.stop()
    assert "Traceback" not in twin.log(), twin.log()


@pytest.fixture(scope="session")
def pva(bessy2_ioc):
    from p4p.client.thread import Context

    context = Context("pva", conf=bessy2_ioc.pva_conf, useenv=False)
    yield context
    context.close()
