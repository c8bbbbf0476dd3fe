"""Same origin by default: no web site but the server's own pages (the bundled OHIF) drives the server from a browser.

MONAI Label 0.8.5 installs Starlette's ``CORSMiddleware`` with ``allow_origins=["*"]``,
``allow_credentials=True`` and every method: any page a user opens answers its own
preflights, reads every response (the datastore, every image and label), and a plain
form POST from any site (which needs no preflight) runs inference and stores its
result. ``MONAI_LABEL_CORS_ORIGINS``, its way to name origins, stops the server at
start-up in 0.8.5: its settings are dumped with ``json.dumps``, which cannot encode
pydantic's ``AnyHttpUrl``; and even then pydantic 2 writes ``http://host:3000`` as
``http://host:3000/``, which never equals a browser's ``Origin`` header (no trailing slash).

Here (installed by ``lib/routes.py`` in place of MONAI Label's middleware):

- :func:`cors_middleware`: Starlette's ``CORSMiddleware`` allowing only the origins of
  ``--conf allowed_origins`` (default none): a foreign page gets no
  ``Access-Control-Allow-Origin``, not even ``*`` for reads, and its preflights fail;
- :class:`SameOriginGuard`: a request that changes something (any method but GET, HEAD
  and OPTIONS) is refused with a 403 when a browser says it comes from another origin:
  an ``Origin`` header (browsers send it on every cross-origin POST, PUT and DELETE) that is
  not the server's own origin nor an allowed one, or ``Sec-Fetch-Site: cross-site`` /
  ``same-site``. That covers what CORS cannot stop, requests a browser sends without
  asking first: form POSTs (``application/x-www-form-urlencoded``, ``multipart/form-data``,
  ``text/plain``). Programs (3D Slicer, ``MONAILabelClient``, curl) send no ``Origin``
  and pass; the bundled OHIF at ``/ohif`` sends the server's own origin and passes.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)

__all__ = ["SAFE_METHODS", "SameOriginGuard", "cors_middleware", "parse_origins"]

#: methods that change nothing on this server (none of its GET or HEAD routes writes)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CROSS_SITE = frozenset({"cross-site", "same-site"})  # same-site is another port or subdomain: another origin


def _origin(value: str) -> str:
    """``scheme://host[:port]`` of ``value`` as browsers write it in ``Origin`` (lower case, no path, no slash)."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(
            f"{value!r} is not an origin: write scheme://host[:port], e.g. 'https://viewer.example.org:3000'"
        )
    default = {"http": 80, "https": 443}[parts.scheme]
    port = f":{parts.port}" if parts.port and parts.port != default else ""
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{parts.scheme}://{host}{port}"


def parse_origins(value: Any) -> tuple[str, ...]:
    """``--conf allowed_origins``: a JSON list (or comma-separated text) of origins, normalised as browsers send them.

    Raises:
        ValueError: naming the entry that is not ``scheme://host[:port]`` (``*`` is refused: name the origins).
    """
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text[:1] in ("[", "{", '"') else [v for v in text.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(
            "--conf allowed_origins must be a JSON list of origins, "
            f"e.g. '[\"https://viewer.example.org\"]', got {value!r}."
        )
    if any(v.strip() == "*" for v in value):
        raise ValueError("--conf allowed_origins: '*' would let every web site read the datastore; name the origins.")
    try:
        return tuple(dict.fromkeys(_origin(v) for v in value))
    except ValueError as e:
        raise ValueError(f"--conf allowed_origins: {e}") from e


def cors_middleware(allowed: Iterable[str]) -> Middleware:
    """Starlette's CORS for ``allowed`` origins only (no cookies: MONAI Label authenticates with bearer tokens)."""
    return Middleware(
        CORSMiddleware, allow_origins=list(allowed), allow_credentials=False, allow_methods=["*"], allow_headers=["*"]
    )


class SameOriginGuard:
    """ASGI middleware: refuse requests that change something when a browser sends them from another origin.

    Args:
        app: the next ASGI app.
        allowed: origins allowed besides the server's own (normalised by :func:`parse_origins`).
    """

    def __init__(self, app: Any, allowed: Iterable[str] = ()):
        self.app = app
        self.allowed = frozenset(allowed)

    @staticmethod
    def own_origin(scope: dict[str, Any], headers: Headers) -> str | None:
        host = headers.get("host")
        if not host:
            return None
        try:
            return _origin(f"{scope.get('scheme', 'http')}://{host}")
        except ValueError:
            return None

    def refusal(self, scope: dict[str, Any]) -> str | None:
        """Why this request is refused, or None."""
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return None
        headers = Headers(scope=scope)
        origin, site = headers.get("origin"), (headers.get("sec-fetch-site") or "").lower()
        own = self.own_origin(scope, headers)
        if origin is not None:
            try:
                normal = _origin(origin)
            except ValueError:
                normal = origin  # "null" (a sandboxed page, a file://) or garbage: never allowed
            if normal == own and site not in _CROSS_SITE:
                return None
            if normal in self.allowed:
                return None
            return (
                f"Cross-origin request refused: a page from {origin!r} may not change this server "
                f"({scope['method']} {scope['path']}); only the server's own pages ({own}) and the origins of "
                "--conf allowed_origins may."
            )
        if site in _CROSS_SITE:
            return (
                f"Cross-origin request refused: the browser says this {scope['method']} comes from another site "
                f"(Sec-Fetch-Site: {site}); only the server's own pages and the origins of --conf allowed_origins "
                "may change this server."
            )
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        reason = self.refusal(scope)
        if reason is None:
            await self.app(scope, receive, send)
            return
        logger.warning(reason)
        await JSONResponse({"detail": reason}, status_code=403)(scope, receive, send)
