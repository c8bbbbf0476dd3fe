"""The bundle's static files: metadata.json against MONAI's schema, large_files.yml, logging.conf.

Offline by design: the official schema is read from ``../shared/reference`` (kept
there because the machines have no network) and copied to the path that
``verify_metadata`` would download it to; ``monai.apps.download_url`` skips the
download when that file exists.
"""

from __future__ import annotations

import json
import logging
import logging.config
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundle"
META_FILE = BUNDLE / "configs" / "metadata.json"
SCHEMA_NAME = "meta_schema_20240725.json"
SCHEMA_FILE = REPO.parent / "shared" / "reference" / SCHEMA_NAME


@pytest.fixture(scope="module")
def schema_file() -> Path:
    if not SCHEMA_FILE.is_file():
        pytest.skip(
            f"MONAI's metadata schema is not at {SCHEMA_FILE} (the shared/ folder beside the checkout); "
            "without it the check would have to download the schema."
        )
    return SCHEMA_FILE


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads(META_FILE.read_text())


def test_metadata_valid_against_schema(schema_file, metadata):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed to validate metadata.json")
    schema = json.loads(schema_file.read_text())
    # the URL in metadata.json names the schema this file is a copy of
    assert metadata["schema"].rsplit("/", 1)[-1] == SCHEMA_NAME
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(metadata), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors)


def test_metadata_values(metadata):
    assert metadata["version"] in metadata["changelog"]
    fmt = metadata["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["num_channels"] == 3 and len(image["channel_def"]) == 3
    assert image["value_range"] == [0, 1] and image["dtype"] == "float32"
    assert image["spatial_shape"] == pred["spatial_shape"]
    assert pred["num_channels"] == len(pred["channel_def"]) == 1


@pytest.mark.slow
def test_verify_metadata_cli_offline(schema_file, tmp_path):
    pytest.importorskip("jsonschema", reason="monai's verify_metadata needs jsonschema")
    local_schema = tmp_path / "schema.json"
    shutil.copyfile(schema_file, local_schema)
    cmd = [
        sys.executable, "-m", "monai.bundle", "verify_metadata",
        "--meta_file", str(META_FILE),
        "--filepath", str(local_schema),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "skipped downloading" in out, f"verify_metadata did not use the local schema:\n{out}"
    assert "metadata is verified with no error" in out, out
    assert local_schema.read_bytes() == schema_file.read_bytes()


def _catalog() -> list[tuple[str, str]]:
    """(name, url) rows of ``scripts/download_checkpoints.sh --list``."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "download_checkpoints.sh"), "--list"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    rows = [line.split("\t") for line in proc.stdout.splitlines() if line.strip()]
    assert rows and all(len(r) == 4 for r in rows), proc.stdout
    return [(r[0], r[3]) for r in rows]


def test_large_files_match_download_script():
    large = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    catalog = _catalog()
    got = [(Path(e["path"]).name, e["url"]) for e in large]
    # the script saves each checkpoint as DEST/<file name in its URL>; the bundle's DEST is models/
    want = [(url.rsplit("/", 1)[-1], url) for _, url in catalog]
    assert got == want
    for entry, (name, _) in zip(large, catalog):
        path = Path(entry["path"])
        assert path.parent == Path("models") and path.stem == name, entry
        # keys download_large_files passes on to monai.apps.download_url
        assert set(entry) <= {"path", "url", "hash_val", "hash_type"}, entry


def test_logging_conf_parses():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        logging.config.fileConfig(BUNDLE / "configs" / "logging.conf", disable_existing_loggers=False)
        assert root.level == logging.INFO
        assert any(isinstance(h, logging.StreamHandler) for h in root.handlers)
    finally:
        for h in list(root.handlers):
            if h not in saved[1]:
                root.removeHandler(h)
                h.close()
        for h in saved[1]:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved[0])


@pytest.mark.slow
def test_verify_net_in_out_on_the_declared_input_and_output(tmp_path):
    """MONAI's verify_net_in_out builds ``slice_network`` (the network with its support set bound in)
    and checks a forward pass on fake data of metadata.json's declared input shape and dtype."""
    from model_core.io.phantoms import write_phantom_dataset as make_dataset

    datalist = make_dataset(str(tmp_path / "data"), train=1, validation=0, test=0, shape=(6, 64, 64))
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_net_in_out",
        "slice_network",
        "--meta_file",
        str(META_FILE),
        "--config_file",
        str([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "inference.json")]),
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--datalist_file",
        datalist,
        "--intensity#window",
        "[0,1]",
        "--classes",
        "[1]",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data shape of network is verified with no error" in out.stdout + out.stderr
    # and it does fail when the output disagrees with the metadata: two structures, one declared channel
    bad = subprocess.run([*cmd[:-1], "[1,2]"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "output" in bad.stderr.lower()
