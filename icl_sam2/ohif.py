"""The current OHIF viewer (npm's prebuilt ``@ohif/app``) on a PACS, storing segmentations back to it as DICOM SEG.

    icl-sam2 ohif install                                             # once (scripts/setup.sh runs it)
    icl-sam2 ohif serve --dicomweb http://127.0.0.1:8042/dicom-web --port 3000
    # open http://127.0.0.1:3000/ : the study list of the PACS; "Segmentation" mode; brush; store as SEG

MONAI Label bundles an OHIF 3.10 beta with its own panel; the OHIF of today (3.13) ships as a
prebuilt single-page app in npm's ``@ohif/app`` package (``dist/``: static files, no server).
What it lacks to run against a local Orthanc, and what this module adds:

- **A pinned, checked copy, installed once.** :func:`install` runs ``npm pack`` for
  :data:`OHIF_VERSION`, refuses a tarball whose SHA-512 is not :data:`OHIF_INTEGRITY`
  (npm's ``dist.integrity`` of that release), and unpacks ``dist/`` into :func:`ohif_dir`
  (``.ohif/`` in the checkout, ignored by git). Nothing is downloaded when the viewer runs.
- **One origin for viewer and PACS.** Orthanc sends no CORS headers, so a viewer on another
  origin cannot read its DICOMweb. :func:`viewer_app` serves ``dist/`` and a reverse proxy
  of the PACS's DICOMweb root at ``/dicom-web`` from the same loopback address (with the
  ``Forwarded`` header, so the bulk-data URLs Orthanc writes into metadata point back at the
  proxy), and falls back to ``index.html`` for the app's own routes (``/viewer``,
  ``/segmentation``), as the package's ``_redirects`` asks of a host.
- **Our configuration.** ``/app-config.js`` is written at serve time (:func:`app_config`):
  one DICOMweb data source on the proxy with STOW-RS enabled (``supportsStow``), so OHIF's
  Segmentation mode stores a brushed segmentation in the PACS as a DICOM SEG
  (segmentation panel menu, "Export" > "DICOM SEG" ... or the store dialog), and the
  investigational-use banner off.

:class:`OhifViewer` runs the same app in a background thread (tests, demos).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from icl_sam2.servers import free_port

__all__ = [
    "OHIF_INTEGRITY",
    "OHIF_PACKAGE",
    "OHIF_VERSION",
    "OhifViewer",
    "app_config",
    "install",
    "missing",
    "ohif_dir",
    "serve",
    "viewer_app",
]

OHIF_PACKAGE = "@ohif/app"
#: the release served; changing it needs its integrity below (``npm view @ohif/app@<version> dist.integrity``)
OHIF_VERSION = "3.13.2"
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
ROOT = Path(__file__).resolve().parents[1]
DICOMWEB_PREFIX = "/dicom-web"
#: request headers passed to the PACS (everything else, cookies included, stays with the viewer)
FORWARDED_REQUEST_HEADERS = ("accept", "content-type", "content-length", "range", "if-none-match", "if-modified-since")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authenticate"}
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
PROXY_METHODS = ("GET", "HEAD", "POST")  # QIDO-RS, WADO-RS, STOW-RS; no DELETE through the viewer


def ohif_dir(version: str = OHIF_VERSION) -> Path:
    """Where the viewer's ``dist/`` is installed: ``ICL_SAM2_OHIF_DIR`` if set, else ``.ohif/app-<version>/dist``."""
    configured = os.environ.get("ICL_SAM2_OHIF_DIR")
    return Path(configured) if configured else ROOT / ".ohif" / f"app-{version}" / "dist"


def missing(dist: Path | None = None) -> str:
    """Why the viewer cannot be served (a sentence), or ``""`` when it is installed."""
    dist = Path(dist) if dist else ohif_dir()
    if (dist / "index.html").is_file() and (dist / "app-config.js").is_file():
        return ""
    return f"OHIF {OHIF_VERSION} is not installed in {dist}; run `icl-sam2 ohif install` (or bash scripts/setup.sh)."


def _integrity(path: Path) -> str:
    """npm's Subresource-Integrity form of a file's SHA-512 (``sha512-<base64>``)."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def install(dest: str | os.PathLike | None = None, npm: str = "npm", tarball: str | os.PathLike | None = None) -> Path:
    """Install the pinned viewer: ``npm pack @ohif/app@OHIF_VERSION``, check its SHA-512, unpack ``dist/``.

    Args:
        dest: the ``dist`` folder to create (default :func:`ohif_dir`); an installed one is kept.
        npm: the npm command.
        tarball: an ``ohif-app-<version>.tgz`` already at hand instead of ``npm pack`` (checked the same way).

    Returns:
        The ``dist`` folder.

    Raises:
        ValueError: npm is missing or failed, or the tarball's SHA-512 is not :data:`OHIF_INTEGRITY`.
    """
    dist = Path(dest) if dest else ohif_dir()
    if not missing(dist):
        return dist
    with tempfile.TemporaryDirectory(prefix="icl_sam2_ohif_") as work:
        work = Path(work)
        if tarball is None:
            if shutil.which(npm) is None:
                raise ValueError(f"{npm!r} is not installed; install Node.js and npm (Debian: apt-get install npm).")
            done = subprocess.run(
                [npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--pack-destination", str(work), "--json"],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if done.returncode != 0:
                raise ValueError(f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} failed: {done.stderr.strip()[-2000:]}")
            tarball = work / json.loads(done.stdout)[0]["filename"]
        tarball = Path(tarball)
        found = _integrity(tarball)
        if found != OHIF_INTEGRITY:
            raise ValueError(
                f"{tarball.name} has integrity {found}, not the pinned {OHIF_INTEGRITY} of "
                f"{OHIF_PACKAGE}@{OHIF_VERSION}; refusing to install it."
            )
        staged = work / "unpacked"
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            archive.extractall(staged, members=members, filter="data")
        dist.parent.mkdir(parents=True, exist_ok=True)
        partial = dist.with_name(f"{dist.name}.{os.getpid()}.tmp")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(staged / "package" / "dist"), partial)
        try:
            os.rename(partial, dist)  # whole or not at all
        except OSError:  # installed meanwhile by another process
            shutil.rmtree(partial, ignore_errors=True)
    return dist


def app_config(name: str = "Orthanc") -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source on this origin's ``/dicom-web`` proxy, STOW-RS on.

    The roots are made absolute in the browser (``window.location.origin``), as OHIF's DICOMweb
    client needs full URLs. ``supportsStow`` lets the segmentation store dialog offer the PACS.
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "pacs",
        "configuration": {
            "friendlyName": name,
            "name": "pacs",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "supportsStow": True,
            "dicomUploadEnabled": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
            # OHIF 3.13 stores Label Map Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.7, DICOM 2024c) in RLE by
            # default, which pydicom-seg, dcmqi and so MONAI Label's datastore cannot read ("DICOM dataset is not a
            # DICOM-SEG storage"): store the classic binary Segmentation Storage, uncompressed, as everyone reads it
            "segmentation": {"store": {"defaultMode": "bitmap", "transferSyntaxUID": EXPLICIT_VR_LITTLE_ENDIAN}},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "pacs",
        "dataSources": [source],
    }
    roots = "".join(
        f"window.config.dataSources[0].configuration.{key} = window.location.origin + '{DICOMWEB_PREFIX}';\n"
        for key in ("qidoRoot", "wadoRoot", "wadoUriRoot")
    )
    header = f"/* written by icl-sam2 ohif serve (OHIF {OHIF_VERSION}) */"
    return f"{header}\nwindow.config = {json.dumps(config, indent=2)};\n{roots}"


def viewer_app(dicomweb: str, dist: str | os.PathLike | None = None, name: str = "Orthanc"):
    """The viewer's web app (Starlette): ``dist/`` with our ``/app-config.js``, and ``/dicom-web`` proxied to the PACS.

    Args:
        dicomweb: the PACS's DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        dist: the installed ``dist`` folder (default :func:`ohif_dir`).
        name: the data source's name shown by OHIF.

    Raises:
        ValueError: the viewer is not installed, or ``dicomweb`` is no http(s) URL.
    """
    dist = Path(dist) if dist else ohif_dir()
    reason = missing(dist)
    if reason:
        raise ValueError(reason)
    upstream = str(dicomweb).rstrip("/")
    if not upstream.startswith(("http://", "https://")):
        raise ValueError(
            f"--dicomweb {dicomweb!r} must be the PACS's DICOMweb root URL, e.g. http://127.0.0.1:8042/dicom-web."
        )
    config_js = app_config(name)

    class SinglePageApp(StaticFiles):
        """``dist/``'s files; any other path is one of the app's routes: ``index.html`` (``_redirects``)."""

        async def get_response(self, path, scope):
            try:
                return await super().get_response(path, scope)
            except HTTPException as e:
                if e.status_code != 404 or "." in path.rsplit("/", 1)[-1]:
                    raise
                return await super().get_response("index.html", scope)

    client = httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    async def config(request):
        return Response(config_js, media_type="application/javascript", headers={"Cache-Control": "no-store"})

    async def proxy(request):
        path = request.path_params["path"]
        if ".." in path.split("/"):
            return PlainTextResponse("No '..' in DICOMweb paths.", status_code=400)
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
        # where the browser reached us: Orthanc writes BulkDataURIs for that origin instead of its own
        headers["Forwarded"] = f"host={request.headers.get('host', '127.0.0.1')};proto={request.url.scheme}"
        outgoing = client.build_request(
            request.method,
            f"{upstream}/{path}",
            params=request.query_params.multi_items(),
            headers=headers,
            content=request.stream() if request.method == "POST" else None,
        )
        try:
            reply = await client.send(outgoing, stream=True)
        except httpx.HTTPError as e:
            return PlainTextResponse(
                f"The PACS at {upstream} did not answer ({type(e).__name__}: {e}).", status_code=502
            )
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            reply.aiter_raw(),
            status_code=reply.status_code,
            headers=out_headers,
            background=BackgroundTask(reply.aclose),
        )

    app = Starlette(
        routes=[
            Route("/app-config.js", config),
            Route(DICOMWEB_PREFIX + "/{path:path}", proxy, methods=list(PROXY_METHODS)),
            Mount("/", SinglePageApp(directory=str(dist), html=True)),
        ],
        lifespan=lifespan,
    )
    return app


class OhifViewer:
    """The viewer served by uvicorn in a background thread on ``127.0.0.1`` (tests, demos).

    Args:
        dicomweb: the PACS's DICOMweb root.
        port: the port (a free one by default).
        dist: the installed ``dist`` (default :func:`ohif_dir`).
    """

    def __init__(self, dicomweb: str, port: int | None = None, dist: str | os.PathLike | None = None):
        self.app = viewer_app(dicomweb, dist)
        self.port = int(port) if port else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> OhifViewer:
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self._thread = threading.Thread(target=self._server.run, name="ohif-viewer", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/app-config.js", timeout=5):
                    return self
            except OSError:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    self.stop()
                    raise RuntimeError(
                        f"The OHIF viewer did not answer on {self.url} within {timeout:.0f} s."
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=20)
        self._server = self._thread = None

    def __enter__(self) -> OhifViewer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(dicomweb: str = "http://127.0.0.1:8042/dicom-web", port: int = 3000, host: str = "127.0.0.1") -> None:
    """Serve OHIF on ``http://HOST:PORT/`` against the PACS's DICOMweb root until Ctrl-C.

    Args:
        dicomweb: the PACS's DICOMweb root (``icl-sam2 orthanc`` serves ``http://127.0.0.1:8042/dicom-web``).
        port: the viewer's port.
        host: the address to listen on; loopback by default: another address lets the network read the PACS and
            store into it through the proxy, with no login.
    """
    app = viewer_app(dicomweb)
    print(f"OHIF {OHIF_VERSION} on http://{host}:{port}/  (PACS {dicomweb} at /dicom-web)", flush=True)
    uvicorn.run(app, host=host, port=int(port), log_level="warning")


def install_command(dest: str | None = None, tarball: str | None = None) -> None:
    """Install the pinned OHIF (``npm pack``, SHA-512 checked) into ``dest`` (default ``.ohif/``); prints the folder."""
    print(install(dest, tarball=tarball))
