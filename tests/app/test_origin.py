"""Naming the web origins that may use the server (issue 19, case 9): the option works, and nothing else is allowed.

MONAI Label 0.8.5 stops at start-up when ``MONAI_LABEL_CORS_ORIGINS`` is set (``TypeError:
Object of type AnyHttpUrl is not JSON serializable``); ``icl-sam2 serve`` passes it
on as ``--conf allowed_origins``. The server here is started that way, with one origin.
The default (no origin allowed) is tested in ``test_routes.py``.
"""

from __future__ import annotations

import json

import pytest
import requests

from icl_sam2.serve import with_cors_origins
from icl_sam2.servers import ICL_SAM2_SERVE
from lib.origin import parse_origins

from . import sites
from .sites import detail, guarded

VIEWER = "http://viewer.example:3000"
EVIL = "http://evil.example"


@pytest.mark.parametrize(
    "value, origins",
    [
        ('["http://viewer.example:3000"]', ("http://viewer.example:3000",)),
        (
            '["http://viewer.example:3000/", "HTTPS://Viewer.Example:443"]',
            ("http://viewer.example:3000", "https://viewer.example"),
        ),
        ("http://a.example, http://b.example:80", ("http://a.example", "http://b.example")),
        ("[]", ()),
        ("", ()),
    ],
)
def test_origins_are_written_as_browsers_send_them(value, origins):
    assert parse_origins(value) == origins


@pytest.mark.parametrize(
    "value, message",
    [
        ('["*"]', "name the origins"),
        ('["viewer.example"]', "is not an origin"),
        ('["http://viewer.example/ohif"]', "is not an origin"),
        ('{"a": 1}', "must be a JSON list"),
    ],
)
def test_bad_origins_stop_the_server_with_a_message(value, message):
    with pytest.raises(ValueError, match=message):
        parse_origins(value)


def test_monai_label_cors_origins_becomes_our_option():
    environ = {"MONAI_LABEL_CORS_ORIGINS": f'["{VIEWER}"]', "OTHER": "1"}
    assert with_cors_origins(["--port", "1"], environ) == ["--port", "1", "--conf", "allowed_origins", f'["{VIEWER}"]']
    assert environ == {"OTHER": "1"}  # gone before MONAI Label (and its training subprocesses) read it
    given = ["--conf", "allowed_origins", "[]"]
    assert with_cors_origins(given, {"MONAI_LABEL_CORS_ORIGINS": '["http://x.example"]'}) == given


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = sites.make_site(tmp_path_factory.mktemp("origin"))
    server = sites.start(site, env={"MONAI_LABEL_CORS_ORIGINS": f'["{VIEWER}"]'}, launcher=ICL_SAM2_SERVE)
    yield site
    server.stop()


@pytest.fixture
def guard(site):
    with guarded(site):
        yield


@pytest.mark.slow
def test_a_named_origin_may_use_the_server(site, guard):
    response = requests.options(
        f"{site['url']}/datastore/label", timeout=60, headers={"Origin": VIEWER, "Access-Control-Request-Method": "PUT"}
    )
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == VIEWER
    response = requests.get(f"{site['url']}/info/", headers={"Origin": VIEWER}, timeout=60)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == VIEWER
    params = json.dumps({"foreground": [[30, 30, 8]], "label": "blob", "save_label": True, "label_tag": "viewer"})
    response = requests.post(
        f"{site['url']}/infer/icl_sam2_interactive",
        params={"image": "case1"},
        timeout=300,
        data={"params": params},
        headers={"Origin": VIEWER, "Sec-Fetch-Site": "cross-site"},
    )
    assert response.status_code == 200 and (site["studies"] / "labels" / "viewer" / "case1.nii.gz").is_file()


@pytest.mark.slow
def test_other_origins_still_may_not(site, guard):
    response = requests.get(f"{site['url']}/info/", headers={"Origin": EVIL}, timeout=60)
    assert "access-control-allow-origin" not in response.headers
    response = requests.post(f"{site['url']}/activelearning/random", json={}, headers={"Origin": EVIL}, timeout=60)
    assert response.status_code == 403 and "Cross-origin request refused" in detail(response)
