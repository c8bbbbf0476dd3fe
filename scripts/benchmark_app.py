"""Latency of the MONAI Label app through the real server and client, on a 256 x 256 x 64 study.

    python scripts/benchmark_app.py                                   # tiny preset at 256 and Hiera-tiny at 512, CPU
    python scripts/benchmark_app.py --presets "['sam2.1_hiera_tiny:512']" --device cuda

For each preset (random weights; the timings do not depend on them) the server is
started on a phantom study of three 256 x 256 x 64 volumes, one labelled, and the
client times: in-context segmentation of a volume, a first interactive click on
another volume (its slices are encoded) and a follow-up click (decoder and propagation
only), with the slices each one sent through the image encoder.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

from monailabel_server import Server  # a sibling script: `python scripts/x.py` puts scripts/ on sys.path

from model_core.phantoms import PHANTOM_LABELS, make_phantom


def phantom_study(folder: Path, shape: tuple[int, int, int]) -> None:
    (folder / "labels" / "final").mkdir(parents=True)
    for i in range(3):
        image, label = make_phantom((shape[2], shape[0], shape[1]), seed=i)  # (D, H, W)
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        nib.save(nib.Nifti1Image(image.transpose(1, 2, 0).astype(np.float32), affine), str(folder / f"case{i}.nii.gz"))
        if i == 0:
            nib.save(nib.Nifti1Image(label.transpose(1, 2, 0).astype(np.uint8), affine),
                     str(folder / "labels" / "final" / "case0.nii.gz"))


def _timed(client, model, image, params):
    start = time.perf_counter()
    _, info = client.infer(model, image, params)
    info = json.loads(info) if isinstance(info, (bytes, str)) else info
    return time.perf_counter() - start, info["encoded_slices"]


def main(presets=("tiny:256", "sam2.1_hiera_tiny:512"), shape=(256, 256, 64), device: str = "cpu") -> None:
    """Args:
        presets: ``preset:image_size`` entries.
        shape: ``(i, j, k)`` of each volume (k: slices).
        device: ``cpu`` or ``cuda``.
    """
    from monailabel.client import MONAILabelClient

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        phantom_study(studies, tuple(shape))
        centre = [shape[0] // 2, shape[1] // 2, shape[2] // 2]
        for entry in presets:
            preset, size = entry.split(":")
            server = Server(studies, {"preset": preset, "image_size": size, "device": device,
                                      "labels": json.dumps(dict(PHANTOM_LABELS)),
                                      "window": "[0, 1]", "checkpoint": f"{tmp}/none.pt"}, Path(tmp) / f"{preset}.log")
            try:
                client = MONAILabelClient(server.url, tmpdir=f"{tmp}/client")
                in_context = _timed(client, "icl_sam2", "case1", {})
                first = _timed(client, "icl_sam2_interactive", "case2", {"foreground": [centre], "label": "blob"})
                follow = _timed(client, "icl_sam2_interactive", "case2",
                                {"foreground": [centre, [centre[0] + 4, centre[1], centre[2] + 2]], "label": "blob"})
            finally:
                server.stop()
            rows.append((entry, in_context, first, follow))
    print(f"\nMONAI Label app, {shape[0]}x{shape[1]}x{shape[2]} volumes, device {device} "
          "(seconds through the REST API; slices encoded in brackets)")
    print(f"  {'preset:size':<24} {'in-context':>16} {'first click':>16} {'follow-up click':>18}")
    for entry, a, b, c in rows:
        print(f"  {entry:<24} {a[0]:>9.2f} s [{a[1]:>3}] {b[0]:>9.2f} s [{b[1]:>3}] {c[0]:>11.2f} s [{c[1]:>3}]")


if __name__ == "__main__":
    fire.Fire(main)
