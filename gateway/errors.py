"""The one error hierarchy of the gateway.

Every error a client can see is a ``GatewayError``; one handler renders it as OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with the status the ``openai`` SDK maps to
the right exception class::

    GatewayError (500 server_error)
     ├── InvalidRequestError (400 invalid_request_error)        -> openai.BadRequestError
     │    ├── ContentPolicyError (400, code content_policy_violation)
     │    ├── ContextLengthError (400, code context_length_exceeded)
     │    └── UnsupportedByDeploymentError (400; another deployment may serve it)
     ├── AuthenticationError (401 authentication_error)         -> openai.AuthenticationError
     ├── PermissionDeniedError (403 permission_error)           -> openai.PermissionDeniedError
     ├── NotFoundError (404 invalid_request_error)              -> openai.NotFoundError
     │    └── ModelNotFoundError (404, code model_not_found)
     ├── MethodNotAllowedError (405)
     ├── PayloadTooLargeError (413)
     ├── UnsupportedMediaTypeError (415)
     ├── UnprocessableEntityError (422)                         -> openai.UnprocessableEntityError
     ├── RateLimitError (429 rate_limit_exceeded)               -> openai.RateLimitError
     │    └── QuotaExceededError (429, code insufficient_quota)
     ├── UpstreamError (502 upstream_error)                     -> openai.InternalServerError
     ├── ServiceUnavailableError (503)
     └── UpstreamTimeoutError (504 timeout)
          └── DeadlineExceededError (504; the request's own deadline, not the deployment's)

Plugins raise these to deny a request; they never build error JSON themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = dict(headers or {})
        #: For upstream errors: whether another deployment may be tried (routing issue).
        self.retryable = retryable

    #: For upstream errors: whether the error says something about the deployment's health
    #: (circuit breakers count only those).
    deployment_fault = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.to_dict())


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContentPolicyError(InvalidRequestError):
    code = "content_policy_violation"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class UnsupportedByDeploymentError(InvalidRequestError):
    """A valid request that this deployment's provider cannot express (``n > 1`` for
    Anthropic, say): the next deployment of the plan is tried, and the client gets this 400
    only when none could serve it. It says nothing about the deployment's health."""

    deployment_fault = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param, retryable=True)


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class MethodNotAllowedError(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeoutError(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaTypeError(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class UnprocessableEntityError(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "unprocessable_entity"


class RateLimitError(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceededError(RateLimitError):
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class ServiceUnavailableError(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class UpstreamTimeoutError(GatewayError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


class DeadlineExceededError(UpstreamTimeoutError):
    """The request's deadline (the route plugin's ``deadline_s``, for a plain request its
    ``plain_deadline_s``) ran out during an attempt: the request's time budget, not a fault of
    the deployment that was cut short, unless that attempt had most of the request's time
    (``gateway.upstream`` sets ``deployment_fault``)."""

    deployment_fault = False
