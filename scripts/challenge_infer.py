"""Segment a folder of CVPR 2024 "MedSAM on Laptop" challenge cases with LiteMedSAM (pretrained, offline).

    python scripts/challenge_infer.py --input_dir data/imgs --output_dir data/segs
    python scripts/challenge_infer.py --input_dir data/imgs --output_dir data/segs --on_empty box --precision bf16

Reads ``input_dir/*.npz`` (``imgs``, ``boxes``), writes ``output_dir/<case>.npz`` (``segs``)
and ``output_dir/timing.csv`` (seconds per case, and why a case failed). A broken case is
reported and the others still run. Format, 3D rule and options: :mod:`model_core.medsam_lite.challenge`
and :meth:`model_core.medsam_lite.model.LiteMedSAM.segment_volume`.
"""

from __future__ import annotations

import json
import sys

import fire

from model_core.medsam_lite.challenge import infer_folder


def main(input_dir: str, output_dir: str, device: str = "cpu", precision: str = "fp32", on_empty: str = "stop",
         min_iou: float | None = None) -> None:
    """Segment every case; print one JSON line per case and a summary line."""
    runs = infer_folder(input_dir, output_dir, device=device, precision=precision, on_empty=on_empty,
                        min_iou=min_iou)
    for run in runs:
        print(json.dumps(run.__dict__))
        if run.status != "ok":
            print(f"challenge_infer: {run.error}", file=sys.stderr)
    failed = [r.case for r in runs if r.status != "ok"]
    print(json.dumps({"cases": len(runs), "ok": len(runs) - len(failed), "failed": failed,
                      "seconds": round(sum(r.seconds for r in runs), 3), "output_dir": output_dir}))


if __name__ == "__main__":
    try:
        fire.Fire(main)
    except ValueError as e:  # a boundary error: say what is wrong, without a traceback
        sys.exit(f"challenge_infer: {e}")
