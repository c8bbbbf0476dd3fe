"""The app on real MRI: a study cut from Colin27 T1 + AAL (Debian's mricron-data), through the real server."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from model_core.io.mricron import available, make_study

from .conftest import Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not available(), reason="needs Debian's mricron-data (apt-get install mricron-data; .ci/run does)"
    ),
]


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    root = tmp_path_factory.mktemp("brain")
    datalist = json.loads(open(make_study(str(root / "src"))).read())
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    support = datalist["training"][0]
    shutil.copy(root / "src" / support["image"], studies / "support_t1.nii.gz")
    # a stored label holds only the configured structures (the datastore's rule): the atlas' other regions are
    # background
    atlas = nib.load(str(root / "src" / support["label"]))
    regions = np.asarray(atlas.dataobj)
    kept = np.where(np.isin(regions, list(datalist["labels"].values())), regions, 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(kept, atlas.affine, atlas.header), str(studies / "labels" / "final" / "support_t1.nii.gz"))
    for case in datalist["validation"]:
        shutil.copy(root / "src" / case["image"], studies / case["image"].split("/")[-1])
    server = Server(
        studies,
        {
            "preset": "tiny",
            "image_size": "64",
            "labels": json.dumps(datalist["labels"]),
            "modality": "MRI",
            "device": "cpu",
            "checkpoint": str(root / "none.pt"),
        },
        root / "server.log",
    )
    yield {
        "root": root,
        "studies": studies,
        "labels": datalist["labels"],
        "server": server,
        "client": MONAILabelClient(server.url, tmpdir=str(root / "client")),
    }
    server.stop()


def test_in_context_and_interactive_on_real_mri_in_the_image_space(brain):
    client, labels = brain["client"], brain["labels"]
    assert client.next_sample("first", {})["id"] in ("upper_t1", "lower_t1")
    for image_id in ("upper_t1", "lower_t1"):  # stored LPS, and with the slice axis first (S, R, A)
        image = nib.load(str(brain["studies"] / f"{image_id}.nii.gz"))
        path, info = client.infer("icl_sam2", image_id, {})
        result = nib.load(path)
        assert result.shape == image.shape and np.allclose(result.affine, image.affine)
        assert set(np.unique(np.asarray(result.dataobj)).tolist()) <= {0, *labels.values()}
        assert set(info["confidence"]) == set(labels)
    # a click in the middle of the lower slab, in its own voxel indices
    image = nib.load(str(brain["studies"] / "lower_t1.nii.gz"))
    centre = [s // 2 for s in image.shape]
    name = next(iter(labels))
    path, info = client.infer("icl_sam2_interactive", "lower_t1", {"foreground": [centre], "label": name})
    result = nib.load(path)
    assert result.shape == image.shape and np.allclose(result.affine, image.affine)
    assert set(np.unique(np.asarray(result.dataobj)).tolist()) <= {0, labels[name]}
    _, again = client.infer(
        "icl_sam2_interactive", "lower_t1", {"foreground": [centre, [c + 1 for c in centre]], "label": name}
    )
    assert again["encoded_slices"] == 0
