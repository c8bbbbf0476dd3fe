"""``compile``: the network's components under ``torch.compile`` as sam2's ``vos_optimized=True``, on a CPU.

The same code path as ``compile max-autotune`` on a GPU (sam2's five forwards compiled with its
``fullgraph``/``dynamic`` settings, outputs cloned, encoder batches padded to one shape), with
``torch.compile``'s ``eager`` backend: dynamo traces every graph (a graph break fails ``fullgraph``)
without generating code, which inductor takes minutes to do on a 2-core CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_core.io.phantoms import make_phantom
from model_core.modeling.compile import check_compile_mode, compile_network
from model_core.modeling.presets import build_icl_sam2
from model_core.predictor import VolumePredictor


def test_compile_modes_are_checked():
    assert check_compile_mode(None) == check_compile_mode(False) == check_compile_mode("OFF") == "off"
    assert check_compile_mode(True) == "max-autotune" and check_compile_mode("reduce_overhead") == "reduce-overhead"
    with pytest.raises(ValueError, match=r"compile must be one of off, default, reduce-overhead, max-autotune"):
        check_compile_mode("fast")
    net = build_icl_sam2("tiny", image_size=64)
    assert net.compiled == "off" and compile_network(net, "off") is net and net.compiled == "off"


@pytest.mark.slow
def test_compiled_network_segments_as_the_eager_one():
    image, label = make_phantom((5, 64, 64), seed=3)
    slices = torch.from_numpy(image)[:, None].expand(-1, 3, -1, -1).contiguous()
    masks = torch.from_numpy(np.stack([label == 1, label == 3], axis=1))
    picks = [z for z in range(5) if masks[z].any(dim=(1, 2)).all()][:2]

    def segment(net):
        with torch.inference_mode():
            memory = net.build_support_memory(slices[picks], masks[picks])
            return VolumePredictor(net).segment_volume(slices, memory, return_logits=True)

    torch.manual_seed(0)
    eager = build_icl_sam2("tiny", image_size=64, encoder_batch_size=2)
    expected = segment(eager)
    torch.manual_seed(0)
    compiled = compile_network(build_icl_sam2("tiny", image_size=64, encoder_batch_size=2), "max-autotune", "eager")
    got = segment(compiled)  # 5 slices in batches of 2: the last one padded to the compiled shape
    assert compiled.compiled == "max-autotune" and compiled.encoded_slices == eager.encoded_slices
    assert torch.equal(got.masks, expected.masks)
    assert float((got.logits.float() - expected.logits.float()).abs().max()) < 1e-3
    with pytest.raises(ValueError, match="compiled already"):
        compile_network(compiled, "default")
