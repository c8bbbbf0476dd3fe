"""``icl-sam2 protocol``: the CVPR 2025 interactive protocol through the bundle (``train.json + protocol.json``).

    icl-sam2 protocol --datalist data/phantoms/datalist.json --checkpoint models/model.pt --output_dir out
    icl-sam2 protocol ... --mode in_context          # support memories, then the corrective clicks
    icl-sam2 protocol ... --mode medsam_lite         # LiteMedSAM's 3D box only

The preset, image size, classes and intensity settings are read from the checkpoint's record (what
the bundle's training saved beside the weights); options override them. The workflow runs in this
process (MONAI's ``ConfigWorkflow``), writes ``protocol_<mode>.csv`` and ``protocol_<mode>_summary.json``
to ``output_dir`` (:mod:`model_core.workflows.protocol`) and the summary is printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from monai.bundle import ConfigWorkflow

from model_core.modeling.checkpoint import read_state_dict
from model_core.workflows.protocol import INITIAL_PROMPTS, MODES

__all__ = ["CONFIGS", "main", "run_protocol"]

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [str(ROOT / "bundle" / "configs" / "train.json"), str(ROOT / "bundle" / "configs" / "protocol.json")]


def run_protocol(overrides: dict[str, Any], extra_configs: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``train.json + protocol.json`` with ``overrides`` (bundle ids) in this process; returns the summary.

    Args:
        extra_configs: config files layered between the two (a training recipe such as ``brain_atlas.json``).
    """
    workflow = ConfigWorkflow(
        config_file=[CONFIGS[0], *extra_configs, CONFIGS[1]],
        meta_file=str(ROOT / "bundle" / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    summary_file = workflow.parser.get_parsed_content("protocol#workflow").files["summary"]
    workflow.finalize()
    return json.loads(Path(summary_file).read_text())


def main(
    datalist: str,
    checkpoint: str | None = None,
    mode: str = "interactive",
    initial_prompt: str = "box",
    num_clicks: int = 5,
    output_dir: str = "protocol",
    classes: Sequence[int] | None = None,
    datalist_key: str = "validation",
    support_datalist: str | None = None,
    support_key: str = "training",
    num_support_slices: int = 3,
    preset: str | None = None,
    image_size: int | None = None,
    modality: str | None = None,
    window: Sequence[float] | None = None,
    device: str = "cpu",
    time_limit_s: float | None = None,
    incremental: bool = True,
) -> None:
    """Run the protocol on every case of ``datalist`` (key ``datalist_key``) and each structure in ``classes``.

    Args:
        datalist: MSD datalist with the cases (``image`` and ``label``).
        checkpoint: the in-context model's weights (``interactive``, ``in_context``); its record gives the
            defaults of ``preset``, ``image_size``, ``classes``, ``modality`` and ``window``.
        mode: ``interactive``, ``in_context`` or ``medsam_lite``.
        initial_prompt: ``box`` (on the structure's middle slice) or ``click`` (at its centre).
        num_clicks: corrective clicks after the initial prompt.
        output_dir: where the CSV and the summary JSON go.
        classes: label values to run (default: the checkpoint's).
        support_datalist, support_key, num_support_slices: the support set of ``in_context`` (default the
            datalist's training cases).
        time_limit_s: stop correcting a case after this many seconds.
        incremental: apply each click as the app does (False: replay every prompt over the whole volume).
    """
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}.")
    if initial_prompt not in INITIAL_PROMPTS:
        raise ValueError(f"--initial_prompt must be one of {INITIAL_PROMPTS}, got {initial_prompt!r}.")
    for option, path in (("--datalist", datalist), ("--support_datalist", support_datalist)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{option} {path!r} is not a file; give an MSD datalist JSON.")
    record: dict[str, Any] = {}
    if checkpoint:
        _, record = read_state_dict(checkpoint)
    elif mode != "medsam_lite":
        raise ValueError(f"--checkpoint is needed for mode {mode!r} (the in-context model's weights).")
    classes = classes if classes is not None else record.get("classes")
    if not classes:
        raise ValueError("--classes is needed: the label values of the structures to run (e.g. [1,2,3]).")
    overrides: dict[str, Any] = {
        "datalist_file": str(Path(datalist).resolve()),
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "output_dir": str(Path(output_dir).resolve()),
        "protocol#output_dir": str(Path(output_dir).resolve()),
        "classes": [int(c) for c in classes],
        "protocol#mode": mode,
        "protocol#initial_prompt": initial_prompt,
        "protocol#num_clicks": int(num_clicks),
        "protocol#datalist_key": datalist_key,
        "protocol#time_limit_s": time_limit_s,
        "protocol#incremental": bool(incremental),
        "support_datalist_file": str(Path(support_datalist or datalist).resolve()),
        "support_key": support_key,
        "num_support_slices": int(num_support_slices),
        "preset": preset or record.get("preset") or "tiny",
        "device": device,
    }
    for key, value in (
        ("image_size", image_size or record.get("image_size")),
        ("modality", modality or record.get("modality")),
        ("intensity#window", window or record.get("window")),
        ("intensity#percentiles", record.get("percentiles")),
        ("channel_mode", record.get("channel_mode")),
    ):
        if value is not None:
            overrides[key] = value
    summary = run_protocol(overrides)
    print(json.dumps(summary, indent=1))
