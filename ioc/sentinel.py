"""Never shadow the real machine: before serving, ask whether anyone already answers its PV names.

The twin carries the real machine's PV names. Before its servers start, it sends Channel Access
name searches for a few sentinel names to the addresses its configuration points CA at
(``EPICS_CA_ADDR_LIST``, and the broadcast address when ``EPICS_CA_AUTO_ADDR_LIST`` is not NO), on
its CA server port, and listens briefly for replies. A reply means another server (the real
machine, or another twin) serves those names there, and the twin refuses to start.

This is a bare CA search over UDP (the protocol's version and search messages), so that the IOC's
process needs no CA client library of its own before ``iocInit``. The same names are then asked
for over PV Access (p4p's client, which shares the IOC's pvxs library), on the UDP port the twin's
PVA server will take searches on.
"""

from __future__ import annotations

import os
import socket
import struct
import time

VERSION, SEARCH = 0, 6
MINOR_VERSION = 13
DONT_REPLY = 5  # servers that lack the name stay silent


def _message(command: int, payload: bytes = b"", data_type: int = 0, count: int = 0, p1: int = 0, p2: int = 0) -> bytes:
    padded = payload + b"\0" * (-len(payload) % 8)
    return struct.pack(">HHHHII", command, len(padded), data_type, count, p1, p2) + padded


def search_addresses(environ: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """Where a CA client configured by *environ* (default: this process's) sends its searches."""
    env = os.environ if environ is None else environ
    port = int(env.get("EPICS_CA_SERVER_PORT", "5064"))
    addresses = []
    for entry in env.get("EPICS_CA_ADDR_LIST", "").split():
        host, _, entry_port = entry.partition(":")
        addresses.append((host, int(entry_port) if entry_port else port))
    if env.get("EPICS_CA_AUTO_ADDR_LIST", "YES").upper() != "NO":
        addresses.append(("255.255.255.255", port))
    return addresses


def answered(names: list[str], addresses: list[tuple[str, int]], timeout: float = 0.5) -> dict[str, str]:
    """The *names* that some server at *addresses* answers, with the answering address."""
    if not names or not addresses:
        return {}
    datagram = _message(VERSION, count=MINOR_VERSION) + b"".join(
        _message(SEARCH, name.encode() + b"\0", DONT_REPLY, MINOR_VERSION, i, i) for i, name in enumerate(names))
    found: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        udp.bind(("", 0))
        for address in addresses:
            try:
                udp.sendto(datagram, address)
            except OSError:
                continue  # unreachable: nobody there to answer
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and len(found) < len(names):
            udp.settimeout(left)
            try:
                reply, (host, port) = udp.recvfrom(4096)
            except (TimeoutError, OSError):
                break
            while len(reply) >= 16:
                command, size, _, _, _, search_id = struct.unpack(">HHHHII", reply[:16])
                if command == SEARCH and search_id < len(names):
                    found[names[search_id]] = f"{host}:{port}"
                reply = reply[16 + size:]
    return found


def pva_answered(names: list[str], timeout: float = 0.5, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The *names* that a PVA server answers where the twin's PVA server is to listen: the broadcast
    port it is configured for (``EPICS_PVAS_BROADCAST_PORT``), at the addresses PVA searches go to
    (``EPICS_PVA_ADDR_LIST``, or else those of CA)."""
    if not names:
        return {}
    from p4p.client.thread import Context

    env = os.environ if environ is None else environ
    port = env.get("EPICS_PVAS_BROADCAST_PORT") or env.get("EPICS_PVA_BROADCAST_PORT", "5076")
    hosts = env.get("EPICS_PVA_ADDR_LIST") or " ".join(
        host for host, _ in search_addresses(env) if host != "255.255.255.255")
    auto = env.get("EPICS_PVA_AUTO_ADDR_LIST", env.get("EPICS_CA_AUTO_ADDR_LIST", "YES"))
    context = Context("pva", conf={"EPICS_PVA_ADDR_LIST": hosts, "EPICS_PVA_AUTO_ADDR_LIST": auto,
                                   "EPICS_PVA_BROADCAST_PORT": port}, useenv=False)
    try:
        values = context.get(names, timeout=timeout, throw=False)
    finally:
        context.close()
    return {name: f"PVA port {port}" for name, value in zip(names, values, strict=True)
            if not isinstance(value, Exception)}
