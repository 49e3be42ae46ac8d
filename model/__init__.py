"""Pure physics of the twin: lattices, device maps and the engine. No EPICS in here.

Names are imported lazily, so that ``twinioc.model.state`` and ``twinioc.model.tables`` can be used
(by the IOC process) without loading pyAT.
"""

from importlib import import_module

_HOMES = {"BeamState": "state", "Change": "state", "DeviceMap": "devices", "PowerConverter": "devices",
          "SettingError": "devices", "Engine": "engine"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
