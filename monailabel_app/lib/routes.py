"""Every route behind one trust boundary: the reviewed route table, its checks, and the server's error and origin rules.

MONAI Label 0.8.5 mounts every endpoint it ships (whole-slide inference that takes any
path, batch inference, model file upload, logs, a generic PACS proxy, ...) and checks
none of their arguments. :data:`ROUTES` is the reviewed table of its routes: each
(method, path) is kept, wrapped by the checks below, or not mounted, with the reason.
:func:`install` (called by the app in the server process) applies it:

- **default deny**: every route on the server that the table does not keep is removed,
  an unreviewed one (a MONAI Label upgrade) included, and logged; the route-table test
  (``tests/app/test_routes.py``) fails on any route that is not reviewed here;
- **checks before the endpoint** (:func:`check_arguments`, then the rule's own checks):
  ids and tags (``lib.requests.ID_RULE``, 400), the datastore entry, model, strategy or
  scoring method they name (404), JSON fields and bodies (a JSON object, numbers at most
  2^53: 422 naming the field), upload file names (400), and in read-only mode the
  routes that write (403 naming ``MONAI_LABEL_DATASTORE_READ_ONLY``);
- **off the event loop**: MONAI Label declares its endpoints ``async def`` but does their
  work synchronously (inference, copying uploads), which blocks every other request; the
  rules marked ``threaded`` run MONAI Label's endpoint coroutine in FastAPI's thread pool
  (same code, parameters and dependencies, authentication included), so ``/info`` and
  listings answer while a model runs;
- **cleanup on refusal**: MONAI Label deletes an upload's temporary copy in a background
  task, which FastAPI runs only after a successful answer; a refused request runs them;
- **one error rule** (``lib/errors.py``) and **same origin** (``lib/origin.py``) are
  installed on the FastAPI app in place of MONAI Label's allow-all CORS.

Roles: with ``MONAI_LABEL_AUTH_ENABLE=true``, MONAI Label's own ``RBAC`` dependency of
each kept route is unchanged; :data:`ROUTES` states it (``role``) and the route-table
test checks that it is so.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import HTTPException
from starlette.datastructures import UploadFile  # what FastAPI's form parsing gives (fastapi's is a subclass)

from lib import datastore_endpoints, errors, origin
from lib.readonly import refuse_if_read_only
from lib.requests import check_id, check_json_numbers, check_tag, http_error, parse_json_object, parse_params
from model_core.io.validation import InputError

logger = logging.getLogger(__name__)

__all__ = ["ROUTES", "Rule", "check_arguments", "check_infer_request", "install", "mounted_routes"]


@dataclass(frozen=True)
class Rule:
    """The review of one MONAI Label route.

    Attributes:
        keep: mounted (wrapped by the checks) or not mounted.
        why: the reason, in one line.
        role: the role that gates it with authentication on (``user``, ``annotator``, ``admin``), None: public.
        writes: what it changes ("label uploads"): refused with a 403 in read-only mode.
        threaded: run in the thread pool (it does blocking work).
        checks: names of :data:`CHECKS` run before it, after :func:`check_arguments`.
        pacs_only: mounted only when the datastore is a DICOMweb PACS.
        remove_after_send: the endpoint answers with a temporary file that is deleted once sent.
    """

    keep: bool
    why: str
    role: str | None = None
    writes: str | None = None
    threaded: bool = False
    checks: tuple[str, ...] = ()
    pacs_only: bool = False
    remove_after_send: bool = False


def _drop(why: str) -> Rule:
    return Rule(keep=False, why=why)


_CDN = "its page loads JavaScript from a CDN into this origin, where it could drive every route; /openapi.json stays"
_FORWARDS = "the proxy forwards POST bodies and headers as they are"
_BATCH = (
    "batch inference: its defaults ask for CUDA on all GPUs (a division by zero on CPU) and store every result; "
    "no client of this app uses it, and scoring runs the model over the datastore"
)

#: (method, path) -> the review; ``("*", path)`` is a mount (every method)
ROUTES: dict[tuple[str, str], Rule] = {
    # the API description and the browser's icon
    ("GET", "/openapi.json"): Rule(True, "the API description (JSON, no data)"),
    ("HEAD", "/openapi.json"): Rule(True, "the API description (JSON, no data)"),
    ("GET", "/docs"): _drop(f"ReDoc: {_CDN}"),
    ("HEAD", "/docs"): _drop(f"ReDoc: {_CDN}"),
    ("GET", "/"): _drop(f"Swagger UI: {_CDN}"),
    ("GET", "/favicon.ico"): Rule(True, "the icon browsers ask for"),
    ("*", "/static"): _drop("a second copy of the OHIF files served at /ohif; nothing links to it"),
    ("POST", "/reload"): _drop(
        "drops the app instance, so the next request loads a second app and its models; no client uses it"
    ),
    # authentication (mounted by MONAI Label only with MONAI_LABEL_AUTH_ENABLE=true)
    ("GET", "/auth/"): Rule(True, "Slicer and OHIF ask whether authentication is on"),
    ("POST", "/auth/token"): Rule(True, "log in: a token from the Keycloak realm"),
    ("GET", "/auth/token/valid"): Rule(True, "Slicer checks its token"),
    # the app
    ("GET", "/info/"): Rule(True, "models, labels and options: the first call of Slicer and OHIF", "user"),
    ("POST", "/infer/{model}"): Rule(
        True,
        "every model of the app (Slicer, OHIF): image id, session or upload",
        "user",
        threaded=True,
        checks=("infer",),
    ),
    ("POST", "/infer/wsi/{model}"): _drop("whole-slide images, not volumes; it took any server path as the image"),
    ("POST", "/infer/wsi_v2/{model}"): _drop("whole-slide images, not volumes; it took any server path as the image"),
    ("GET", "/batch/infer"): _drop(_BATCH),
    ("POST", "/batch/infer/{model}"): _drop(_BATCH),
    ("DELETE", "/batch/infer"): _drop(_BATCH),
    ("GET", "/train/"): Rule(True, "training status (Slicer, OHIF)", "user"),
    ("POST", "/train/"): Rule(
        True,
        "Update Model in Slicer and OHIF: every trainer",
        "admin",
        writes="training runs (they publish a new model)",
    ),
    ("POST", "/train/{model}"): Rule(
        True, "train one model", "admin", writes="training runs (they publish a new model)", checks=("trainer",)
    ),
    ("DELETE", "/train/"): Rule(True, "stop training (Slicer, OHIF)", "admin"),
    ("POST", "/activelearning/{strategy}"): Rule(
        True, "Next Sample in Slicer and OHIF", "user", threaded=True, checks=("strategy",)
    ),
    ("GET", "/scoring/"): Rule(True, "scoring status", "user"),
    ("POST", "/scoring/"): _drop("deprecated; no client uses it; POST /scoring/{method} runs one method"),
    ("POST", "/scoring/{method}"): Rule(
        True,
        "score the datastore's images for active learning",
        "annotator",
        writes="scoring runs (they store scores in the datastore)",
        threaded=True,
        checks=("scoring",),
    ),
    ("DELETE", "/scoring/"): Rule(True, "stop scoring", "annotator"),
    # the datastore
    ("GET", "/datastore/"): Rule(True, "the datastore listing (Slicer)", "user"),
    ("PUT", "/datastore/"): Rule(
        True,
        "image upload (MONAILabelClient.upload_image uses this path)",
        "annotator",
        writes="image uploads",
        threaded=True,
    ),
    ("PUT", "/datastore/image"): Rule(True, "image upload", "annotator", writes="image uploads", threaded=True),
    ("DELETE", "/datastore/image"): Rule(
        True, "delete an image and its labels", "admin", writes="image deletions", checks=("image",)
    ),
    ("DELETE", "/datastore/"): _drop("deprecated alias of DELETE /datastore/image; no client uses it"),
    ("HEAD", "/datastore/image"): Rule(True, "does an image exist (Slicer)", "user", checks=("image", "checksum")),
    ("GET", "/datastore/image"): Rule(True, "image download (Slicer)", "user", checks=("image",)),
    ("GET", "/datastore/image/info"): Rule(True, "an image's info (scores, strategy)", "user", checks=("image",)),
    ("PUT", "/datastore/image/info"): Rule(
        True, "update an image's info", "annotator", writes="image info updates", checks=("image",)
    ),
    ("PUT", "/datastore/label"): Rule(
        True,
        "label upload (Slicer's Submit Label, OHIF)",
        "annotator",
        writes="label uploads",
        threaded=True,
        checks=("image",),
    ),
    ("DELETE", "/datastore/label"): Rule(True, "delete a label", "admin", writes="label deletions", checks=("label",)),
    ("HEAD", "/datastore/label"): Rule(True, "does a label exist", "user", checks=("label",)),
    ("GET", "/datastore/label"): Rule(True, "label download (Slicer)", "user", checks=("label",)),
    ("GET", "/datastore/label/info"): Rule(True, "a label's info", "user", checks=("label",)),
    ("PUT", "/datastore/label/info"): Rule(
        True, "update a label's info", "annotator", writes="label info updates", checks=("label",)
    ),
    ("PUT", "/datastore/updatelabelinfo"): _drop(
        "deprecated alias of PUT /datastore/label/info (MONAI Label's X-ray "
        "reviewer module); no client of this app uses it"
    ),
    ("GET", "/datastore/dataset"): Rule(
        True, "every labelled image and its labels as a ZIP", "annotator", checks=("dataset",), remove_after_send=True
    ),
    # sessions: a volume sent for inference outside the datastore (Slicer's plugin)
    ("GET", "/session/{session_id}"): Rule(True, "a session's info or volume", "user", checks=("session",)),
    ("PUT", "/session/"): Rule(
        True,
        "Slicer sends a volume that is not in the datastore (lib/sessions.py extracts archives safely)",
        "user",
        threaded=True,
    ),
    ("DELETE", "/session/{session_id}"): Rule(True, "end a session", "user", checks=("session",)),
    # the model files and the logs
    ("GET", "/model/{model}"): _drop("downloads the served weights; no client uses it"),
    ("GET", "/model/info/{model}"): _drop("the served weights' checksum; no client uses it"),
    ("PUT", "/model/{model}"): _drop(
        "replaces the served weights with an uploaded pickle (code runs when it is "
        "loaded); models are published by training only"
    ),
    ("DELETE", "/model/{model}"): _drop("moves the served weights away; no client uses it"),
    ("GET", "/logs/"): _drop("the server log (paths, request parameters) to any user; it is read on the server"),
    ("GET", "/logs/gpu"): _drop("runs nvidia-smi for any user; no client uses it"),
    # OHIF and its DICOMweb proxy
    ("GET", "/ohif/{path:path}"): Rule(True, "the bundled OHIF viewer", "user"),
    ("GET", "/proxy/dicom/wado/{path:path}"): Rule(
        True, "OHIF reads series (WADO-RS/URI) from the PACS", "user", checks=("proxy",), pacs_only=True
    ),
    ("GET", "/proxy/dicom/qido/{path:path}"): Rule(
        True, "OHIF searches the PACS (QIDO-RS)", "user", checks=("proxy",), pacs_only=True
    ),
    ("POST", "/proxy/dicom/wado/{path:path}"): _drop(f"WADO is a read; {_FORWARDS}"),
    ("POST", "/proxy/dicom/qido/{path:path}"): _drop(f"QIDO is a read; {_FORWARDS}"),
    ("GET", "/proxy/dicom/stow/{path:path}"): _drop(
        "STOW is a write to the PACS; labels reach it through the checked datastore only"
    ),
    ("POST", "/proxy/dicom/stow/{path:path}"): _drop(
        "STOW writes to the PACS unchecked; labels reach it through the checked datastore only"
    ),
    ("GET", "/proxy/dicom/{path:path}"): _drop(
        "any path of the PACS server (its REST API beyond DICOMweb); OHIF uses wado and qido only"
    ),
    ("POST", "/proxy/dicom/{path:path}"): _drop("any path of the PACS server, written to; OHIF uses wado and qido"),
}

#: upload file names: MONAI Label copies an upload to a temporary file named after its suffixes
MAX_FILENAME = 200
_ID_ARGUMENTS = ("image", "id", "label", "session_id")


# ---------------------------------------------------------------- checks
def _fail(message: str, status: int = 400) -> None:
    raise InputError(message, status=status)


def check_upload_name(upload: Any, field: str) -> None:
    """An upload's file name fits the file system and names a file (400 naming ``field``)."""
    name = getattr(upload, "filename", None) or ""
    base = os.path.basename(name.replace("\\", "/").rstrip("/"))
    if len(name.encode("utf-8", "surrogateescape")) > MAX_FILENAME:
        _fail(f"{field}: the file name has {len(name)} characters; at most {MAX_FILENAME} are accepted.")
    if name and (base in ("", ".", "..") or "\x00" in name):
        _fail(f"{field}: {name!r} is not a file name.")


def check_arguments(kwargs: dict[str, Any]) -> None:
    """The checks every kept route gets, by argument name and type (one rule per kind of argument).

    Ids (``image``, ``id``, ``label`` when text, ``session_id``) and ``tag`` must be ids (400), except ``image``
    beside a ``session_id`` (the client's name for the session's volume, which is what runs);
    the form fields ``params`` and ``info`` must be JSON objects and JSON bodies hold no number
    beyond 2^53 (422); upload file names must fit the file system (400).
    """
    for name, value in kwargs.items():
        if name == "image" and kwargs.get("session_id"):
            continue  # with a session, Slicer sends its volume's node name, e.g. 'CT Chest (2)'; MONAI Label ignores it
        if isinstance(value, UploadFile):
            check_upload_name(value, name)
        elif isinstance(value, list) and value and all(isinstance(v, UploadFile) for v in value):
            for upload in value:
                check_upload_name(upload, name)
        elif name in _ID_ARGUMENTS and isinstance(value, str) and value:
            check_id(value, name)
        elif name == "tag" and isinstance(value, str) and value:
            check_tag(value, "tag")
        elif name in ("params", "info") and isinstance(value, str):
            parse_json_object(value, name)
        elif name == "params" and isinstance(value, dict):
            check_json_numbers(value, "params")


def _exists(app: Any, image: str) -> None:
    """404 unless ``image`` is listed (a local index lookup; a PACS's cached series list: nothing is downloaded)."""
    if image not in app.datastore().list_images():
        _fail(f"Image {image!r} is not in the datastore.", 404)


def _check_image(app: Any, kwargs: dict[str, Any]) -> None:
    field = "id" if "id" in kwargs else "image"
    image = kwargs.get(field)
    if not image:
        _fail(f"{field} is empty: pass the id of a datastore image.")
    _exists(app, image)


def _check_checksum(app: Any, kwargs: dict[str, Any]) -> None:
    value = kwargs.get("check_sum")
    if value and ":" in value and value.split(":")[0] not in ("SHA256", "SHA512", "MD5"):
        _fail(f"check_sum {value.split(':')[0]!r}: the algorithm must be SHA256, SHA512 or MD5.")


def _check_label(app: Any, kwargs: dict[str, Any]) -> None:
    field = next(f for f in ("label", "id", "image") if f in kwargs)
    image, tag = kwargs.get(field), kwargs.get("tag")
    if not image:
        _fail(f"{field} is empty: pass the id of a datastore image.")
    if not tag:
        _fail("tag is empty: pass a label tag, e.g. 'final'.")
    _exists(app, image)
    if not app.datastore().get_label_uri(image, tag):
        _fail(f"Image {image!r} has no label tagged {tag!r}.", 404)


def _known(kind: str, attribute: str, field: str) -> Callable[[Any, dict[str, Any]], None]:
    def check(app: Any, kwargs: dict[str, Any]) -> None:
        name = kwargs.get(field)
        known = getattr(app, attribute) or {}
        if name not in known:
            _fail(f"Unknown {kind} {name!r}; this server has {sorted(known)}.", 404)

    return check


def _check_dataset(app: Any, kwargs: dict[str, Any]) -> None:
    if not app.datastore().datalist():
        _fail("No image has a final label yet: the dataset archive holds labelled images only.", 404)


def _check_session(app: Any, kwargs: dict[str, Any]) -> None:
    sessions = app.sessions()
    if sessions is None:
        return  # MONAI Label answers 406: sessions are switched off
    info = sessions.get_session(kwargs["session_id"], update_ts=False)
    if info is None:
        _fail(f"Session {kwargs['session_id']!r} not found (sessions expire after MONAI_LABEL_SESSION_EXPIRY).", 404)
    if kwargs.get("image") is True and not os.path.isfile(info.image):
        _fail("image=true: this session holds a folder of files, not one file to download.")


def _check_proxy(app: Any, kwargs: dict[str, Any]) -> None:
    path = kwargs.get("path") or ""
    parts = path.replace("\\", "/").split("/")
    if path.startswith("/") or any(p in (".", "..") for p in parts) or "://" in path or "\\" in path:
        _fail(
            f"path {path[:100]!r}: the proxy forwards DICOMweb paths below the PACS root only "
            "(no absolute path, no '.' or '..')."
        )


def _check_dicom_seg_output(app: Any, params: Any) -> None:
    """``output=dicom_seg``: MONAI Label answers a 500 without a DICOMweb datastore and a 404 without ``label_info``."""
    from monailabel.datastore.dicom import DICOMWebDatastore

    if not isinstance(app.datastore(), DICOMWebDatastore):
        raise InputError(
            "output=dicom_seg needs a DICOMweb datastore (--studies http://.../dicom-web); this server's "
            "datastore is a folder: ask for output=image."
        )
    if params is None or not getattr(params, "model_extra", {}).get("label_info"):
        raise InputError(
            "params.label_info: output=dicom_seg needs the segments' descriptions (a list, one per label).", status=422
        )


def check_infer_request(app: Any, kwargs: dict[str, Any]) -> None:
    """The checks of an ``/infer/{model}`` request that MONAI Label does not make, before it does any work.

    Raises:
        InputError: 404 unknown model, image or session; 400 invalid id or a label file; 422 invalid params
            (naming the field); 403 ``save_label`` in read-only mode.
    """
    model = kwargs.get("model")
    task = app._infers.get(model)
    if task is None:
        raise HTTPException(status_code=404, detail=f"Unknown model {model!r}; this server has {sorted(app._infers)}.")
    try:
        if kwargs.get("label") is not None:
            raise InputError("label: the models of this app take no label file; send clicks and boxes in params.")
        schema = getattr(task, "params_schema", None)
        params = parse_params(schema, kwargs.get("params")) if schema is not None else None
        if params is not None:
            if params.model is not None and params.model != model:
                raise InputError(
                    f"params.model {params.model!r} contradicts the model in the URL ({model!r}); "
                    "leave it out: the URL names the model that runs.",
                    status=422,
                )
            if params.image is not None and params.image != kwargs.get("image"):
                raise InputError(
                    f"params.image {params.image!r} contradicts the image in the URL "
                    f"({kwargs.get('image')!r}); leave it out: the URL names the image.",
                    status=422,
                )
            if params.save_label:
                refuse_if_read_only("results stored with save_label")
        if getattr(kwargs.get("output"), "value", kwargs.get("output")) == "dicom_seg":
            _check_dicom_seg_output(app, params)
        if kwargs.get("session_id"):
            check_id(kwargs["session_id"], "session_id")
            sessions = app.sessions()
            if sessions is None or sessions.get_session(kwargs["session_id"], update_ts=False) is None:
                raise InputError(
                    f"Session {kwargs['session_id']!r} not found (sessions expire after MONAI_LABEL_SESSION_EXPIRY).",
                    status=404,
                )
        image = kwargs.get("image") or ""
        if kwargs.get("file") is None and not kwargs.get("session_id"):
            if not image:
                raise InputError("image is empty: pass the id of a datastore image, or upload the image as 'file'.")
            check_id(image, "image")
            if not app.datastore().get_image_uri(image):
                raise InputError(f"Image {image!r} is not in the datastore.", status=404)
        elif image and not kwargs.get("session_id"):
            check_id(image, "image")
    except InputError as e:
        logger.info(f"Rejected infer request for {model!r}: {e}")
        raise http_error(e) from e


CHECKS: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "infer": check_infer_request,
    "image": _check_image,
    "checksum": _check_checksum,
    "label": _check_label,
    "trainer": _known("model", "_trainers", "model"),
    "strategy": _known("strategy", "_strategies", "strategy"),
    "scoring": _known("scoring method", "_scoring_methods", "method"),
    "dataset": _check_dataset,
    "session": _check_session,
    "proxy": _check_proxy,
}


# ---------------------------------------------------------------- wrapping
def _cleanup(kwargs: dict[str, Any]) -> None:
    """Run the request's pending cleanup tasks (MONAI Label's ``remove_file`` of its temporary copies)."""
    from monailabel.utils.others.generic import remove_file

    tasks = getattr(kwargs.get("background_tasks"), "tasks", None) or []
    for task in [t for t in tasks if getattr(t, "func", None) is remove_file]:
        try:
            task.func(*task.args, **task.kwargs)
        except OSError as e:
            logger.debug(f"Cleanup of {task.args}: {e}")
        tasks.remove(task)


def _after(rule: Rule, response: Any) -> Any:
    if rule.remove_after_send and getattr(response, "path", None):
        from monailabel.utils.others.generic import remove_file
        from starlette.background import BackgroundTask

        response.background = BackgroundTask(remove_file, response.path)
    return response


def _wrap(endpoint: Callable, rule: Rule, app: Any) -> Callable:
    """A function with ``endpoint``'s signature: the checks, then MONAI Label's endpoint (in a worker thread if
    ``rule.threaded``).

    FastAPI reads the signature (``__signature__``) to resolve parameters and runs plain
    functions in its thread pool; ``__wrapped__`` is deliberately not set, since FastAPI
    would follow it back to the coroutine function.
    """
    checks = [CHECKS[name] for name in rule.checks]

    def before(kwargs: dict[str, Any]) -> None:
        if rule.writes:
            refuse_if_read_only(rule.writes)
        check_arguments(kwargs)
        for check in checks:
            check(app, kwargs)

    if rule.threaded or not inspect.iscoroutinefunction(endpoint):  # a plain function blocks: the thread pool

        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                before(kwargs)
                result = endpoint(*args, **kwargs)
                return _after(rule, asyncio.run(result) if inspect.isawaitable(result) else result)
            except BaseException:
                _cleanup(kwargs)
                raise
    else:

        async def run(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            try:
                before(kwargs)
                return _after(rule, await endpoint(*args, **kwargs))
            except BaseException:
                _cleanup(kwargs)
                raise

    run.__signature__ = inspect.signature(endpoint, eval_str=True)  # type: ignore[attr-defined]
    run.__name__, run.__doc__, run.__module__ = endpoint.__name__, endpoint.__doc__, endpoint.__module__
    run.checked = True  # type: ignore[attr-defined]
    return run


def _routers(router: Any, prefix: str = "") -> list[tuple[Any, str]]:
    """``(router, prefix)`` of ``router`` and every router included in it (FastAPI keeps them as their own objects)."""
    out = [(router, prefix)]
    for route in router.routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            context = getattr(route, "include_context", None)
            out += _routers(included, prefix + (getattr(context, "prefix", "") or ""))
    return out


def _keys(route: Any, prefix: str) -> set[tuple[str, str]]:
    methods = getattr(route, "methods", None)
    path = prefix + route.path
    return {(m, path) for m in methods} if methods else {("*", path)}


def mounted_routes(fastapi_app: Any) -> set[tuple[str, str]]:
    """``{(method, path)}`` of every route the server answers (``("*", path)`` for a mount)."""
    from fastapi.routing import iter_route_contexts

    out = set()
    for route in iter_route_contexts(fastapi_app.routes):
        methods = route.methods
        out |= {(m, route.path) for m in methods} if methods else {("*", route.path)}
    return out


def _server_app() -> Any:
    server = sys.modules.get("monailabel.app")
    return None if server is None else server.app


def install(app: Any) -> None:
    """Apply :data:`ROUTES` to the running server, and install the error handlers and the origin rules.

    Called from the app's ``__init__``, which MONAI Label runs in the server's start-up
    (lifespan), after FastAPI built its middleware stack: the stack is rebuilt on the next request.
    Training and scoring subprocesses build the app without the web server: nothing to do there.
    """
    fastapi_app = _server_app()
    if fastapi_app is None:
        return
    from fastapi.routing import APIRoute

    pacs = str(getattr(app, "studies", "")).startswith(("http://", "https://"))
    removed, unreviewed, wrapped = [], [], []
    for router, prefix in _routers(fastapi_app.router):
        kept = []
        for route in router.routes:
            if getattr(route, "original_router", None) is not None:
                kept.append(route)
                continue
            keys = sorted(_keys(route, prefix))
            rules = [ROUTES.get(key) for key in keys]
            if any(rule is None for rule in rules):
                unreviewed += sorted(f"{m} {p}" for (m, p), r in zip(keys, rules) if r is None)
                continue
            if not all(rule.keep and (pacs or not rule.pacs_only) for rule in rules):
                removed += sorted(f"{m} {p}" for m, p in keys)
                continue
            if isinstance(route, APIRoute) and not getattr(route.endpoint, "checked", False):
                if len(set(rules)) != 1:
                    raise RuntimeError(f"{sorted(keys)}: one route, several reviews in ROUTES; give them one rule")
                # the datastore's own upload and download endpoints where MONAI Label's lose or tear data
                replacements = {datastore_endpoints.ENDPOINTS[k] for k in keys if k in datastore_endpoints.ENDPOINTS}
                if len(replacements) > 1:
                    raise RuntimeError(f"{sorted(keys)}: several replacement endpoints for one route")
                endpoint = replacements.pop() if replacements else route.endpoint
                route = APIRoute(
                    route.path,
                    _wrap(endpoint, rules[0], app),
                    methods=list(route.methods),
                    name=route.name,
                    summary=route.summary,
                    description=route.description,
                    tags=route.tags,
                    responses=route.responses,
                    dependencies=route.dependencies,
                    include_in_schema=route.include_in_schema,
                    deprecated=route.deprecated,
                )
                wrapped.append(f"{'/'.join(sorted(route.methods))} {prefix}{route.path}")
            kept.append(route)
        if len(kept) != len(router.routes) or wrapped:
            router.routes[:] = kept
            if hasattr(router, "_mark_routes_changed"):
                router._mark_routes_changed()  # FastAPI caches the routes of included routers by version
    if unreviewed:
        logger.warning(f"Routes not in lib/routes.py ROUTES, not mounted (review them): {unreviewed}")
    logger.info(f"Routes not mounted: {sorted(removed)}")
    logger.info(f"Routes mounted behind the app's checks: {len(wrapped)}")
    _install_middleware(fastapi_app, app)


def _install_middleware(fastapi_app: Any, app: Any) -> None:
    """The error handlers, and CORS for the allowed origins plus :class:`lib.origin.SameOriginGuard`, in place of
    MONAI Label's allow-all ``CORSMiddleware``."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    allowed = getattr(app, "allowed_origins", ())
    errors.install(fastapi_app)
    others = [m for m in fastapi_app.user_middleware if m.cls is not CORSMiddleware]
    guard = Middleware(origin.SameOriginGuard, allowed=allowed)
    fastapi_app.user_middleware[:] = [origin.cors_middleware(allowed), guard, *others]
    fastapi_app.middleware_stack = None  # rebuilt on the next request, with the handlers and the middleware above
    logger.info(f"Cross-origin access: {list(allowed) if allowed else 'none (same origin only)'}")
