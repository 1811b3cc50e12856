"""The BentoML entry point: ``bentoml serve service.service:SlimServe`` (bentofile.yaml and
``python -m service`` name it). The service itself lives in :mod:`service.http.bento`."""

from __future__ import annotations

from service.http.bento import SlimServe

__all__ = ["SlimServe"]
