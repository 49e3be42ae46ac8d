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
