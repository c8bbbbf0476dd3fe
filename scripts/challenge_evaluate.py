"""Score challenge segmentations against references: DSC, NSD and inference seconds per case.

    python scripts/challenge_evaluate.py --seg_dir data/segs --gt_dir data/gts --output metrics.csv
    python scripts/challenge_evaluate.py --seg_dir data/segs --gt_dir data/gts --output metrics.csv --summary summary.json

Writes one CSV row per case (``case, DSC, NSD, seconds, status, error``; seconds from
``seg_dir/timing.csv`` written by scripts/challenge_infer.py) and prints the summary
(mean and median over scored cases, failed cases with their reasons) as JSON. Metric
definitions (the challenge's: NSD tolerance 2 mm in 3D, 2 pixels in 2D): :mod:`model_core.medsam_lite.challenge`.
"""

from __future__ import annotations

import json
import sys

import fire

from model_core.medsam_lite.challenge import NSD_MIN_DSC, NSD_TOLERANCE, evaluate_folder, write_summary


def main(seg_dir: str, gt_dir: str, output: str = "metrics.csv", summary: str | None = None, timing: str | None = None,
         tolerance: float = NSD_TOLERANCE, nsd_min_dsc: float | None = NSD_MIN_DSC, spacing_order: str = "array") -> None:
    """Score every case in ``gt_dir``; write ``output`` (CSV) and ``summary`` (JSON, optional); print the summary."""
    rows, result = evaluate_folder(seg_dir, gt_dir, output, timing_csv=timing, tolerance=tolerance,
                                   nsd_min_dsc=nsd_min_dsc, spacing_order=spacing_order)
    if summary:
        write_summary(result, summary)
    for row in rows:
        if row.status != "ok":
            print(f"challenge_evaluate: {row.case}: {row.error}", file=sys.stderr)
    print(json.dumps({**result, "output": output}))


if __name__ == "__main__":
    try:
        fire.Fire(main)
    except ValueError as e:
        sys.exit(f"challenge_evaluate: {e}")
