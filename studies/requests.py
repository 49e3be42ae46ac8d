"""The parameters of each kind of measurement: one pydantic model per kind, shared by the REST API and
the command line. A parameter left out takes its default; ``None`` means "the plan chooses" (a step
from the model's response, every steerer, ...)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(4, ge=1, le=100, description="fresh readings averaged per orbit or tune reading")


class Bba(Parameters):
    """Beam-based alignment of one quadrupole magnet, both planes."""

    quadrupole: str = Field(description="a quadrupole magnet on a converter of its own, e.g. Q2M1K3RP")
    steerer: str | None = Field(None, description="one steerer to use in its plane (default: the plan picks a pair)")
    steps: int = Field(5, ge=3, le=21, description="beam positions per plane")
    span_mm: float = Field(0.5, gt=0, le=3.0, description="beam displacement in the quadrupole, ± mm")
    quad_step_A: float | None = Field(None, gt=0, le=50.0, description="quadrupole change (default 2 %)")
    planes: list[Literal["x", "y"]] = Field(["x", "y"], min_length=1, max_length=2)


class Orm(Parameters):
    """Orbit response matrix of chosen (default all) steerers."""

    steerers: list[str] | None = Field(None, min_length=1, description="steerer converters (default all)")
    step_A: float | None = Field(None, gt=0, le=10.0,
                                 description="one step for all (default: per steerer, 0.5 mm of orbit at most)")


class Dispersion(Parameters):
    """Dispersion at the BPMs from an RF step up and down."""

    rf_step_khz: float | None = Field(None, gt=0, le=50.0, description="RF step (default: δ = 1e-3)")


class Chromaticity(Parameters):
    """Chromaticity from the tunes over an RF scan."""

    rf_span_khz: float | None = Field(None, gt=0, le=100.0, description="full RF span (default: δ = ±2e-3)")
    points: int = Field(5, ge=3, le=31)


class TuneResponse(Parameters):
    """Tune response of quadrupole converters."""

    converters: list[str] = Field(min_length=1, description="quadrupole converters")
    step_A: float | None = Field(None, gt=0, le=50.0, description="current step (default 1 %)")


class OrbitCorrection(Parameters):
    """Orbit correction towards zero readings by SVD of a measured or the model's response."""

    response: str = Field("model", description='an ORM measurement\'s id, or "model"')
    singular_values: int | None = Field(None, ge=1, description="singular values kept (default all)")
    gain: float = Field(1.0, gt=0, le=1.0)
    iterations: int = Field(1, ge=1, le=20)


KINDS: dict[str, type[Parameters]] = {"bba": Bba, "orm": Orm, "dispersion": Dispersion,
                                      "chromaticity": Chromaticity, "tune_response": TuneResponse,
                                      "orbit_correction": OrbitCorrection}


class RequestError(ValueError):
    """A request that cannot be run; the message says why. *status*: the HTTP status it means."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def parse(body: object) -> tuple[str, dict]:
    """(kind, parameters with defaults) of a request body ``{"kind": ..., ...}``, or ``RequestError``."""
    if not isinstance(body, dict):
        raise RequestError("the request must be a JSON object", 400)
    fields = dict(body)
    kind = fields.pop("kind", None)
    if kind not in KINDS:
        raise RequestError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    try:
        return kind, KINDS[kind].model_validate(fields).model_dump()
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or kind}: {e['msg']}" for e in err.errors())
        raise RequestError(f"{kind}: {problems}") from None
