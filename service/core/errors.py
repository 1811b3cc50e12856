"""The one exception hierarchy of the serving side; the HTTP status lives on the class.

One handler turns these into ``{"error": "..."}`` with the status (and ``Retry-After`` for
503s), as the Open Inference Protocol expects. Messages name the thing and the expectation.
"""

from __future__ import annotations

__all__ = [
    "ServingError",
    "InvalidInput",
    "ModelNotFound",
    "PayloadTooLarge",
    "MethodNotAllowed",
    "UnsupportedMediaType",
    "Unavailable",
    "ModelNotReady",
    "ModelUnavailable",
    "ClientClosedRequest",
    "Overloaded",
    "DeadlineExceeded",
    "InferenceFailed",
]


class ServingError(Exception):
    """Base class: ``status_code`` is the HTTP status a client gets."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidInput(ServingError):
    """The client sent something the model cannot take: malformed body, shape, datatype, NaN."""

    status_code = 400


class ModelNotFound(ServingError):
    status_code = 404


class PayloadTooLarge(ServingError):
    status_code = 413


class MethodNotAllowed(ServingError):
    """405, with the methods the route takes in ``Allow``."""

    status_code = 405

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    @property
    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class UnsupportedMediaType(ServingError):
    status_code = 415


class Unavailable(ServingError):
    """503: try again later; ``retry_after_s`` becomes the ``Retry-After`` header."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ModelNotReady(Unavailable):
    """The model exists and will be ready soon (it is loading): retry after a while."""


class ModelUnavailable(ServingError):
    """The model is in the repository but failed to load (a corrupt file, a bad manifest): no
    retry helps until the repository is fixed and the model loaded again. Triton answers a
    request for a model that is not ready with 400 too."""

    status_code = 400


class ClientClosedRequest(ServingError):
    """The client hung up while its request waited: nothing is sent back. 499 (nginx's code
    for it) appears only in metrics and logs."""

    status_code = 499


class Overloaded(Unavailable):
    """The model's queue is full."""


class DeadlineExceeded(Unavailable):
    """The request could not be served before its deadline."""


class InferenceFailed(ServingError):
    """onnxruntime failed on input that passed validation: a genuine server fault."""

    status_code = 500
