"""``icl-sam2``: the project's command line, one subcommand per job, each a thin layer over ``model_core``.

    icl-sam2 demo                                        # the main job on built-in defaults
    icl-sam2 segment --support img.nii.gz:lab.nii.gz --input scans/ --output out/ --labels '{"kidney": 1}'
    icl-sam2 support --support img.nii.gz:lab.nii.gz --labels '{"kidney": 1}' --output kidney_support.pt
    icl-sam2 serve --studies /data/study --conf labels '{"kidney": 1}'   # the MONAI Label server
    icl-sam2 phantoms --output_dir data/phantoms         # generated volumes with labels and a datalist
    icl-sam2 datalist --dataset_dir /data/kits23 --preset kits23 --output datalist.json
    icl-sam2 mricron-study --output_dir data/mricron     # a real T1 MRI study (Debian mricron-data)
    icl-sam2 orthanc --storage_dir /tmp/pacs             # a reference PACS (Debian orthanc)
    icl-sam2 dicom-study --orthanc http://127.0.0.1:8042 --source phantoms
    icl-sam2 ohif install|serve ...                      # OHIF 3.13 on the PACS (icl_sam2/ohif.py)
    icl-sam2 segment-studies --dicomweb http://127.0.0.1:8042/dicom-web   # in-context job over a PACS
    icl-sam2 coco export|verify ...                      # NIfTI datalists as COCO datasets
    icl-sam2 challenge infer|evaluate ...                # the CVPR 2024 "MedSAM on Laptop" format
    icl-sam2 onnx-export --model medsam_lite --output_dir onnx
    icl-sam2 brain-atlas --output_dir runs/brain_atlas      # in-context learning on a real T1, held-out structures
    icl-sam2 protocol --datalist data/phantoms/datalist.json --checkpoint models/model.pt   # CVPR 2025 clicks

``icl-sam2 <command> --help`` lists a command's options (Google's ``fire``). A mistake in the
input (a missing file, a bad option) ends with one line saying what is wrong and exit code 2,
without a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import fire

from icl_sam2 import brain_atlas, demo, dicom_study, ohif, protocol, segment, serve, servers
from model_core.export import coco, encoder_choice, onnx, runtime
from model_core.io import datasets, mricron, phantoms
from model_core.io.datalist import write_datalist
from model_core.io.dicomweb import Pacs
from model_core.medsam_lite import challenge
from model_core.medsam_lite.model import check_slice_step
from model_core.serving import pacs_job

__all__ = ["COMMANDS", "main"]

ROOT = Path(__file__).resolve().parents[1]


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=1, default=str))


def make_phantoms(
    output_dir: str = "data/phantoms",
    train: int = 8,
    validation: int = 2,
    test: int = 2,
    shape: Sequence[int] = (32, 128, 128),
    seed: int = 0,
) -> None:
    """Write phantom volumes (blob 1, tube 2, block 3) as NIfTI with a datalist; prints the datalist's path.

    Each case is ``caseNNN_image.nii.gz`` (float32 in [0, 1], 1 mm voxels, axial slices along the
    third axis) and ``caseNNN_label.nii.gz`` (:func:`model_core.io.phantoms.write_phantom_dataset`).
    """
    print(
        phantoms.write_phantom_dataset(
            output_dir, train=train, validation=validation, test=test, shape=tuple(shape), seed=seed
        )
    )


def make_datalist(
    dataset_dir: str | None = None,
    preset: str = "generic",
    output: str = "datalist.json",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    relative: bool | str = True,
    channel: int | None = None,
    labels: dict | str | None = None,
    datalist: str | None = None,
    name: str | None = None,
) -> None:
    """Write a datalist JSON (MSD form) for a dataset folder in a known layout (kits23, btcv, msd, generic, json).

    Layouts, label merges and multi-channel images: :mod:`model_core.io.datasets`. Prints a summary.
    """
    result = datasets.make_datalist(
        dataset_dir,
        preset,
        output=output,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        relative=relative,
        channel=channel,
        labels=labels,
        datalist=datalist,
        name=name,
    )
    path = write_datalist(result, output)
    print(
        json.dumps(
            {
                "output": str(path),
                "name": result["name"],
                "preset": result["preset"],
                "labels": result["labels"],
                "num_training": result["num_training"],
                "num_validation": result["num_validation"],
                "num_test": result["num_test"],
            }
        )
    )


def make_mricron_study(output_dir: str = "data/mricron", regions: Sequence[str] = mricron.REGIONS) -> None:
    """Cut a small real T1 MRI study with AAL regions from Debian's mricron-data; prints the datalist's path."""
    print(mricron.make_study(output_dir, regions))


def coco_export(
    datalist: str,
    output_dir: str,
    splits: str | list[str] = "training",
    axis: str | int = "axial",
    encoding: str = "rle",
    instances: str = "region",
    include_empty: bool | str = False,
    modality: str = "CT",
    window: Sequence[float] = (-200.0, 300.0),
    percentiles: Sequence[float] = (0.5, 99.5),
    labels: dict | str | None = None,
    unlisted: str = "error",
) -> None:
    """Export a datalist's labelled volumes as a COCO dataset of 2D slices
    (:func:`model_core.export.coco.export_coco`).
    """
    print(
        json.dumps(
            coco.export_coco(
                datalist,
                output_dir,
                splits=splits,
                axis=axis,
                encoding=encoding,
                instances=instances,
                include_empty=include_empty,
                modality=modality,
                window=window,
                percentiles=percentiles,
                labels=labels,
                unlisted=unlisted,
            )
        )
    )


def coco_verify(coco_json: str, datalist: str | None = None, max_mismatches: int = 100) -> None:
    """Decode a COCO export and compare it voxel for voxel with its volumes; exit code 1 on any mismatch."""
    report = coco.verify_coco(coco_json, datalist=datalist, max_mismatches=max_mismatches)
    _print_json(report)
    if not report["ok"]:
        sys.exit(1)


def challenge_infer(
    input_dir: str,
    output_dir: str,
    device: str = "cpu",
    precision: str = "fp32",
    on_empty: str = "stop",
    min_iou: float | None = None,
    encoder_backend: str = "torch",
    encoder_batch_size: int = 1,
    encoder_cache_dir: str | None = None,
    slice_step: int = 1,
) -> None:
    """Segment a folder of CVPR 2024 challenge cases (``imgs/*.npz``) with LiteMedSAM; ``timing.csv`` beside them.

    ``--encoder_backend`` (torch, torch-bf16, onnxruntime, openvino, openvino-bf16 or auto: the fastest
    here, measured once) runs the image encoder, ``--encoder_batch_size`` slices per call.
    ``--slice_step N`` (N > 1) propagates N slices at a time where the masks agree and fills the
    slices between by interpolation (fewer slices encoded; the ends and fast-changing stretches
    still slice by slice); 1, the default, segments every slice as the challenge's baseline.
    A broken case is reported (exit code 1 at the end) and the others still run.
    """
    challenge.case_files(input_dir)  # a wrong folder or option fails before the model loads (and auto measures)
    check_slice_step(slice_step)
    model = encoder_choice.lite_medsam(
        encoder_backend,
        device=device,
        precision=precision,
        cache_dir=encoder_cache_dir,
        encoder_batch_size=encoder_batch_size,
    )
    runs = challenge.infer_folder(
        input_dir, output_dir, model=model, on_empty=on_empty, min_iou=min_iou, slice_step=slice_step
    )
    for run in runs:
        print(json.dumps(run.__dict__))
        if run.status != "ok":
            print(f"icl-sam2 challenge infer: {run.error}", file=sys.stderr)
    failed = [r.case for r in runs if r.status != "ok"]
    print(
        json.dumps(
            {
                "cases": len(runs),
                "ok": len(runs) - len(failed),
                "failed": failed,
                "seconds": round(sum(r.seconds for r in runs), 3),
                "output_dir": output_dir,
            }
        )
    )


def challenge_evaluate(
    seg_dir: str,
    gt_dir: str,
    output: str = "metrics.csv",
    summary: str | None = None,
    timing: str | None = None,
    tolerance: float = challenge.NSD_TOLERANCE,
    nsd_min_dsc: float | None = challenge.NSD_MIN_DSC,
    spacing_order: str = "array",
) -> None:
    """Score segmentations against ground truth as the challenge does (DSC, NSD at 2 mm, seconds per case)."""
    rows, result = challenge.evaluate_folder(
        seg_dir,
        gt_dir,
        output,
        timing_csv=timing,
        tolerance=tolerance,
        nsd_min_dsc=nsd_min_dsc,
        spacing_order=spacing_order,
    )
    if summary:
        challenge.write_summary(result, summary)
    for row in rows:
        if row.status != "ok":
            print(f"icl-sam2 challenge evaluate: {row.case}: {row.error}", file=sys.stderr)
    print(json.dumps({**result, "output": output}))


def segment_studies(
    dicomweb: str = "http://127.0.0.1:8042/dicom-web",
    studies: str | Sequence[str] | None = None,
    labels: dict | str | None = None,
    checkpoint: str | None = None,
    preset: str | None = None,
    image_size: int | None = None,
    modality: str | None = None,
    window: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
    device: str = "cpu",
    max_support_volumes: int = 4,
    num_support_slices: int = 3,
    bundle: str = str(ROOT / "bundle"),
    work_dir: str | None = None,
    store: bool = True,
    dry_run: bool = False,
) -> None:
    """Segment every series of ``studies`` (default: all) that has no SEG yet, in context of the PACS's reviewed SEGs,
    and store each result as a SEG identified as the model's (:mod:`model_core.serving.pacs_job`).

    Prints one JSON line per series as it finishes, then a summary; exit code 1 when a series failed.
    ``--labels '{"liver": 1}'`` chooses the structures (default: the segment names of the support SEGs);
    ``preset``, ``image_size``, ``modality``, ``window`` and ``percentiles`` default to the checkpoint's record.
    ``--dry_run`` prints which SEGs would be support and which series would be segmented, and stops.
    """
    if dry_run:
        _print_json(pacs_job.plan_job(Pacs(dicomweb), studies, max_support_volumes).as_dict())
        return
    if isinstance(labels, str):
        try:
            labels = json.loads(labels)
        except json.JSONDecodeError as e:
            raise ValueError(f"--labels must be a JSON object such as '{{\"liver\": 1}}', got {labels!r}.") from e
    settings = pacs_job.JobSettings(
        bundle_dir=bundle,
        checkpoint=checkpoint,
        preset=preset,
        image_size=image_size,
        modality=modality,
        window=window,
        percentiles=percentiles,
        device=device,
        max_support_volumes=max_support_volumes,
        num_support_slices=num_support_slices,
    )
    report = pacs_job.segment_studies(
        dicomweb,
        settings,
        studies=studies,
        labels=labels,
        work_dir=work_dir,
        store=store,
        on_result=lambda result: print(json.dumps(result.__dict__), flush=True),
    )
    failed = [r["series_uid"] for r in report["results"] if r["status"] == "failed"]
    print(json.dumps({k: v for k, v in report.items() if k != "results"} | {"failed": failed}, default=str))
    if failed:
        sys.exit(1)


def onnx_export(
    model: str = "sam2",
    output_dir: str = "onnx",
    preset: str = "sam2.1_hiera_tiny",
    image_size: int | None = None,
    checkpoint: str | None = None,
    opset: int = onnx.DEFAULT_OPSET,
    dynamo: bool = False,
    multimask_output: bool = True,
    check: bool = True,
) -> None:
    """Export a single-slice path (``sam2``: a preset; ``medsam_lite``: LiteMedSAM's shipped weights) to ONNX.

    With ``check``, onnxruntime's logits are compared with torch's on a random image and a box.
    """
    path = onnx.slice_path(
        model, preset=preset, image_size=image_size, checkpoint=checkpoint, multimask_output=multimask_output
    )
    files = onnx.export_slice_path(path, output_dir, opset=opset, dynamo=dynamo)
    result = {"model": path.name, "image_size": path.image_size, "opset": opset, **files}
    if check:
        result["max_abs_logit_diff"] = runtime.compare_with_torch(path, files)
    _print_json(result)


COMMANDS: dict[str, Any] = {
    "demo": demo.main,
    "segment": segment.segment,
    "support": segment.support,
    "serve": serve.main,
    "phantoms": make_phantoms,
    "datalist": make_datalist,
    "mricron-study": make_mricron_study,
    "orthanc": servers.run_orthanc,
    "dicom-study": dicom_study.main,
    "ohif": {"install": ohif.install_command, "serve": ohif.serve},
    "coco": {"export": coco_export, "verify": coco_verify},
    "challenge": {"infer": challenge_infer, "evaluate": challenge_evaluate},
    "onnx-export": onnx_export,
    "segment-studies": segment_studies,
    "protocol": protocol.main,
    "brain-atlas": brain_atlas.main,
}


def main(argv: Sequence[str] | None = None) -> None:
    """The ``icl-sam2`` console command (``argv`` defaults to ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "serve":  # MONAI Label's own argument parser takes the rest as given
        serve.main(args[1:])
        return
    try:
        fire.Fire(COMMANDS, command=args, name="icl-sam2", serialize=lambda value: None)
    except ValueError as e:  # a mistake in the input: say what is wrong, without a traceback
        print(f"icl-sam2: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
