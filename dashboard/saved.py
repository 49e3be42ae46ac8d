"""Saved states of the machine, for "now against then": the orbit, tunes, current and RF by name.

``SavedStates`` owns one JSON file in the service's state folder. Saving reads nothing and puts
nothing: it keeps what the live feed showed at that moment, so it works on a twin and on the
machine alike (a twin's own ``SNAPSHOT:SAVE`` keeps its settings; this keeps what was seen).
"""

from __future__ import annotations

import json
import re
import threading
from datetime import UTC, datetime
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,40}$")


class SavedStates:
    """Named states in ``<state_dir>/dashboard/saved-states.json``."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "dashboard" / "saved-states.json"
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except ValueError:  # a damaged file: keep it aside, start again
            self.path.rename(self.path.with_suffix(".damaged"))
            return {}

    def names(self) -> list[str]:
        with self._lock:
            states = self._read()
        return sorted(states, key=lambda n: states[n]["saved"], reverse=True)

    def get(self, name: str) -> dict | None:
        with self._lock:
            return self._read().get(name)

    def save(self, name: str, state: dict) -> dict:
        """Keep *state* (plain numbers and lists) under *name*; ``ValueError`` for a bad name."""
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError("a name is 1 to 40 letters, digits or _ . : -")
        saved = dict(state) | {"saved": datetime.now(UTC).isoformat(timespec="seconds")}
        with self._lock:
            states = self._read()
            states[name] = saved
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(states))
            partial.replace(self.path)
        return saved
