"""One error rule for every route: a client's mistake is a 4xx that says what is wrong; anything else is a 500 with
an incident id, its cause in the log.

MONAI Label installs no exception handler: whatever its endpoints or the app raise
(``ImageNotFoundException``, ``json.JSONDecodeError``, ``AssertionError``, ``OSError``,
``MONAILabelException``) reaches the client as a bare "Internal Server Error", and the
cause is only in uvicorn's traceback. :func:`install` puts three handlers on the
FastAPI app, the only place where errors become answers:

- :class:`model_core.io.validation.InputError` (what the app's checks raise) is answered
  with its own status and message;
- FastAPI's ``RequestValidationError`` (a query or form parameter of the wrong type) is
  a 422 naming each parameter (``query.limit_cases: Input should be a valid integer``);
- any other exception is a 500 quoting an incident id; the traceback is logged under
  ``Server fault <id>``. ``HTTPException`` keeps FastAPI's own handler (its status,
  detail and headers, e.g. ``Retry-After``).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lib.requests import http_error
from model_core.io.validation import InputError

logger = logging.getLogger(__name__)

__all__ = ["INCIDENT_MESSAGE", "install", "server_fault"]

#: the answer to a server fault (``{incident}`` is filled in); tests and users grep for "incident"
INCIDENT_MESSAGE = "The server failed on this request (incident {incident}; the cause is in the server log)."


def server_fault(error: BaseException, where: str = "") -> tuple[str, str]:
    """Log ``error`` with its traceback under a new incident id; returns ``(incident, message for the client)``."""
    incident = uuid.uuid4().hex[:8]
    logger.error(
        f"Server fault {incident}{f' ({where})' if where else ''}: {type(error).__name__}: {error}",
        exc_info=(type(error), error, error.__traceback__),
    )
    return incident, INCIDENT_MESSAGE.format(incident=incident)


async def _input_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, InputError)
    logger.info(f"{request.method} {request.url.path}: {error.status} {error}")
    answer = http_error(error)  # the one mapping of an InputError to HTTP (status, message, Retry-After)
    return JSONResponse(status_code=answer.status_code, content={"detail": answer.detail}, headers=answer.headers)


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    lines = []
    for err in error.errors():
        shown = json.dumps(err.get("input"), default=str)
        lines.append(f"{_location(tuple(err.get('loc', ())))}: {err.get('msg')} (got {shown[:60]})")
    detail = "Invalid request: " + "; ".join(lines)
    logger.info(f"{request.method} {request.url.path}: 422 {detail}")
    return JSONResponse(status_code=422, content={"detail": detail})


async def _fault(request: Request, error: Exception) -> JSONResponse:
    _, message = server_fault(error, f"{request.method} {request.url.path}")
    return JSONResponse(status_code=500, content={"detail": message})


def install(app: Any) -> None:
    """Put the handlers on the FastAPI ``app`` (the caller rebuilds its middleware stack, which reads them)."""
    app.exception_handlers[InputError] = _input_error
    app.exception_handlers[RequestValidationError] = _validation_error
    app.exception_handlers[Exception] = _fault
