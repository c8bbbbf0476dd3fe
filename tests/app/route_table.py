"""Print the route table of the app object built the way ``start_server`` builds it, before and after start-up.

    python tests/app/route_table.py <studies> [--conf name value ...]   (run in an empty folder: --dryrun writes .env)

MONAI Label's ``Main`` parses the arguments and sets its settings (``--dryrun``: without
uvicorn), ``monailabel.app`` builds the FastAPI app with every router, and its lifespan
(run by Starlette's ``TestClient``) creates our app, whose ``__init__`` applies
``lib/routes.py``. Printed as JSON: ``upstream`` (MONAI Label's table), ``mounted``
(after start-up), ``roles`` (the role of each mounted route's ``RBAC`` dependency).
Used by ``tests/app/test_routes.py`` in a subprocess, so that MONAI Label's global
state (settings, the app instance) stays out of the test process.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _roles(fastapi_app) -> dict[str, str | None]:
    from fastapi.routing import iter_route_contexts

    out = {}
    for route in iter_route_contexts(fastapi_app.routes):
        endpoint = route.endpoint
        role = None
        if endpoint is not None:
            for parameter in inspect.signature(endpoint).parameters.values():
                dependency = getattr(parameter.default, "dependency", None)
                if dependency is not None and hasattr(dependency, "roles"):
                    role = dependency.roles
        for method in route.methods or ["*"]:
            out[f"{method} {route.path}"] = role
    return out


def main(studies: str, conf: list[str]) -> None:
    from monailabel.main import Main

    app_dir = str(ROOT / "monailabel_app")
    sys.argv = ["monailabel", "start_server", "--app", app_dir, "--studies", studies, "--dryrun", *conf]
    Main().run()
    import monailabel.app
    from starlette.testclient import TestClient

    from lib.routes import mounted_routes

    app = monailabel.app.app
    upstream = sorted(f"{m} {p}" for m, p in mounted_routes(app))
    with TestClient(app):  # the lifespan: MONAI Label creates the app instance, which installs lib/routes.py
        mounted = sorted(f"{m} {p}" for m, p in mounted_routes(app))
        roles = _roles(app)
    print("ROUTE TABLE " + json.dumps({"upstream": upstream, "mounted": mounted, "roles": roles}), flush=True)
    os._exit(0)  # MONAI Label's scheduler threads would keep the process alive


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
