"""Pure physics of the twin: lattices, device maps and the engine. No EPICS in here."""

from .devices import DeviceMap, PowerConverter, SettingError
from .engine import BeamState, Change, Engine

__all__ = ["BeamState", "Change", "DeviceMap", "Engine", "PowerConverter", "SettingError"]
