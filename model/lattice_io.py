"""The project's lattice format: plain JSON, one element per line, pyAT attribute names.

A file holds the ring's global parameters and its elements in order::

    {"name": "BESSY II", "energy": 1.7185e9, "harmonic_number": 400, "periodicity": 1,
     "source": "...", "elements": [
      {"Class": "Drift", "FamName": "D1", "Length": 0.56, "PassMethod": "DriftPass"},
      ...]}

Only plain physics attributes are kept (numbers, strings, short arrays as lists), so that the file
diffs line by line and reads without pyAT.
"""

from __future__ import annotations

import json
from pathlib import Path

import at
import numpy as np
from at.load.utils import element_from_dict

# Attributes that pyAT derives or that belong to the ring, not to an element.
_SKIPPED = {"Energy", "_enable_passmethod", "_disable_passmethod"}


def _plain(value: object) -> object:
    if isinstance(value, np.ndarray):
        return [float(v) for v in value.ravel()] if value.ndim == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def element_record(element: at.Element) -> dict:
    record = {"Class": type(element).__name__, "FamName": element.FamName}
    for key, value in element.__dict__.items():
        if key not in _SKIPPED and key != "FamName":
            record[key] = _plain(value)
    return record


def write_lattice(ring: at.Lattice, path: Path, source: str = "") -> None:
    """Write *ring* in the project's format."""
    header = {
        "name": ring.name,
        "energy": float(ring.energy),
        "harmonic_number": int(ring.harmonic_number),
        "periodicity": int(ring.periodicity),
        "particle": ring.particle.name,
        "source": source,
    }
    lines = [json.dumps(element_record(e), separators=(", ", ": ")) for e in ring]
    text = json.dumps(header)[:-1] + ', "elements": [\n' + ",\n".join(lines) + "\n]}\n"
    Path(path).write_text(text)


def load_lattice(path: Path) -> at.Lattice:
    """Load a lattice in the project's format as a pyAT ``Lattice``."""
    data = json.loads(Path(path).read_text())
    elements = []
    for record in data["elements"]:
        attrs = {k: np.asarray(v, dtype=float) if isinstance(v, list) else v for k, v in record.items()}
        if attrs["Class"] == "RFCavity":  # pyAT's constructor wants it; the ring's energy is meant
            attrs["Energy"] = data["energy"]
        elements.append(element_from_dict(attrs, quiet=True))
    return at.Lattice(
        elements,
        name=data["name"],
        energy=data["energy"],
        periodicity=data["periodicity"],
        particle=data.get("particle", "relativistic"),
        harmonic_number=data["harmonic_number"],
    )
