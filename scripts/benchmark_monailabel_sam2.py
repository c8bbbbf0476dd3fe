"""Latency of MONAI Label's built-in SAM2 task (``monailabel.sam2.infer.Sam2InferTask``, 3D) on the
benchmark study of ``benchmark_app.py``, through the real server and client, with random weights.

    python scripts/benchmark_monailabel_sam2.py                 # sam2.1_hiera_tiny, as its 1024-px YAML says

The task downloads its checkpoint and YAML from HuggingFace unless the files are in its
model folder. Here, with no network, this script writes them there: the YAML from the
installed ``sam2`` package and a checkpoint of randomly initialised weights of the same
architecture, saved as ``{"model": state_dict}``, so the download is skipped. Its
settings ``MONAI_SAM_MODEL_PT``/``MONAI_SAM_MODEL_CFG`` name the files. A minimal app
(generated in a temporary folder) serves the task as ``sam2``; the timings are of a
first click on a volume (its slices are written as JPEG files and encoded) and a
follow-up click (the task keeps one video state; propagation encodes the slices again).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import fire

from benchmark_app import phantom_study  # sibling scripts: `python scripts/x.py` puts scripts/ on sys.path
from monailabel_server import Server

APP_MAIN = '''
import os
from monailabel.interfaces.app import MONAILabelApp
from monailabel.sam2.infer import Sam2InferTask


class BuiltinSam2App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="builtin-sam2")

    def init_infers(self):
        return {"sam2": Sam2InferTask(self.model_dir, dimension=3, labels={"blob": 1})}
'''


def _prepare_app(folder: Path, preset: str, yaml_name: str) -> dict[str, str]:
    import sam2
    import torch

    from model_core import build_icl_sam2

    (folder / "model").mkdir(parents=True)
    (folder / "main.py").write_text(APP_MAIN)
    yaml = Path(sam2.__file__).parent / "configs" / ("sam2.1" if preset.startswith("sam2.1") else "sam2") / yaml_name
    shutil.copy(yaml, folder / "model" / yaml_name)
    network = build_icl_sam2(preset, image_size=1024)  # the official architecture at the YAML's size
    torch.save({"model": network.state_dict()}, folder / "model" / f"{preset}.pt")
    base = "https://huggingface.co/facebook/unreachable-here/resolve/main"
    return {"MONAI_SAM_MODEL_PT": f"{base}/{preset}.pt", "MONAI_SAM_MODEL_CFG": f"{base}/{yaml_name}"}


def main(preset: str = "sam2.1_hiera_tiny", yaml_name: str = "sam2.1_hiera_t.yaml", shape=(256, 256, 64)) -> None:
    from monailabel.client import MONAILabelClient

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        phantom_study(tmp / "studies", tuple(shape))
        env = _prepare_app(tmp / "app", preset, yaml_name)
        server = Server(tmp / "studies", {}, tmp / "server.log", app=tmp / "app",
                        env={**env, "HOME": str(tmp)})  # its JPEG cache goes under $HOME/.cache
        centre = [shape[0] // 2, shape[1] // 2, shape[2] // 2]
        try:
            client = MONAILabelClient(server.url, tmpdir=str(tmp / "client"))
            times = []
            for points in ([centre], [centre, [centre[0] + 4, centre[1], centre[2] + 2]]):
                start = time.perf_counter()
                client.infer("sam2", "case2", {"foreground": points, "device": "cpu"})
                times.append(time.perf_counter() - start)
        finally:
            server.stop()
    print(f"\nMONAI Label built-in SAM2 (Sam2InferTask, 3D), {preset} at 1024 px, random weights, "
          f"{shape[0]}x{shape[1]}x{shape[2]}, cpu: first click {times[0]:.2f} s, follow-up click {times[1]:.2f} s")
    print(json.dumps({"preset": preset, "first_click_s": round(times[0], 2), "follow_up_click_s": round(times[1], 2)}))


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    fire.Fire(main)
