"""The measurements as queryable records: one row each in ``measurements.sqlite`` of the state folder.

A record holds what the API shows (id, kind, status, progress, params, result, error), what a
physicist needs to trust it (raw data, provenance, the devices it moved, the Bluesky run's uid), and
while it runs the setpoints to put back, so that a service that died during a plan can restore them
when it starts again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

JSON_FIELDS = ("params", "result", "raw", "provenance", "devices", "restore")
COLUMNS = ("id", "kind", "status", "progress", "error", "created", "started", "finished", "run_uid") + JSON_FIELDS


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class MeasurementRecords:
    """The measurement records of one state folder (SQLite, safe to use from several threads)."""

    def __init__(self, state_dir: Path):
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(Path(state_dir) / "measurements.sqlite", check_same_thread=False,
                                   isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS measurements (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, "
                "kind TEXT, status TEXT, progress REAL, error TEXT, created TEXT, started TEXT, finished TEXT, "
                "run_uid TEXT, params TEXT, result TEXT, raw TEXT, provenance TEXT, devices TEXT, restore TEXT)")
            self._db.execute("CREATE INDEX IF NOT EXISTS by_kind ON measurements (kind, created)")

    def create(self, kind: str, params: dict, devices: list[str]) -> dict:
        record = {"id": uuid.uuid4().hex[:12], "kind": kind, "status": "queued", "progress": 0.0, "error": None,
                  "created": now(), "started": None, "finished": None, "run_uid": None, "params": params,
                  "result": None, "raw": None, "provenance": None, "devices": devices, "restore": None}
        with self._lock:
            marks = ", ".join("?" * len(COLUMNS))
            self._db.execute(f"INSERT INTO measurements ({', '.join(COLUMNS)}) VALUES ({marks})",
                             [self._cell(c, record[c]) for c in COLUMNS])
        return record

    @staticmethod
    def _cell(column: str, value):
        return json.dumps(value, allow_nan=False) if column in JSON_FIELDS else value

    def update(self, id: str, **fields) -> None:
        unknown = set(fields) - set(COLUMNS)
        if unknown:
            raise KeyError(f"no fields {sorted(unknown)}")
        with self._lock:
            self._db.execute(f"UPDATE measurements SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                             [*(self._cell(k, v) for k, v in fields.items()), id])

    def _rows(self, where: str, args: list) -> list[dict]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM measurements {where} ORDER BY seq", args)
            rows = rows.fetchall()
        return [{c: (json.loads(v) if c in JSON_FIELDS and v is not None else v) for c, v in zip(COLUMNS, row,
                                                                                                   strict=True)}
                for row in rows]

    def get(self, id: str) -> dict:
        found = self._rows("WHERE id = ?", [id])
        if not found:
            raise KeyError(id)
        return found[0]

    def list(self, kind: str | None = None, since: str | None = None, status: str | None = None,
             device: str | None = None) -> list[dict]:
        """The records of a *kind*, created *since* (ISO, UTC), of a *status*, that set a *device*."""
        clauses, args = [], []
        for column, op, value in (("kind", "=", kind), ("created", ">=", since), ("status", "=", status),
                                  ("devices", "LIKE", None if device is None else f'%{json.dumps(device)}%')):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                args.append(value)
        return self._rows(f"WHERE {' AND '.join(clauses)}" if clauses else "", args)

    def close(self) -> None:
        with self._lock:
            self._db.close()
