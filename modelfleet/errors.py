"""The one exception tree of modelfleet, and its JSON shape.

Every error a client can see is raised as one of these classes and rendered
in exactly one place (``modelfleet.api.errors``) as::

    {"error": {"message": ..., "type": ..., "code": ..., "param": ..., "status": ...}}

The tree (HTTP status, ``type``)::

    ModelfleetError                      500 server_error
    ├── InvalidRequest                   400 invalid_request_error
    │   ├── ImageInputNotSupported       400   code image_input_not_supported_yet
    │   └── ContextLengthExceeded        400   code context_length_exceeded
    ├── AuthenticationError              401 authentication_error
    ├── PermissionDenied                 403 permission_error
    │   └── InsufficientCredits          403   code insufficient_credits
    ├── NotFound                         404 not_found_error
    │   └── ModelNotFound                404   code model_not_found
    ├── MethodNotAllowed                 405 invalid_request_error
    ├── Conflict                         409 invalid_request_error
    ├── RequestTooLarge                  413 invalid_request_error
    ├── ValidationFailed                 422 invalid_request_error
    ├── RateLimited                      429 rate_limit_error
    ├── UpstreamError                    502 upstream_error
    ├── ServiceUnavailable               503 service_unavailable
    │   └── ModelUnavailable             503   code model_unavailable
    └── DeadlineExceeded                 504 timeout_error

Classes carry a default ``code``; a raise may name a more precise one.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ModelfleetError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
                "status": self.status,
            }
        }


class InvalidRequest(ModelfleetError):
    """Valid in shape, but not for this model or endpoint."""

    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class ImageInputNotSupported(InvalidRequest):
    default_code = "image_input_not_supported_yet"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class AuthenticationError(ModelfleetError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(ModelfleetError):
    status = 403
    type = "permission_error"
    default_code = "insufficient_scope"


class InsufficientCredits(PermissionDenied):
    type = "insufficient_quota"
    default_code = "insufficient_credits"


class NotFound(ModelfleetError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(ModelfleetError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class Conflict(ModelfleetError):
    """The thing to create exists already (a project name)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class RequestTooLarge(ModelfleetError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class ValidationFailed(ModelfleetError):
    """The body does not have the documented shape (missing fields, wrong types)."""

    status = 422
    type = "invalid_request_error"
    default_code = "validation_error"


class RateLimited(ModelfleetError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamError(ModelfleetError):
    """A worker answered with something modelfleet could not use."""

    status = 502
    type = "upstream_error"
    default_code = "bad_worker_response"


class ServiceUnavailable(ModelfleetError):
    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


class ModelUnavailable(ServiceUnavailable):
    default_code = "model_unavailable"


class Preempted(ModelUnavailable):
    """Background work (a batch line) stopped because its replica was swapped
    out for interactive requests; it was not charged and runs again."""

    default_code = "preempted"


class DeadlineExceeded(ModelfleetError):
    status = 504
    type = "timeout_error"
    default_code = "request_timeout"
