"""Errors as the OpenAI API shapes them: ``{"error": {"message", "type", "param", "code"}}``
with a 4xx/5xx status."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answer. ``extra`` fields are added to the error object (e.g. token counts)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code, **self.extra}}


def invalid(message: str, param: str | None = None, code: str | None = None, **extra: Any) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, "invalid_request_error", param, code, **extra)
