"""Latency of MONAI Label's built-in SAM2 task (``monailabel.sam2.infer.Sam2InferTask``, 3D) on the
benchmark study of ``benchmark_app.py``, through the real server and client, with random weights.

    python scripts/benchmark_monailabel_sam2.py                     # sam2.1_hiera_tiny, both at 512 px
    python scripts/benchmark_monailabel_sam2.py --image_size 1024   # the size its YAML ships with

The task downloads its checkpoint and YAML from HuggingFace unless the files are in its
model folder. Here, with no network, this script writes them there: the YAML from the
installed ``sam2`` package and a checkpoint of randomly initialised weights of the same
architecture, saved as ``{"model": state_dict}``, so the download is skipped. Its
settings ``MONAI_SAM_MODEL_PT``/``MONAI_SAM_MODEL_CFG`` name the files. The YAML is
written at ``--image_size`` (``image_size`` and memory attention's RoPE sizes, as
model_core's presets set them), so both sides do the same work. A minimal app (generated
in a temporary folder) serves the task as ``sam2``; the timings are of a first click on
a volume (its slices are written as JPEG files and encoded) and a follow-up click (the
task keeps one video state; propagation encodes the slices again). Then this project's
app serves the same preset at the same size (same random-weight seed, the same clicks),
and one table compares the two (with ``--output``, also as JSON).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import fire

from icl_sam2.servers import MonaiLabelServer
from model_core.io.phantoms import write_phantom_study

APP_MAIN = """
import os
from monailabel.interfaces.app import MONAILabelApp
from monailabel.sam2.infer import Sam2InferTask


class BuiltinSam2App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="builtin-sam2")

    def init_infers(self):
        return {"sam2": Sam2InferTask(self.model_dir, dimension=3, labels={"blob": 1})}
"""


def _prepare_app(folder: Path, preset: str, yaml_name: str, image_size: int) -> dict[str, str]:
    import sam2
    import torch
    from omegaconf import OmegaConf

    from model_core import build_icl_sam2

    (folder / "model").mkdir(parents=True)
    (folder / "main.py").write_text(APP_MAIN)
    yaml = Path(sam2.__file__).parent / "configs" / ("sam2.1" if preset.startswith("sam2.1") else "sam2") / yaml_name
    cfg = OmegaConf.load(yaml)
    cfg.model.image_size = int(image_size)
    for attention in ("self_attention", "cross_attention"):  # RoPE sizes follow the stride-16 feature map
        cfg.model.memory_attention.layer[attention].feat_sizes = [int(image_size) // 16] * 2
    OmegaConf.save(cfg, folder / "model" / yaml_name)
    torch.manual_seed(0)
    network = build_icl_sam2(preset, image_size=int(image_size))  # the official architecture at that size
    torch.save({"model": network.state_dict()}, folder / "model" / f"{preset}.pt")
    base = "https://huggingface.co/facebook/unreachable-here/resolve/main"
    return {"MONAI_SAM_MODEL_PT": f"{base}/{preset}.pt", "MONAI_SAM_MODEL_CFG": f"{base}/{yaml_name}"}


def _clicks(client, model: str, params: dict, centre: list[int]) -> list[float]:
    """Seconds of a first click and a follow-up click two slices away, through the REST API."""
    times = []
    for points in ([centre], [centre, [centre[0] + 4, centre[1], centre[2] + 2]]):
        start = time.perf_counter()
        client.infer(model, "case2", {**params, "foreground": points})
        times.append(time.perf_counter() - start)
    return times


def main(
    preset: str = "sam2.1_hiera_tiny",
    yaml_name: str = "sam2.1_hiera_t.yaml",
    image_size: int = 512,
    shape=(256, 256, 64),
    output: str | None = None,
) -> dict:
    """Args:
    preset, yaml_name: the SAM2 architecture and its YAML in the sam2 package.
    image_size: model input size of both sides.
    shape: ``(i, j, k)`` of each volume of the study.
    output: optional JSON file for the result.
    """
    from monailabel.client import MONAILabelClient

    from model_core.io.phantoms import PHANTOM_LABELS

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_phantom_study(tmp / "studies", tuple(shape))
        centre = [shape[0] // 2, shape[1] // 2, shape[2] // 2]
        env = _prepare_app(tmp / "app", preset, yaml_name, image_size)
        server = MonaiLabelServer(
            tmp / "studies", {}, tmp / "server.log", app=tmp / "app", env={**env, "HOME": str(tmp)}
        )  # its JPEG cache goes under $HOME/.cache
        try:
            builtin = _clicks(
                MONAILabelClient(server.url, tmpdir=str(tmp / "client")), "sam2", {"device": "cpu"}, centre
            )
        finally:
            server.stop()
        ours_conf = {
            "preset": preset,
            "image_size": str(image_size),
            "device": "cpu",
            "window": "[0, 1]",
            "labels": json.dumps(dict(PHANTOM_LABELS)),
            "checkpoint": str(tmp / "app" / "model" / f"{preset}.pt"),
        }
        server = MonaiLabelServer(tmp / "studies", ours_conf, tmp / "ours.log")
        try:
            ours = _clicks(
                MONAILabelClient(server.url, tmpdir=str(tmp / "client2")),
                "icl_sam2_interactive",
                {"label": "blob"},
                centre,
            )
        finally:
            server.stop()
    result = {
        "preset": preset,
        "image_size": int(image_size),
        "shape": list(shape),
        "device": "cpu",
        "builtin": {"first_click_s": round(builtin[0], 2), "follow_up_click_s": round(builtin[1], 2)},
        "ours": {"first_click_s": round(ours[0], 2), "follow_up_click_s": round(ours[1], 2)},
        "speedup": {"first_click": round(builtin[0] / ours[0], 2), "follow_up_click": round(builtin[1] / ours[1], 2)},
    }
    print(
        f"\n{preset} at {image_size} px, random weights (same seed), {shape[0]}x{shape[1]}x{shape[2]}, cpu; "
        f"seconds through the REST API"
    )
    print(f"  {'':<38} {'first click':>12} {'follow-up click':>16}")
    print(f"  {'MONAI Label built-in SAM2 (3D)':<38} {builtin[0]:>12.2f} {builtin[1]:>16.2f}")
    print(f"  {'ICL-SAM2 icl_sam2_interactive':<38} {ours[0]:>12.2f} {ours[1]:>16.2f}")
    print(f"  {'ratio (built-in / ours)':<38} {builtin[0] / ours[0]:>11.1f}x {builtin[1] / ours[1]:>15.1f}x")
    if output:
        Path(output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    fire.Fire(main)
