"""Write a datalist's labelled volumes as a COCO dataset of PNG slices, and check one against the labels.

    python scripts/nifti_to_coco.py export --datalist data/datalist.json --output_dir coco
    python scripts/nifti_to_coco.py export --datalist d.json --output_dir coco --splits training,validation \\
        --encoding polygon --instances label --axis coronal --include_empty --modality MRI
    python scripts/nifti_to_coco.py verify --coco_json coco/annotations/instances_training.json

``export`` prints one JSON line per run (per split: the COCO file and its counts); ``verify`` prints its
report as JSON and exits with status 1 when any voxel differs. Layout, geometry, image ids and the
annotation rules are described in :mod:`model_core.export.coco`, which does the work; this is its command line.
"""

from __future__ import annotations

import json
import sys

import fire

from model_core.export.coco import export_coco, verify_coco


def export(
    datalist: str,
    output_dir: str,
    splits: str | list[str] = "training",
    axis: str | int = "axial",
    encoding: str = "rle",
    instances: str = "region",
    include_empty: bool | str = False,
    modality: str = "CT",
    window: list[float] | tuple[float, float] = (-200.0, 300.0),
    percentiles: list[float] | tuple[float, float] = (0.5, 99.5),
    labels: dict | str | None = None,
    unlisted: str = "error",
) -> None:
    """Export (arguments as :func:`model_core.export.coco.export_coco`) and print a summary line."""
    summary = export_coco(datalist, output_dir, splits=splits, axis=axis, encoding=encoding, instances=instances,
                          include_empty=include_empty, modality=modality, window=window, percentiles=percentiles,
                          labels=labels, unlisted=unlisted)
    print(json.dumps(summary))


def verify(coco_json: str, datalist: str | None = None, max_mismatches: int = 100) -> None:
    """Check (arguments as :func:`model_core.export.coco.verify_coco`); print the report; exit 1 on any mismatch."""
    report = verify_coco(coco_json, datalist=datalist, max_mismatches=max_mismatches)
    print(json.dumps(report, indent=1))
    if not report["ok"]:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """The command line: ``export ...`` or ``verify ...`` (``argv`` defaults to ``sys.argv[1:]``)."""
    try:
        fire.Fire({"export": export, "verify": verify}, command=argv)
    except ValueError as e:  # a boundary error: say what is wrong, without a traceback
        sys.exit(f"nifti_to_coco: {e}")


if __name__ == "__main__":
    main()
