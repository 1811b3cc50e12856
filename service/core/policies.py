"""Which versions of a model serve, and how its traffic is split: two objects of a manifest's
``serving`` section (also settable at run time through the repository API).

``version_policy`` takes Triton's names and shape::

    {"latest": {"num_versions": 2}}      the two newest versions (default: the newest one)
    {"specific": {"versions": [1, 3]}}   exactly these
    {"all": {}}                          every version in the repository

``traffic`` splits requests that name no version or variant::

    {"canary": {"version": 3}, "canary_weight": 0.1,           10% to version 3
     "shadow": {"variant": "int8-dynamic"}, "shadow_fraction": 1.0,
     "tolerance": 0.001}

A canary answers the requests it is given; a shadow gets a copy of a fraction of requests
after the primary answered, and its outputs are only compared with the primary's (top-1 label
for classifiers, the largest absolute difference within ``tolerance`` otherwise).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["VersionPolicy", "LatestVersions", "SpecificVersions", "TrafficTarget", "Traffic"]

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


class LatestVersions(BaseModel):
    model_config = _STRICT
    num_versions: int = Field(1, ge=1, description="How many of the newest versions serve.")


class SpecificVersions(BaseModel):
    model_config = _STRICT
    versions: list[int] = Field(min_length=1, description="Exactly these versions serve.")


class VersionPolicy(BaseModel):
    """Triton's ``version_policy``: exactly one of latest, specific, all."""

    model_config = _STRICT
    latest: LatestVersions | None = None
    specific: SpecificVersions | None = None
    all: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "specific", "all") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"name one of latest, specific, all; got {chosen}")
        return self

    def choose(self, available: list[int]) -> list[int]:
        """The versions to serve among ``available``, newest first."""
        newest = sorted(available, reverse=True)
        if self.specific is not None:
            return [v for v in newest if v in self.specific.versions]
        if self.all is not None:
            return newest
        return newest[: self.latest.num_versions if self.latest else 1]

    def describe(self) -> str:
        if self.specific is not None:
            return f"specific {self.specific.versions}"
        if self.all is not None:
            return "all"
        return f"latest {self.latest.num_versions if self.latest else 1}"


class TrafficTarget(BaseModel):
    """Another version, or another variant of the serving version: exactly one."""

    model_config = _STRICT
    version: int | None = Field(None, ge=1)
    variant: str | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one(self) -> TrafficTarget:
        if (self.version is None) == (self.variant is None):
            raise ValueError("name exactly one of 'version' and 'variant'")
        return self

    def __str__(self) -> str:
        return f"version {self.version}" if self.version is not None else f"@{self.variant}"

    @property
    def label(self) -> str:
        """The metric label of this target: ``v3`` or ``int8-dynamic``."""
        return f"v{self.version}" if self.version is not None else str(self.variant)


class Traffic(BaseModel):
    """How a model's requests are split between its primary, a canary and a shadow."""

    model_config = _STRICT
    canary: TrafficTarget | None = None
    canary_weight: float = Field(0.0, ge=0.0, le=1.0)
    shadow: TrafficTarget | None = None
    shadow_fraction: float = Field(1.0, ge=0.0, le=1.0)
    tolerance: float = Field(1e-3, ge=0.0, description="Outputs within this agree.")

    @model_validator(mode="after")
    def _weights(self) -> Traffic:
        if self.canary_weight > 0 and self.canary is None:
            raise ValueError("canary_weight needs a 'canary' target")
        return self
