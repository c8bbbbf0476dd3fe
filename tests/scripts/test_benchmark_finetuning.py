"""scripts/benchmark_finetuning.py runs every method through the bundle and reports what it measured."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_finetuning_benchmark_measures_every_method(tmp_path, run_script):
    run_script(
        "benchmark_finetuning.py",
        "--steps",
        1,
        "--pretrain_steps",
        1,
        "--batch_size",
        1,
        "--num_query",
        1,
        "--volumes",
        2,
        "--validation",
        1,
        "--depth",
        6,
        "--output",
        tmp_path / "finetuning.json",
        "--workdir",
        tmp_path,
    )
    result = json.loads((tmp_path / "finetuning.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["full fine-tuning", "frozen encoder", "LoRA rank 4", "LoRA rank 16"]
    total = rows["full fine-tuning"]["total_parameters"]
    assert rows["full fine-tuning"]["trainable_parameters"] == total
    assert 0 < rows["frozen encoder"]["trainable_parameters"] < total
    lora4, lora16 = rows["LoRA rank 4"], rows["LoRA rank 16"]
    assert (
        lora4["trainable_parameters"] == lora4["lora_parameters"]
        and 4 * lora4["lora_parameters"] == lora16["lora_parameters"]
    )
    assert all(r["steps"] == 1 and r["step_s"] > 0 and 0 <= r["dice"] <= 1 for r in rows.values())
