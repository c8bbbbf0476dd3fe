"""The pinned set installs and imports together (a broken pin fails here, not in a user's hands)."""

import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "monailabel.interfaces.app",  # fails with pydicom 3
        "monailabel.interfaces.tasks.infer_v2",
        "monailabel.interfaces.tasks.train",
        "monailabel.tasks.infer.basic_infer",
        "monailabel.tasks.infer.bundle",
        "monailabel.tasks.train.basic_train",
        "monailabel.tasks.train.bundle",
        "monailabel.client",
        "monai.bundle",
        "ignite.engine",
        "sam2.modeling.sam2_base",
        "sam2.sam2_video_predictor",
        "torchvision.ops",
        "model_core",
    ],
)
def test_imports(module):
    importlib.import_module(module)


def test_monailabel_app_class_and_torchvision_ops():
    from monailabel.interfaces.app import MONAILabelApp
    import torch
    import torchvision

    assert MONAILabelApp.__name__ == "MONAILabelApp"
    # "operator torchvision::nms does not exist" appears when torch and torchvision do not pair
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0]
