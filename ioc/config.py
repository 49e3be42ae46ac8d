"""Startup configuration: one TOML file per machine in ``startup/``."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
STARTUP = PACKAGE.parent / "startup"
DB = PACKAGE.parent / "db"


@dataclass
class Config:
    name: str  # short name: the startup file's stem
    machine: str
    tables: Path
    prefix: str = "TWIN:"
    rate_hz: float = 10.0
    beam_current_mA: float = 300.0
    lifetime_h: float = 8.0
    bind: str = "127.0.0.1"
    autosave_period_s: float = 2.0

    @classmethod
    def load(cls, path: Path) -> Config:
        path = Path(path)
        data = tomllib.loads(path.read_text())
        tables = Path(data["tables"])
        return cls(
            name=path.stem,
            machine=data.get("machine", path.stem),
            tables=tables if tables.is_absolute() else DB / tables,
            prefix=data.get("prefix", "TWIN:"),
            rate_hz=float(data.get("rate_hz", 10.0)),
            beam_current_mA=float(data.get("beam", {}).get("current_mA", 300.0)),
            lifetime_h=float(data.get("beam", {}).get("lifetime_h", 8.0)),
            bind=data.get("network", {}).get("bind", "127.0.0.1"),
            autosave_period_s=float(data.get("autosave", {}).get("period_s", 2.0)),
        )

    @classmethod
    def for_machine(cls, name: str) -> Config:
        path = STARTUP / f"{name}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in STARTUP.glob("*.toml")))
            raise SystemExit(f"twinioc: no machine {name!r} (known: {known})")
        return cls.load(path)
