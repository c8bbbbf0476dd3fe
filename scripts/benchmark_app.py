"""Latency of the MONAI Label app through the real server and client, on a 256 x 256 x 64 study.

    python scripts/benchmark_app.py                                   # tiny preset at 256 and Hiera-tiny at 512, CPU
    python scripts/benchmark_app.py --presets "['sam2.1_hiera_tiny:512']" --device cuda

For each preset (random weights; the timings do not depend on them) the server is
started on a phantom study of three 256 x 256 x 64 volumes, one labelled, and the
client times: in-context segmentation of a volume, a first interactive click on
another volume (its slices are encoded) and a follow-up click two slices away (no
encoding; incremental: the changed slice and propagation until the result stops
changing), with the slices each one encoded and propagated. The follow-up is also timed
with ``--conf incremental false`` (every request replays all clicks over the volume).
One table is printed and, with ``--output``, written as JSON.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import fire

from icl_sam2.servers import MonaiLabelServer
from model_core.io.phantoms import PHANTOM_LABELS, write_phantom_study


def _timed(client, model, image, params) -> dict:
    start = time.perf_counter()
    _, info = client.infer(model, image, params)
    info = json.loads(info) if isinstance(info, (bytes, str)) else info
    return {
        "seconds": round(time.perf_counter() - start, 3),
        "encoded": info["encoded_slices"],
        "propagated": info.get("propagated_slices"),
        "mode": info.get("mode"),
    }


def main(
    presets=("tiny:256", "sam2.1_hiera_tiny:512"), shape=(256, 256, 64), device: str = "cpu", output: str | None = None
) -> list[dict]:
    """Args:
    presets: ``preset:image_size`` entries.
    shape: ``(i, j, k)`` of each volume (k: slices).
    device: ``cpu`` or ``cuda``.
    output: optional JSON file for the rows.
    """
    from monailabel.client import MONAILabelClient

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        write_phantom_study(studies, tuple(shape))
        centre = [shape[0] // 2, shape[1] // 2, shape[2] // 2]
        follow_clicks = {"foreground": [centre, [centre[0] + 4, centre[1], centre[2] + 2]], "label": "blob"}
        for entry in presets:
            preset, size = entry.split(":")
            row = {"preset": entry, "shape": list(shape), "device": device}
            for incremental in (True, False):
                conf = {
                    "preset": preset,
                    "image_size": size,
                    "device": device,
                    "labels": json.dumps(dict(PHANTOM_LABELS)),
                    "window": "[0, 1]",
                    "checkpoint": f"{tmp}/none.pt",
                    "incremental": str(incremental).lower(),
                }
                server = MonaiLabelServer(studies, conf, Path(tmp) / f"{preset}_{incremental}.log")
                try:
                    client = MONAILabelClient(server.url, tmpdir=f"{tmp}/client")
                    if incremental:
                        row["in_context"] = _timed(client, "icl_sam2", "case1", {})
                    first = _timed(client, "icl_sam2_interactive", "case2", {"foreground": [centre], "label": "blob"})
                    follow = _timed(client, "icl_sam2_interactive", "case2", follow_clicks)
                finally:
                    server.stop()
                if incremental:
                    row["first_click"], row["follow_up"] = first, follow
                else:
                    row["follow_up_exact"] = follow
            rows.append(row)
    print(
        f"\nMONAI Label app, {shape[0]}x{shape[1]}x{shape[2]} volumes, device {device} "
        "(seconds through the REST API; [slices encoded / propagated])"
    )
    print(
        f"  {'preset:size':<22} {'in-context':>18} {'first click':>18} {'follow-up':>18} {'follow/first':>12} "
        f"{'exact follow-up':>18}"
    )

    def cell(r: dict) -> str:
        propagated = r["propagated"] if r["propagated"] is not None else "-"
        return f"{r['seconds']:>7.2f} s [{r['encoded']:>3}/{propagated:>3}]"

    for r in rows:
        ratio = r["follow_up"]["seconds"] / r["first_click"]["seconds"]
        print(
            f"  {r['preset']:<22} {cell(r['in_context']):>18} {cell(r['first_click']):>18} {cell(r['follow_up']):>18} "
            f"{ratio:>11.0%} {cell(r['follow_up_exact']):>18}"
        )
    if output:
        Path(output).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    fire.Fire(main)
