"""Time of automatic lesion proposals (sam2's automatic mask generator per slice, then the 3D merge).

    python scripts/benchmark_proposals.py                               # sam2.1_hiera_tiny at 512 px, 2 slices, CPU
    python scripts/benchmark_proposals.py --points_per_side "[8, 16, 32]" --device cuda --slices 8

Random weights on phantom slices: the numbers are the generator's cost (image encoder
once per slice, the mask decoder for ``points_per_side²`` prompts x 3 masks), not its
findings. Printed per ``points_per_side``: seconds per slice, generator masks per slice,
and the share of the time spent in the 3D merge.
"""

from __future__ import annotations

import json
import time

import fire
import torch

from model_core.io.phantoms import make_phantom
from model_core.modeling.inputs import volume_to_slices
from model_core.modeling.presets import build_icl_sam2
from model_core.proposals import (
    ProposalSettings,
    build_candidates,
    generate_slice_masks,
    link_slice_masks,
    select_candidates,
)


def main(
    preset: str = "sam2.1_hiera_tiny",
    image_size: int = 512,
    slices: int = 2,
    points_per_side=(16, 32),
    device: str | None = None,
    precision: str = "fp32",
    threads: int | None = None,
) -> None:
    """Args:
    preset, image_size, precision: the network (random weights, seed 0).
    slices: phantom slices to run.
    points_per_side: one value or a list; each is timed.
    device: ``cpu`` or ``cuda`` (default: cuda when available).
    threads: torch CPU threads.
    """
    if threads:
        torch.set_num_threads(int(threads))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    network = build_icl_sam2(preset, image_size=image_size, device=device, precision=precision)
    image, _ = make_phantom((int(slices), 128, 128), seed=0)
    volume = volume_to_slices(torch.from_numpy(image), image_size)
    rows = []
    for pps in [points_per_side] if isinstance(points_per_side, int) else list(points_per_side):
        settings = ProposalSettings(points_per_side=int(pps), pred_iou_thresh=0.0, stability_score_thresh=0.0)
        generate_slice_masks(network, volume[:1], settings)  # warm-up (sam2's transforms are scripted on first use)
        start = time.perf_counter()
        per_slice = generate_slice_masks(network, volume, settings)
        generated = time.perf_counter() - start
        start = time.perf_counter()
        kept = select_candidates(
            build_candidates(per_slice, link_slice_masks(per_slice, settings.link_iou, settings.link_containment)),
            settings,
        )
        merged = time.perf_counter() - start
        rows.append(
            {
                "preset": preset,
                "image_size": image_size,
                "device": device,
                "points_per_side": int(pps),
                "seconds_per_slice": round(generated / len(per_slice), 3),
                "masks_per_slice": round(sum(map(len, per_slice)) / len(per_slice), 1),
                "candidates": len(kept),
                "merge_seconds": round(merged, 3),
            }
        )
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    fire.Fire(main)
