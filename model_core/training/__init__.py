"""Training the in-context network (never imported by ``modeling`` or the predictor, as sam2's ``sam2/``
never imports its ``training/``): the training network, the freezing matrix, LoRA adapters (peft),
the loss, episode and prompt sampling, and the training builder."""

from model_core.training.builder import build_training_network
from model_core.training.network import InContextSAM2Train

__all__ = ["InContextSAM2Train", "build_training_network"]
