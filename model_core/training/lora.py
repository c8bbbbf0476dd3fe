"""LoRA adapters on the in-context network through ``peft``: named targets, attach, save, load, merge.

peft injects its ``lora.Linear`` layers into any torch module (``LoraModel``, what
``peft.inject_adapter_in_model`` builds), so the network stays the same object and class:
the bundle's trainer, the feature cache and :class:`~model_core.predictor.VolumePredictor`
work on it unchanged, and peft's ``merge_and_unload`` turns it back into a plain network
whose ``state_dict`` is an ordinary checkpoint. What peft does not know, and this module
adds, is the network's vocabulary: named groups of target layers (:data:`LORA_TARGETS`),
the adapter file that sits beside a base checkpoint (adapters plus whatever else trained,
plus the settings to rebuild them), and the merge of an adapter file into a checkpoint.
(The checkpoint objects MONAI's ``CheckpointSaver`` saves are in :mod:`model_core.workflows.checkpointing`.)

Adapter file (``torch.save``, readable with ``weights_only=True``)::

    {"lora": {"settings": {"rank", "alpha", "targets", "target_modules", "base_checkpoint"},
              "adapters": peft's adapter state dict (get_peft_model_state_dict),
              "trained": {name: tensor} of other parameters that trained (freezing matrix)},
     "icl_sam2": architecture record (preset, image size, classes...)}
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Sequence

import torch

from model_core.io.files import atomic_path
from model_core.modeling.checkpoint import save_checkpoint
from model_core.modeling.presets import build_icl_sam2

__all__ = [
    "LORA_TARGETS",
    "adapter_parameter_names",
    "adapter_state",
    "attach_lora",
    "load_adapter_state",
    "load_adapters",
    "lora_settings",
    "lora_target_modules",
    "merge_adapter_file",
    "merge_lora",
    "merged_copy",
    "merged_state_dict",
    "save_adapters",
]

#: Named LoRA target groups: a regular expression over module names (``re.fullmatch``,
#: ``torch.nn.Linear`` modules only) and what it selects.
LORA_TARGETS: dict[str, tuple[str, str]] = {
    "image_encoder.attn": (
        r"image_encoder\.trunk\.blocks\.\d+\.attn\.(qkv|proj)",
        "Hiera's attention qkv and output projections",
    ),
    "image_encoder.mlp": (r"image_encoder\.trunk\.blocks\.\d+\.mlp\.layers\.\d+", "Hiera's MLP layers"),
    "memory_attention.attn": (
        r"memory_attention\.layers\.\d+\.(self_attn|cross_attn_image)\.(q|k|v|out)_proj",
        "memory attention's self and cross attention projections",
    ),
    "mask_decoder.transformer": (
        r"sam_mask_decoder\.transformer\.(layers\.\d+\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
        r"|final_attn_token_to_image)\.(q|k|v|out)_proj",
        "the mask decoder's two-way transformer attention projections",
    ),
}

_ADAPTER_NAME = "default"
_TUNER = "_lora_tuner"  # peft's LoraModel, kept in __dict__: not a registered submodule (it holds the network)


def _validate_targets(targets: str | Sequence[str]) -> list[str]:
    names = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, (list, tuple)) else None
    valid = ", ".join(f"{k!r} ({v[1]})" for k, v in LORA_TARGETS.items())
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"lora_targets must be a non-empty list of target groups among {valid}; got {targets!r}.")
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"Unknown LoRA target group(s) {unknown}; valid: {valid}.")
    return list(dict.fromkeys(names))


def lora_target_modules(model: torch.nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Full names of the ``torch.nn.Linear`` layers of ``model`` that the target groups select.

    Raises:
        ValueError: an unknown group (the valid ones are listed) or one that selects nothing in this model.
    """
    names = _validate_targets(targets)
    modules = []
    for group in names:
        pattern = re.compile(LORA_TARGETS[group][0])
        found = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and pattern.fullmatch(n)]
        if not found:
            raise ValueError(
                f"LoRA target group {group!r} ({LORA_TARGETS[group][1]}) selects no Linear layer in this model."
            )
        modules += found
    return modules


def lora_settings(model: torch.nn.Module) -> dict[str, Any] | None:
    """The LoRA settings of ``model`` (rank, alpha, targets, target_modules, base_checkpoint), None without adapters."""
    return getattr(model, "lora", None)


def attach_lora(
    model: torch.nn.Module,
    rank: int,
    targets: str | Sequence[str] = ("image_encoder.attn",),
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    base_checkpoint: str | None = None,
) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place, through peft (``LoraModel`` with explicit module names).

    Adapters start as peft initialises them (``B = 0``): the adapted model computes what the
    base does. peft leaves only the adapters trainable; a training network's
    ``set_trainable`` then applies the freezing matrix to the base weights.

    Args:
        model: the network (any ``InContextSAM2``).
        rank: LoRA rank ``r`` (>= 1); each target ``Linear(in, out)`` gains ``r * (in + out)`` weights.
        targets: groups of :data:`LORA_TARGETS`.
        alpha: LoRA ``alpha`` (scaling ``alpha / r``); default ``rank`` (scaling 1).
        target_modules: explicit module names (what an adapter file records), instead of resolving ``targets``.
        base_checkpoint: recorded in the settings: the weights the adapters belong to.

    Returns:
        ``model`` itself, adapted.

    Raises:
        ValueError: bad rank, alpha or targets; adapters already attached.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_rank must be an integer >= 1 to attach adapters (0 turns LoRA off); got {rank!r}.")
    if lora_settings(model) is not None:
        raise ValueError("The model already has LoRA adapters; merge them (merge_lora) or build a fresh model first.")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, got {alpha}.")
    targets = _validate_targets(targets)
    if target_modules is None:
        target_modules = lora_target_modules(model, targets)
    else:
        present = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        missing = [n for n in target_modules if n not in present]
        if missing:
            raise ValueError(f"LoRA target modules not in this model (another preset?): {missing[:5]}.")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(target_modules))
    tuner = LoraModel(model, config, _ADAPTER_NAME)
    model.__dict__[_TUNER] = tuner
    model.lora = {
        "rank": rank,
        "alpha": alpha,
        "targets": targets,
        "target_modules": list(target_modules),
        "base_checkpoint": base_checkpoint,
    }
    return model


def adapter_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of ``model``'s LoRA adapter parameters (peft's ``lora_A``/``lora_B`` inside its LoRA layers)."""
    from peft.tuners.lora import LoraLayer

    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for attr in LoraLayer.adapter_layer_names:
                for pname, _ in getattr(module, attr).named_parameters():
                    names.add(f"{module_name}.{attr}.{pname}" if module_name else f"{attr}.{pname}")
    return names


def _require_lora(model: torch.nn.Module) -> dict[str, Any]:
    settings = lora_settings(model)
    if settings is None:
        raise ValueError("The model has no LoRA adapters (build it with lora_rank > 0 or attach_lora).")
    return settings


def adapter_state(model: torch.nn.Module) -> dict[str, Any]:
    """What rebuilds the trained model from its base: settings, adapters and the other trained parameters.

    ``trained`` holds the parameters outside the adapters that have ``requires_grad`` (what
    the freezing matrix trained beside the adapters), under the adapted model's names.
    """
    from peft.utils import get_peft_model_state_dict

    settings = _require_lora(model)
    adapters = adapter_parameter_names(model)
    trained = {
        n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad and n not in adapters
    }
    state = get_peft_model_state_dict(model, adapter_name=_ADAPTER_NAME)
    return {
        "settings": copy.deepcopy(settings),
        "adapters": {k: v.detach().cpu().clone() for k, v in state.items()},
        "trained": trained,
    }


def load_adapter_state(model: torch.nn.Module, state: dict[str, Any]) -> torch.nn.Module:
    """Put an :func:`adapter_state` onto ``model``: attach adapters as recorded (unless attached) and load the weights.

    Raises:
        ValueError: not an adapter state, settings that differ from adapters already attached, or
            weights that do not fit the model (named).
    """
    from peft.utils import set_peft_model_state_dict

    if not isinstance(state, dict) or not {"settings", "adapters"} <= set(state):
        raise ValueError(
            "Not a LoRA adapter state: expected {'settings', 'adapters', 'trained'} (see model_core.training.lora)."
        )
    s = state["settings"]
    current = lora_settings(model)
    if current is None:
        attach_lora(model, int(s["rank"]), s["targets"], s["alpha"], s["target_modules"], s.get("base_checkpoint"))
    elif any(current[k] != s[k] for k in ("rank", "alpha", "target_modules")):
        raise ValueError(
            f"Adapter settings (rank {s['rank']}, alpha {s['alpha']}, targets {s['targets']}) differ from "
            f"the model's (rank {current['rank']}, alpha {current['alpha']}, targets {current['targets']})."
        )
    result = set_peft_model_state_dict(model, state["adapters"], adapter_name=_ADAPTER_NAME)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    own = dict(model.named_parameters())
    strays = sorted(set(state.get("trained", {})) - set(own))
    if unexpected or strays:
        raise ValueError(
            f"Adapter weights do not fit this model: unexpected {unexpected[:5]}, unknown trained {strays[:5]}."
        )
    with torch.no_grad():
        for name, value in state.get("trained", {}).items():
            if own[name].shape != value.shape:
                raise ValueError(f"Trained weight {name}: file {tuple(value.shape)} vs model {tuple(own[name].shape)}.")
            own[name].copy_(value)
    return model


def save_adapters(model: torch.nn.Module, path: str | os.PathLike, record: dict[str, Any] | None = None) -> None:
    """Write the adapter file (see the module docstring) atomically; ``record`` is the architecture record.

    Preset and image size are read from the model when the record lacks them.
    """
    record = {
        "preset": getattr(model, "preset", None),
        "image_size": getattr(model, "image_size", None),
        **(record or {}),
    }
    with atomic_path(path) as tmp:
        torch.save({"lora": adapter_state(model), "icl_sam2": record}, tmp)


def load_adapters(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Attach and load the adapters of an adapter file onto a base ``model`` (which must hold the base weights).

    Raises:
        ValueError: the file is missing or holds no adapters, or they do not fit the model.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Adapter file {str(path)!r} does not exist.")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "lora" not in data:
        raise ValueError(f"{str(path)!r} is no LoRA adapter file (no 'lora' entry; model.pt is the merged model).")
    return load_adapter_state(model, data["lora"])


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Merge the adapters into the base weights in place (peft's ``merge_and_unload``): a plain network again.

    Returns:
        ``model`` (the same object), whose ``state_dict`` loads into a network built without LoRA.
    """
    _require_lora(model)
    merged = model.__dict__.pop(_TUNER).merge_and_unload()
    del merged.lora
    return merged


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of ``model`` with its adapters merged; ``model`` keeps training unchanged.

    The copy leaves out a training feature cache (features, not weights).
    """
    cache = getattr(model, "feature_cache", None)
    if cache is not None:
        model.feature_cache = None
    try:
        clone = copy.deepcopy(model)
    finally:
        if cache is not None:
            model.feature_cache = cache
    return merge_lora(clone) if lora_settings(clone) is not None else clone


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as a plain network has it: adapters merged (the model itself is left as it is)."""
    if lora_settings(model) is None:
        return model.state_dict()
    return merged_copy(model).state_dict()


def merge_adapter_file(
    adapter_file: str, output: str, base_checkpoint: str | None = None, device: str | torch.device = "cpu"
) -> str:
    """Base checkpoint + adapter file -> a plain merged checkpoint (for serving or inference).

    Args:
        adapter_file: written by :func:`save_adapters` or the bundle (``model_lora.pt``).
        output: the merged checkpoint to write (``{"model": state_dict, "icl_sam2": record}``).
        base_checkpoint: the base weights; default the one the adapter file records.
        device: where to merge.

    Returns:
        ``output``.

    Raises:
        ValueError: no base checkpoint known, or files that do not fit each other.
    """

    data = torch.load(adapter_file, map_location="cpu", weights_only=True) if os.path.isfile(adapter_file) else None
    if not isinstance(data, dict) or "lora" not in data:
        raise ValueError(f"{adapter_file!r} is no LoRA adapter file.")
    record = data.get("icl_sam2") or {}
    base = base_checkpoint or data["lora"]["settings"].get("base_checkpoint")
    if not base:
        raise ValueError(
            f"{adapter_file!r} records no base checkpoint (trained from random weights); pass base_checkpoint."
        )
    model = build_icl_sam2(
        record.get("preset", "sam2.1_hiera_tiny"), image_size=record.get("image_size"), checkpoint=base, device=device
    )
    load_adapter_state(model, data["lora"])
    save_checkpoint(merge_lora(model), output, {k: v for k, v in record.items() if k not in ("preset", "image_size")})
    return output
