"""The REST API of the measurement service (FastAPI; OpenAPI at ``/docs``).

    GET    /api/machine                 machine, counts
    GET    /api/machine/devices         converters: kind, unit, limits, magnets, PVs
    GET    /api/machine/lattice         elements: name, family, kind, s, length, strengths
    GET    /api/state                   orbit (mm) with BPM names, tunes, current; on a twin its lattice version
    POST   /api/measurements            {"kind": ..., parameters} -> 202 {"id": ...}
    GET    /api/measurements?kind=&since=&status=&device=
    GET    /api/measurements/{id}       id, kind, status, progress, params, result, error (+ provenance, raw)
    DELETE /api/measurements/{id}       cancel: a queued one never runs, a running one puts its setpoints back
    GET    /api/measurements/{id}/run   the Bluesky run's documents and data, from the tiled catalog
    GET    /                            the dashboard (``twinioc.dashboard``), mounted by ``twinioc web``

A request that changes anything (POST, DELETE) needs the token when the service has one (``--token``
or ``TWINIOC_WEB_TOKEN``), as ``Authorization: Bearer <token>``; off loopback it must have one.
"""

from __future__ import annotations

import hmac
import json
from datetime import UTC, datetime
from functools import cache

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from twinioc.model.lattice_io import load_lattice

from .analysis import plain
from .requests import KINDS, RequestError
from .service import MeasurementService

PUBLIC_FIELDS = ("id", "kind", "status", "progress", "params", "result", "error", "created", "started", "finished",
                 "provenance", "devices", "run_uid")
STRENGTHS = ("K", "H", "PolynomB", "KickAngle", "BendingAngle", "Voltage", "Frequency")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def public(record: dict, raw: bool = True) -> dict:
    shown = {k: record[k] for k in PUBLIC_FIELDS}
    if raw:
        shown["raw"] = record["raw"]
    return shown


def token_accepted(token: str | None, given: str | None) -> bool:
    """Whether a change may be made: no token set, or *given* is it (compared in constant time)."""
    return not token or hmac.compare_digest((given or "").encode(), token.encode())


def create_app(service: MeasurementService, token: str | None = None) -> FastAPI:
    layout = service.layout
    app = FastAPI(title=f"twinioc measurements: {layout.name}", version="1",
                  description="Measurements (Bluesky plans) on a storage ring or its twin, over EPICS.")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # the API's changes; the dashboard's own requests (its callbacks) pass, and its form that
        # starts a measurement asks for the token itself
        if token and request.url.path.startswith("/api/") and request.method not in ("GET", "HEAD", "OPTIONS"):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme != "Bearer" or not token_accepted(token, given):
                return error(401, "this request changes the machine: it needs 'Authorization: Bearer <token>'")
        return await call_next(request)

    @app.get("/api/machine")
    def machine():
        kinds: dict[str, int] = {}
        for c in layout.converters.values():
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        return {"machine": layout.name, "prefix": layout.prefix, "bpms": len(layout.orbit.bpms),
                "converters": len(layout.converters), "converters_by_kind": kinds,
                "magnets": len(layout.tables.magnets), "elements": len(lattice()), "kinds": list(KINDS)}

    @app.get("/api/machine/devices")
    def devices():
        return {"converters": [{"name": c.name, "kind": c.kind, "unit": c.unit, "limits": [c.low, c.high],
                                "max_step": c.max_step if c.max_step != float("inf") else None,
                                "magnets": list(c.magnets), "setpoint": c.setpoint, "readback": c.readback}
                               for c in layout.converters.values()],
                "bpms": list(layout.orbit.bpms)}

    @cache
    def lattice() -> list[dict]:
        ring = load_lattice(layout.tables.folder / "lattice.json")
        s = ring.get_s_pos(range(len(ring)))
        on = {m.element: m.converter for m in layout.tables.magnets}
        return plain([{"name": e.FamName, "family": e.FamName, "kind": type(e).__name__, "s": float(pos),
                       "length": float(e.Length), "converter": on.get(e.FamName),
                       "strengths": {k: getattr(e, k) for k in STRENGTHS if hasattr(e, k)}}
                      for e, pos in zip(ring, s, strict=True)])

    @app.get("/api/machine/lattice")
    def lattice_view():
        return {"machine": layout.name, "elements": lattice()}

    @app.get("/api/state")
    def state():
        try:
            return service.state()
        except Exception as err:  # noqa: BLE001 - the machine does not answer: say so, keep serving
            return error(503, f"the machine does not answer: {type(err).__name__}: {err}")

    @app.post("/api/measurements", status_code=202)
    async def submit(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return error(400, "the request body is not JSON")
        try:
            record = service.submit(body)
        except RequestError as err:
            return error(err.status, str(err))
        return JSONResponse({"id": record["id"], "status": record["status"]}, status_code=202,
                            headers={"Location": f"/api/measurements/{record['id']}"})

    @app.get("/api/measurements")
    def listing(kind: str | None = None, since: str | None = Query(None, description="ISO time"),
                status: str | None = None, device: str | None = Query(None, description="a device it set")):
        if kind is not None and kind not in KINDS:
            return error(422, f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
        if since is not None:
            try:
                moment = datetime.fromisoformat(since)
            except ValueError:
                return error(422, f"since: {since!r} is not an ISO time")
            moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
            since = moment.astimezone(UTC).isoformat(timespec="milliseconds")
        return {"measurements": [public(r, raw=False) for r in service.records.list(kind, since, status, device)]}

    @app.get("/api/measurements/{id}")
    def one(id: str):
        try:
            return public(service.records.get(id))
        except KeyError:
            return error(404, f"no measurement {id!r}")

    @app.delete("/api/measurements/{id}")
    def cancel(id: str):
        try:
            return public(service.cancel(id))
        except KeyError:
            return error(404, f"no measurement {id!r}")

    @app.get("/api/measurements/{id}/run")
    def run(id: str):
        try:
            record = service.records.get(id)
        except KeyError:
            return error(404, f"no measurement {id!r}")
        if not record["run_uid"]:
            return error(404, f"measurement {id} has no run (yet)")
        return plain(service.runs.run(record["run_uid"]))

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def unknown(rest: str):  # under /api, not the dashboard's page: a path the API does not have
        return error(404, f"no such API path: /api/{rest}")

    return app
