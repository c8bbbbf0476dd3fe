"""MONAI Label's blocking endpoints moved off the event loop, and infer requests checked before they run.

MONAI Label declares its endpoints ``async def`` but does all of their work
synchronously (inference, reading and copying uploads), so one inference blocks the
server's event loop and every other request, ``/info`` and datastore listings
included, waits for it. FastAPI runs plain ``def`` endpoints in its thread pool, so
the endpoints below are re-registered as plain functions that run MONAI Label's own
endpoint coroutine in a worker thread: the same code, parameters and dependencies
(authentication included), no longer on the event loop. Requests that need no model
stay on the loop and answer while inference runs.

The infer endpoint also gets :func:`check_infer_request` first: the model in the URL
must exist, the image must be a datastore id, and the params must satisfy the
model's schema (``lib/requests.py``), before MONAI Label merges ``params`` into the
request (where ``params.model`` would silently override the URL's model).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from typing import Any, Callable

from fastapi import HTTPException

from lib import datastore_endpoints
from lib.requests import check_id, http_error, parse_params
from model_core.validation import InputError

logger = logging.getLogger(__name__)

#: (method, path) of the endpoints run in the thread pool: inference, uploads, scoring, sampling, sessions
THREADED_ROUTES = {
    ("POST", "/infer/{model}"),
    ("POST", "/batch/infer/{model}"),
    ("PUT", "/datastore/"),
    ("PUT", "/datastore/image"),
    ("PUT", "/datastore/label"),
    ("POST", "/scoring/{method}"),
    ("POST", "/activelearning/{strategy}"),
    ("PUT", "/session/"),
}


def _in_worker_thread(endpoint: Callable, before: Callable[[dict[str, Any]], None] | None = None) -> Callable:
    """A plain function with ``endpoint``'s signature that runs the coroutine ``endpoint`` to completion.

    FastAPI reads the signature (``__signature__``) to resolve parameters and runs
    plain functions in its thread pool; ``__wrapped__`` is deliberately not set, since
    FastAPI would follow it back to the coroutine function.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before(kwargs)
        return asyncio.run(endpoint(*args, **kwargs))

    run.__signature__ = inspect.signature(endpoint, eval_str=True)  # type: ignore[attr-defined]
    run.__name__, run.__doc__, run.__module__ = endpoint.__name__, endpoint.__doc__, endpoint.__module__
    run.in_worker_thread = True  # type: ignore[attr-defined]
    return run


def check_infer_request(app: Any, kwargs: dict[str, Any]) -> None:
    """The checks of an ``/infer/{model}`` request that MONAI Label does not make, before it does any work.

    Raises:
        HTTPException: 404 unknown model or image, 400 invalid id, 422 invalid params (naming the field).
    """
    model = kwargs.get("model")
    task = app._infers.get(model)
    if task is None:
        raise HTTPException(status_code=404, detail=f"Unknown model {model!r}; this server has {sorted(app._infers)}.")
    try:
        schema = getattr(task, "params_schema", None)
        params = parse_params(schema, kwargs.get("params")) if schema is not None else None
        if params is not None:
            if params.model is not None and params.model != model:
                raise InputError(f"params.model {params.model!r} contradicts the model in the URL ({model!r}); "
                                 "leave it out: the URL names the model that runs.", status=422)
            if params.image is not None and params.image != kwargs.get("image"):
                raise InputError(f"params.image {params.image!r} contradicts the image in the URL "
                                 f"({kwargs.get('image')!r}); leave it out: the URL names the image.", status=422)
        if kwargs.get("session_id"):
            check_id(kwargs["session_id"], "session_id")
        image = kwargs.get("image") or ""
        if kwargs.get("file") is None and not kwargs.get("session_id"):
            if not image:
                raise InputError("image is empty: pass the id of a datastore image, or upload the image as 'file'.")
            check_id(image, "image")
            if not app.datastore().get_image_uri(image):
                raise InputError(f"Image {image!r} is not in the datastore.", status=404)
        elif image:
            check_id(image, "image")
    except InputError as e:
        logger.info(f"Rejected infer request for {model!r}: {e}")
        raise http_error(e) from e


def _routers(router: Any) -> list[Any]:
    """``router`` and every router included in it (FastAPI keeps included routers as their own objects)."""
    out = [router]
    for route in router.routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            out += _routers(included)
    return out


def install(app: Any) -> None:
    """Re-register MONAI Label's blocking endpoints to run in the thread pool (only inside the server process)."""
    server = sys.modules.get("monailabel.app")
    if server is None:  # training and scoring subprocesses build the app without the web server
        return
    from fastapi.routing import APIRoute

    moved = []
    for router in _routers(server.app.router):
        changed = False
        for i, route in enumerate(router.routes):
            if not isinstance(route, APIRoute) or getattr(route.endpoint, "in_worker_thread", False):
                continue
            keys = {(method, route.path) for method in route.methods}
            if not keys & THREADED_ROUTES:
                continue
            before = (lambda kwargs: check_infer_request(app, kwargs)) if ("POST", "/infer/{model}") in keys else None
            router.routes[i] = APIRoute(
                route.path, _in_worker_thread(route.endpoint, before), methods=list(route.methods), name=route.name,
                summary=route.summary, description=route.description, tags=route.tags, responses=route.responses,
                dependencies=route.dependencies, include_in_schema=route.include_in_schema, deprecated=route.deprecated,
            )
            moved.append(f"{'/'.join(sorted(route.methods))} {route.path}")
            changed = True
        if changed and hasattr(router, "_mark_routes_changed"):
            router._mark_routes_changed()  # FastAPI caches the routes of included routers by version
    missing = sorted(f"{m} {p}" for m, p in THREADED_ROUTES if f"{m} {p}" not in moved)
    if missing:
        raise RuntimeError(f"MONAI Label endpoints not found to run off the event loop: {missing}")
    logger.info(f"Endpoints run in the thread pool: {sorted(moved)}")
    datastore_endpoints.install(_routers(server.app.router))  # uploads checked whole first, downloads of one version
