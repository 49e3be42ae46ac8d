"""The twin's journals: one JSON line per entry, flushed as it is written, rotated by size.

``journal.jsonl`` has one line per put (accepted or refused) on any of the twin's PVs::

    {"seq": 17, "time": "2026-11-21T10:00:00.123+00:00", "command": "set", "pv": "HS4P1D1R:set",
     "device": "HS4P1D1R", "old": 0.0, "new": 0.1, "outcome": "accepted", "detail": ""}

``command`` is ``set`` (a setpoint), ``power``, ``control``, ``optics``, ``fault``, ``snapshot``;
entries that set many setpoints at once (an optics mode, a snapshot restore) list them under
``setpoints``. ``lattice.jsonl`` has one line per lattice version, as the physics worker reported
it: the converter outputs that batch applied and the puts (``seq``) whose values it was the first to
carry, so that a reading (which carries its version) can be tied to the settings and the puts behind
it; and one line per equilibrium published, with its version and its figures (the start line holds
the settings it is computed with). ``entries`` gives each put its ``lattice_version`` from there
(None: no version carried it yet, e.g. a dropped command).

A line is written before the put completes, and flushed: it survives ``kill -9`` of the IOC. At
start-up the twin replays the setpoints journaled after the last autosave over the autosaved ones
(``setpoints_since``), so nothing acknowledged is lost.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

PUTS, LATTICE = "journal.jsonl", "lattice.jsonl"  # the two journals of a state folder


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _plain(value: object) -> object:
    """JSON has no NaN or infinity: those are written as strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Journal:
    """Append-only JSON lines in *path*; past *max_bytes* the file becomes ``<stem>.1<suffix>`` and
    the older ones move up, keeping *keep* of them. ``seq`` goes on from the newest existing line."""

    def __init__(self, path: Path, max_bytes: int = 20_000_000, keep: int = 5):
        self.path = Path(path)
        self.max_bytes = max(int(max_bytes), 1)
        self.keep = max(int(keep), 0)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last = _last_line(self.path)
        self.seq = int(last["seq"]) if last else 0
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def append(self, entry: dict) -> dict:
        """Write *entry* with the next ``seq`` and the time; return it as written."""
        with self._lock:
            self.seq += 1
            entry = {"seq": self.seq, "time": now_iso(), **{k: _plain(v) for k, v in entry.items()}}
            self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self._file.flush()
            if self._file.tell() >= self.max_bytes:
                self._rotate()
        return entry

    def _rotate(self) -> None:
        self._file.close()
        files = rotated(self.path)
        for index in range(len(files), 0, -1):
            older = files[index - 1]
            if index >= self.keep:
                older.unlink()
            else:
                older.rename(_numbered(self.path, index + 1))
        if self.keep:
            self.path.rename(_numbered(self.path, 1))
        else:
            self.path.unlink()
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _numbered(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}.{index}{path.suffix}")


def rotated(path: Path) -> list[Path]:
    """The rotated files of the journal *path*, newest first (``.1``, ``.2``, ...)."""
    pattern = re.compile(rf"{re.escape(path.stem)}\.(\d+){re.escape(path.suffix)}$")
    found = {int(m.group(1)): p for p in path.parent.glob(f"{path.stem}.*{path.suffix}")
             if (m := pattern.match(p.name))}
    return [found[i] for i in sorted(found)]


def files(path: Path) -> list[Path]:
    """Every file of the journal *path*, oldest first; a journal file itself, or a folder holding
    ``journal.jsonl`` (the twin's state folder)."""
    path = Path(path)
    return _with_rotated(path / PUTS) if path.is_dir() else [path]


def _with_rotated(path: Path) -> list[Path]:
    return [*reversed(rotated(path)), *([path] if path.exists() else [])]


def _last_line(path: Path) -> dict | None:
    for candidate in [path, *rotated(path)]:
        if candidate.exists() and candidate.stat().st_size:
            with candidate.open("rb") as f:
                f.seek(max(0, candidate.stat().st_size - 65536))
                lines = f.read().splitlines()
            for line in reversed(lines):
                try:
                    return json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
    return None


def entries(path: Path, since: datetime | None = None, until: datetime | None = None,
            versions: bool = True) -> Iterator[dict]:
    """The journal's entries, oldest first, within [*since*, *until*]; lines cut by a crash are
    skipped. Files last written before *since* are not read at all. *versions*: give each put the
    lattice version that first carried it, from the lattice journal beside the put journal."""
    carried = _carried(path, since) if versions else {}
    for entry in _lines(files(path), since, until):
        if "outcome" in entry:
            entry.setdefault("lattice_version", carried.get(entry["seq"]))
        yield entry


def _lines(names: list[Path], since: datetime | None, until: datetime | None) -> Iterator[dict]:
    for name in names:
        if since and datetime.fromtimestamp(name.stat().st_mtime, UTC) < since:
            continue
        with name.open(encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                when = datetime.fromisoformat(entry["time"])
                if (since and when < since) or (until and when > until):
                    continue
                yield entry


def _carried(path: Path, since: datetime | None) -> dict[int, int]:
    """Put seq -> the first lattice version that carried it, from the lattice journal beside *path*."""
    path = Path(path)
    lattice = path / LATTICE if path.is_dir() else path.with_name(LATTICE)
    if path.name == LATTICE:
        return {}
    carried: dict[int, int] = {}
    for entry in _lines(_with_rotated(lattice), since, None):
        for seq in entry.get("puts", ()):
            carried.setdefault(seq, entry["version"])
    return carried


def setpoint_changes(journal: Iterable[dict]) -> Iterator[tuple[dict, str, float]]:
    """(entry, device, value) for every setpoint an accepted entry left, in journal order."""
    for entry in journal:
        if entry.get("outcome") != "accepted":
            continue
        if entry.get("command") == "set":
            yield entry, entry["device"], float(entry["new"])
        for device, value in entry.get("setpoints", {}).items():
            yield entry, device, float(value)


def setpoints_since(folder: Path, since: datetime | None) -> tuple[dict[str, float], int]:
    """The last journaled value of each setpoint changed since *since* (all, if None), and how many
    entries that took."""
    last, count = {}, 0
    for _, device, value in setpoint_changes(entries(folder, since, versions=False)):
        last[device] = value
        count += 1
    return last, count


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC if no zone is given), or a time back from now: ``90s``, ``10m``, ``2h``, ``1d``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match:
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)
