"""``icl-sam2 segment`` and ``icl-sam2 support``: in-context segmentation of your own volumes, one command.

    icl-sam2 segment --support img.nii.gz:lab.nii.gz --input query.nii.gz --output out/ \\
        --labels '{"blob": 1}' --checkpoint model.pt --preview out/preview.png
    icl-sam2 support --support img.nii.gz:lab.nii.gz --labels '{"blob": 1}' --checkpoint model.pt \\
        --output blob_support.pt
    icl-sam2 segment --support blob_support.pt --input scans/ --output out/

Wiring only: the work is :class:`model_core.workflows.segmenter.InContextSegmenter` over the
bundle's configs in this repository's ``bundle/``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from model_core.workflows.segmenter import InContextSegmenter, QueryResult

__all__ = ["segment", "support"]

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def _warn_untrained(segmenter: InContextSegmenter) -> None:
    for note in segmenter.notes:
        print(f"icl-sam2: note: {note}", file=sys.stderr)
    if not segmenter.settings["checkpoint"]:
        print(
            "icl-sam2: no --checkpoint: the network has its initial weights, so its labels mean nothing yet "
            "(train one with `icl-sam2 demo` or the bundle, or download one with scripts/download_checkpoints.sh)",
            file=sys.stderr,
        )


def _report(result: QueryResult) -> None:
    if not result.ok:
        print(f"icl-sam2 segment: {' '.join(str(result.error).split())}", file=sys.stderr)
        return
    found = ", ".join(
        f"{name} {result.voxels[name]} voxels (confidence {value:.2f})" for name, value in result.confidence.items()
    )
    print(f"{result.source.name}: {found} -> {', '.join(result.outputs.values())} ({result.seconds:.1f} s)")
    if result.note:
        print(f"  note: {result.note}")


def segment(
    support: str | Sequence[str],
    input: str | Sequence[str],  # the option is --input, as in nnUNetv2_predict and TotalSegmentator
    output: str,
    labels: dict | str | None = None,
    preset: str | None = None,
    image_size: int | None = None,
    checkpoint: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    modality: str | None = None,
    window: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
    channel_mode: str | None = None,
    memory_policy: str = "recent",
    num_support_slices: int = 3,
    preview: str | None = None,
) -> None:
    """Segment query volumes in context of labelled examples: a label map, confidence (and a DICOM SEG) per query.

    Args:
        support: IMAGE:LABEL pairs (one, a list, or comma-separated), or a support file from ``icl-sam2 support``.
        input: query volumes: NIfTI, NRRD or MetaImage files, DICOM series folders, or folders of them.
        output: folder for ``<name>_seg.nii.gz`` (on the query's own grid), ``<name>_confidence.json`` and,
            for a DICOM series, ``<name>_seg.dcm`` (a DICOM SEG referencing it).
        labels: ``{"structure": value}``, the label values of the support labels to segment
            (default: a support file's).
        preset, image_size, checkpoint: the model (default: a support file's, then the checkpoint's record).
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        precision: ``fp32``, ``bf16`` or ``auto``.
        modality, window, percentiles: the intensity rule: ``CT`` with a window in HU, or ``MRI`` with
            percentiles (default: a support file's, then the checkpoint's record, then CT [-200, 300]).
        channel_mode: ``replicate`` or ``2.5d``, as the model was trained.
        memory_policy: ``recent`` (SAM2's) or ``scored``.
        num_support_slices: support slices per structure (support pairs only).
        preview: a PNG montage of slices with each structure's contour (a row per query).

    Exit code 0 when every query was segmented, 1 when one or more failed (each is reported, the others
    still run), 2 when nothing could start (a bad support set or option).
    """
    segmenter = InContextSegmenter(
        str(BUNDLE),
        checkpoint=checkpoint,
        labels=labels,
        preset=preset,
        image_size=image_size,
        device=device,
        precision=precision,
        modality=modality,
        window=window,
        percentiles=percentiles,
        channel_mode=channel_mode,
        memory_policy=memory_policy,
        num_support_slices=num_support_slices,
    )
    memory = segmenter.support(support)
    _warn_untrained(segmenter)
    results = segmenter.segment_all(input, memory, output, preview=preview)
    for result in results:
        _report(result)
    failed = [r for r in results if not r.ok]
    print(
        f"{len(results)} queries: {len(results) - len(failed)} segmented, {len(failed)} failed; outputs in {output}"
        + (f"; preview {preview}" if preview and len(failed) < len(results) else "")
    )
    if failed:
        sys.exit(1)


def support(
    support: str | Sequence[str],
    output: str,
    labels: dict | str | None = None,
    preset: str | None = None,
    image_size: int | None = None,
    checkpoint: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    modality: str | None = None,
    window: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = None,
    channel_mode: str | None = None,
    num_support_slices: int = 3,
) -> None:
    """Encode labelled volumes into a support memory once and save it, for later ``icl-sam2 segment --support FILE``.

    The file is tied to the model (preset, image size, weights), the labels, the intensity rule and the
    channel mode; a ``segment`` run that differs in any of them is refused, naming it. Options as for
    ``icl-sam2 segment``; ``output`` is the support file to write.
    """
    segmenter = InContextSegmenter(
        str(BUNDLE),
        checkpoint=checkpoint,
        labels=labels,
        preset=preset,
        image_size=image_size,
        device=device,
        precision=precision,
        modality=modality,
        window=window,
        percentiles=percentiles,
        channel_mode=channel_mode,
        num_support_slices=num_support_slices,
    )
    memory = segmenter.support_from_files(support)
    _warn_untrained(segmenter)
    segmenter.save_support(memory, output)
    settings = memory.settings
    print(
        f"{output}: {memory.num_slices} support slices of {', '.join(settings['labels'])} from "
        f"{len(settings['support'])} volume(s); tied to preset {settings['preset']} at {settings['image_size']} px, "
        f"checkpoint {settings['checkpoint']}, {settings['modality']} intensities "
        f"({settings['window'] if settings['modality'] == 'CT' else settings['percentiles']})"
    )
