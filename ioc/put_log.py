"""The put log: the one writer of the journal's entries for puts.

Every put on any of the twin's PVs, accepted or refused, becomes one entry, written and flushed
before the put completes (``journal.py`` says what an entry holds). The lattice version that first
carried a setpoint is not known then: the physics worker reports it later, and the lattice journal's
line of that version lists the puts it carries (``puts``), which ``journal.entries`` joins back.
"""

from __future__ import annotations

from collections.abc import Callable

from .journal import Journal

# Who made an entry: a client's CA or PVA put, the twin's orbit feedback, a start in operation, a
# journal replay (``twinioc replay`` onto a twin), a snapshot restore, an optics mode loaded.
CLIENT, FEEDBACK, START, REPLAY, SNAPSHOT, OPTICS = "client", "orbit feedback", "start", "replay", "snapshot", "optics"
SOURCES = (CLIENT, FEEDBACK, START, REPLAY, SNAPSHOT, OPTICS)


class PutLog:
    """Writes put entries into *journal*; remembers the last accepted value of each PV, which is the
    ``old`` value of the next put on it where the record itself cannot say (commands, controls)."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self._held: dict[str, object] = {}

    @property
    def seq(self) -> int:
        """The number of the last entry."""
        return self.journal.seq

    def hold(self, pv: str, value: object) -> None:
        """*pv* holds *value* now without a put (set at start, or by a snapshot)."""
        self._held[pv] = value

    def accepted(self, command: str, pv: str, new: object, *, device: str = "", old: object = None,
                 detail: str = "", source: str = CLIENT, **extra) -> int:
        """An accepted put; *old*: the value before, if the caller knows it better; *source*: who
        made it (``SOURCES``). Returns its seq."""
        before = self._held.get(pv) if old is None else old
        self._held[pv] = new
        return self._write(command, pv, device, before, new, "accepted", detail, source, extra)

    def refused(self, command: str, pv: str, new: object, reason: str, *, device: str = "",
                old: object = None, source: str = CLIENT) -> int:
        """A refused put, with the reason; the PV keeps what it held."""
        return self._write(command, pv, device, self._held.get(pv) if old is None else old, new, "refused",
                           reason, source, {})

    def _write(self, command: str, pv: str, device: str, old: object, new: object, outcome: str, detail: str,
               source: str, extra: dict) -> int:
        if source not in SOURCES:
            raise ValueError(f"unknown journal source {source!r}")
        entry = {"command": command, "pv": pv, "device": device, "old": old, "new": new, "outcome": outcome,
                 "detail": detail, "source": source, **extra}
        return self.journal.append(entry)["seq"]


CommandCallbacks = tuple[Callable[[object, str], bool], Callable[[str], None]]


def command_callbacks(put_log: PutLog, result: Callable[[str], str], command: str, pv: str,
                      check: Callable[[str], object], run: Callable[[str], str | None],
                      errors: tuple[type[Exception], ...]) -> CommandCallbacks:
    """The two callbacks of a command record (``records.command``): the first refuses a bad command
    at once (*check* raises one of *errors*: the put fails, the result PV and the journal say why);
    the second carries out a good one with *run*, which returns what it did for the journal (None:
    it wrote its own entry). A command that fails after all (a file gone meanwhile) is journaled as
    refused."""
    def refuse_bad(record, text: str) -> bool:
        try:
            check(text)
        except errors as err:
            result(f"refused {text!r}: {err}")
            put_log.refused(command, pv, text, str(err), old=record.get())
            return False
        return True

    def on_command(text: str) -> None:
        try:
            detail = run(text)
        except errors as err:
            result(f"failed: {err}")
            put_log.refused(command, pv, text, str(err))
            return
        if detail is not None:
            put_log.accepted(command, pv, text, detail=detail)

    return refuse_bad, on_command
