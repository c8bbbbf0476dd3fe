"""Lesion proposals through the bundle (``proposals.json`` layered on ``train.json``): a candidate label map in
the input's original space and a JSON of the candidates' scores beside it."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from model_core import build_icl_sam2, save_checkpoint
from tests.model_core.proposal_phantom import write_lesion_phantom

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64

pytestmark = pytest.mark.slow  # the bundle's whole workflow


def test_proposals_bundle_writes_candidates_and_scores(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(build_icl_sam2("tiny", image_size=SIZE), str(ckpt))
    query, _affine = write_lesion_phantom(tmp_path / "query.nii.gz")
    out = tmp_path / "out"
    # in-process, as `python -m monai.bundle run --config_file
    # "['bundle/configs/train.json','bundle/configs/proposals.json']"
    # --preset tiny ... --proposal_settings#points_per_side 4 ...` runs it (the README's command)
    workflow = ConfigWorkflow(
        config_file=[str(ROOT / "bundle/configs/train.json"), str(ROOT / "bundle/configs/proposals.json")],
        meta_file=str(ROOT / "bundle/configs/metadata.json"),
        bundle_root=str(ROOT / "bundle"),
        preset="tiny",
        image_size=SIZE,
        device="$torch.device('cpu')",
        checkpoint=str(ckpt),
        modality="MRI",
        query_images=[str(query)],
        output_dir=str(out),
        **{
            "proposal_settings#points_per_side": 4,
            "proposal_settings#pred_iou_thresh": 0.0,
            "proposal_settings#stability_score_thresh": 0.0,
            "proposal_settings#max_slice_fraction": 0.5,
            "proposal_settings#max_volume_mm3": 4000.0,
        },
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    label = nib.load(str(out / "query_proposals.nii.gz"))
    original = nib.load(str(query))
    assert label.shape == original.shape and np.allclose(label.affine, original.affine, atol=1e-5)
    array = np.asarray(label.dataobj)
    record = json.loads((out / "query_proposals.json").read_text())
    assert record["label_file"] == "query_proposals.nii.gz" and record["image"].endswith("query.nii.gz")
    assert record["settings"]["points_per_side"] == 4 and record["settings"]["max_volume_mm3"] == 4000.0
    candidates = record["candidates"]
    assert len(candidates) == record["counts"]["candidates"] > 0
    assert record["counts"]["generator_masks"] >= record["counts"]["linked_components"] >= len(candidates)
    assert (
        sorted(set(np.unique(array).tolist()) - {0})
        == [c["label"] for c in candidates]
        == list(range(1, len(candidates) + 1))
    )
    for c in candidates:
        where = np.argwhere(array == c["label"])
        assert c["voxels"] == len(where) and c["bbox"] == [where.min(0).tolist(), where.max(0).tolist()]
        assert c["slices"] == sorted(set(where[:, 2].tolist()))
        assert c["model_voxels"] > 0 and c["masks"] >= 1 and 0 <= c["score"] <= 1
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True)
