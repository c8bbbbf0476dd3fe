"""ICL-SAM2 model core: in-context SAM2 for CT/MRI volumes, built on Meta's ``sam2``."""

from model_core.checkpoint import load_checkpoint, read_state_dict, save_checkpoint
from model_core.memory import MemoryPolicy, SupportMemory
from model_core.network import InContextSAM2
from model_core.predictor import VolumePrediction, VolumePredictor, VolumeState
from model_core.presets import PRESETS, build_icl_sam2, preset_config
from model_core.prompts import PromptSampler, SlicePrompt

__all__ = [
    "InContextSAM2",
    "MemoryPolicy",
    "PRESETS",
    "PromptSampler",
    "SlicePrompt",
    "SupportMemory",
    "VolumePrediction",
    "VolumePredictor",
    "VolumeState",
    "build_icl_sam2",
    "load_checkpoint",
    "preset_config",
    "read_state_dict",
    "save_checkpoint",
]
