"""ICL-SAM2 model core: in-context SAM2 for CT/MRI volumes, built on Meta's ``sam2``.

Layout, one role per package, arrows running down only:

- ``modeling``: the network (``InContextSAM2``), memories, prompts, inputs, precision, encoder backends, compile,
  checkpoints, presets
- ``predictor`` / ``volume_state``: a query volume's state, prompts and propagation (``VolumePredictor``)
- ``training``: the training network, freezing matrix, LoRA, loss, episodes, training builder
- ``workflows``: what the bundle's JSON instantiates (datasets, inferers, handlers, metrics)
- ``io``: files, checks, datalists, transforms, phantoms
- ``proposals``: automatic lesion proposals (sam2's automatic mask generator merged into 3D)
- ``medsam_lite``: LiteMedSAM and the CVPR 2024 challenge format
- ``export``: ONNX, image encoders on onnxruntime / OpenVINO, COCO
- ``serving``: the service a server needs
"""

from model_core.modeling.checkpoint import load_checkpoint, read_state_dict, save_checkpoint
from model_core.modeling.memory import MemoryPolicy, SupportMemory
from model_core.modeling.network import InContextSAM2
from model_core.modeling.presets import PRESETS, build_icl_sam2, preset_config
from model_core.modeling.prompts import SlicePrompt
from model_core.predictor import VolumePredictor
from model_core.training.builder import build_training_network
from model_core.training.prompts import PromptSampler
from model_core.volume_state import VolumePrediction, VolumeState

__all__ = [
    "PRESETS",
    "InContextSAM2",
    "MemoryPolicy",
    "PromptSampler",
    "SlicePrompt",
    "SupportMemory",
    "VolumePrediction",
    "VolumePredictor",
    "VolumeState",
    "build_icl_sam2",
    "build_training_network",
    "load_checkpoint",
    "preset_config",
    "read_state_dict",
    "save_checkpoint",
]
