"""Model presets: Meta's SAM2 / SAM2.1 Hiera configurations and a tiny CPU preset.

The official architectures are read from the YAML files that ship inside Meta's
``sam2`` package and instantiated with ``hydra.utils.instantiate`` on a plain
OmegaConf object. We deliberately avoid ``hydra.compose`` and its global state:
MONAI Label's own SAM2 task initialises and clears Hydra's ``GlobalHydra``
singleton, and a model built here must neither break it nor be broken by it.

Only the parameters that depend on the image size are overridden
(``image_size`` and the RoPE ``feat_sizes`` of memory attention), so official
checkpoints load strictly at any size.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import sam2
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from model_core.modeling.checkpoint import load_checkpoint
from model_core.modeling.compile import check_compile_mode, compile_network
from model_core.modeling.encoders import check_encoder_backend
from model_core.modeling.precision import resolve_precision

__all__ = ["MODEL_TARGET", "PRESETS", "VIDEO_PREDICTOR_SETTINGS", "build_icl_sam2", "preset_config"]

#: Class that every preset instantiates (a subclass of sam2's SAM2Base); training builds its
#: subclass instead (``model_core.training.builder``), as sam2's training YAML names ``SAM2Train``.
MODEL_TARGET = "model_core.modeling.network.InContextSAM2"

#: What ``sam2.build_sam.build_sam2_video_predictor`` adds to the YAML for SAM2 users
#: (its ``apply_postprocessing=True`` overrides; ``fill_hole_area`` lives on
#: :class:`~model_core.predictor.VolumePredictor`). They act in eval mode only, so
#: training is as sam2's trainer has it.
VIDEO_PREDICTOR_SETTINGS: dict[str, Any] = {
    "sam_mask_decoder_extra_args": {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    },
    "binarize_mask_from_pts_for_mem_enc": True,
}

#: Preset name -> YAML file inside the installed ``sam2`` package.
_OFFICIAL_YAML = {
    "sam2_hiera_tiny": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large": "configs/sam2/sam2_hiera_l.yaml",
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def _tiny_config() -> dict[str, Any]:
    """A SAM2.1-style network small enough for CPU tests and demos.

    Same components and flags as SAM2.1 Hiera-tiny, with a 4-block Hiera of width
    32, a 64-channel neck/decoder, a 32-channel memory and 2 memory-attention
    layers. About 1/40 of Hiera-tiny's parameters; random weights only (there is
    no official checkpoint for it).
    """
    d_model, mem_dim, embed = 64, 32, 32
    return {
        "model": {
            "image_encoder": {
                "_target_": "sam2.modeling.backbones.image_encoder.ImageEncoder",
                "scalp": 1,
                "trunk": {
                    "_target_": "sam2.modeling.backbones.hieradet.Hiera",
                    "embed_dim": embed,
                    "num_heads": 1,
                    "stages": [1, 1, 2, 1],
                    "global_att_blocks": [3],
                    "window_spec": [8, 4, 8, 4],
                    "window_pos_embed_bkg_spatial_size": [4, 4],
                },
                "neck": {
                    "_target_": "sam2.modeling.backbones.image_encoder.FpnNeck",
                    "position_encoding": {
                        "_target_": "sam2.modeling.position_encoding.PositionEmbeddingSine",
                        "num_pos_feats": d_model,
                        "normalize": True,
                        "scale": None,
                        "temperature": 10000,
                    },
                    "d_model": d_model,
                    "backbone_channel_list": [embed * 8, embed * 4, embed * 2, embed],
                    "fpn_top_down_levels": [2, 3],
                    "fpn_interp_model": "nearest",
                },
            },
            "memory_attention": {
                "_target_": "sam2.modeling.memory_attention.MemoryAttention",
                "d_model": d_model,
                "pos_enc_at_input": True,
                "layer": {
                    "_target_": "sam2.modeling.memory_attention.MemoryAttentionLayer",
                    "activation": "relu",
                    "dim_feedforward": 256,
                    "dropout": 0.1,
                    "pos_enc_at_attn": False,
                    "self_attention": {
                        "_target_": "sam2.modeling.sam.transformer.RoPEAttention",
                        "rope_theta": 10000.0,
                        "feat_sizes": [64, 64],
                        "embedding_dim": d_model,
                        "num_heads": 1,
                        "downsample_rate": 1,
                        "dropout": 0.1,
                    },
                    "d_model": d_model,
                    "pos_enc_at_cross_attn_keys": True,
                    "pos_enc_at_cross_attn_queries": False,
                    "cross_attention": {
                        "_target_": "sam2.modeling.sam.transformer.RoPEAttention",
                        "rope_theta": 10000.0,
                        "feat_sizes": [64, 64],
                        "rope_k_repeat": True,
                        "embedding_dim": d_model,
                        "num_heads": 1,
                        "downsample_rate": 1,
                        "dropout": 0.1,
                        "kv_in_dim": mem_dim,
                    },
                },
                "num_layers": 2,
            },
            "memory_encoder": {
                "_target_": "sam2.modeling.memory_encoder.MemoryEncoder",
                "out_dim": mem_dim,
                "in_dim": d_model,
                "position_encoding": {
                    "_target_": "sam2.modeling.position_encoding.PositionEmbeddingSine",
                    "num_pos_feats": mem_dim,
                    "normalize": True,
                    "scale": None,
                    "temperature": 10000,
                },
                "mask_downsampler": {
                    "_target_": "sam2.modeling.memory_encoder.MaskDownSampler",
                    "embed_dim": d_model,
                    "kernel_size": 3,
                    "stride": 2,
                    "padding": 1,
                },
                "fuser": {
                    "_target_": "sam2.modeling.memory_encoder.Fuser",
                    "layer": {
                        "_target_": "sam2.modeling.memory_encoder.CXBlock",
                        "dim": d_model,
                        "kernel_size": 7,
                        "padding": 3,
                        "layer_scale_init_value": 1e-6,
                        "use_dwconv": True,
                    },
                    "num_layers": 1,
                },
            },
            "num_maskmem": 7,
            "image_size": 128,
            "sigmoid_scale_for_mem_enc": 20.0,
            "sigmoid_bias_for_mem_enc": -10.0,
            "use_mask_input_as_output_without_sam": True,
            "directly_add_no_mem_embed": True,
            "no_obj_embed_spatial": True,
            "use_high_res_features_in_sam": True,
            "multimask_output_in_sam": True,
            "iou_prediction_use_sigmoid": True,
            "use_obj_ptrs_in_encoder": True,
            "add_tpos_enc_to_obj_ptrs": True,
            "proj_tpos_enc_in_obj_ptrs": True,
            "use_signed_tpos_enc_to_obj_ptrs": True,
            "only_obj_ptrs_in_the_past_for_eval": True,
            "pred_obj_scores": True,
            "pred_obj_scores_mlp": True,
            "fixed_no_obj_ptr": True,
            "multimask_output_for_tracking": True,
            "use_multimask_token_for_obj_ptr": True,
            "multimask_min_pt_num": 0,
            "multimask_max_pt_num": 1,
            "use_mlp_for_obj_ptr_proj": True,
            "compile_image_encoder": False,
        }
    }


#: All preset names, with their default image size.
PRESETS: dict[str, int] = {name: 512 for name in _OFFICIAL_YAML}
PRESETS["tiny"] = 128


def _sam2_package_dir() -> str:

    return os.path.dirname(sam2.__file__)


def preset_config(preset: str, image_size: int | None = None, video_predictor_settings: bool = True) -> dict[str, Any]:
    """Return the model config of ``preset`` as a plain dict (``_target_`` style).

    Args:
        preset: one of ``PRESETS`` (e.g. ``"sam2.1_hiera_tiny"`` or ``"tiny"``).
        image_size: square input size in pixels, a multiple of 32 (default: the
            preset's default, 512 for the official ones, 128 for ``tiny``).
        video_predictor_settings: add ``VIDEO_PREDICTOR_SETTINGS``, so the network
            predicts what ``build_sam2_video_predictor`` gives SAM2 users; False gives
            the YAML as it is (what the equivalence test hands to Meta's builder).

    Raises:
        ValueError: unknown preset or invalid image size.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}. Choose one of: {', '.join(sorted(PRESETS))}.")
    image_size = PRESETS[preset] if image_size is None else int(image_size)
    # Hiera pools 4x then 2x three times and the memory encoder downsamples 16x: sizes
    # must be divisible by 32 for the skip connections of the mask decoder to line up.
    if image_size < 64 or image_size % 32 != 0:
        raise ValueError(f"image_size must be a multiple of 32 and at least 64, got {image_size}.")
    if preset == "tiny":
        cfg = copy.deepcopy(_tiny_config())
    else:
        path = os.path.join(_sam2_package_dir(), _OFFICIAL_YAML[preset])
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    model = cfg["model"]
    model["_target_"] = MODEL_TARGET
    model["image_size"] = image_size
    feat = image_size // 16  # stride-16 memory-attention feature map
    layer = model["memory_attention"]["layer"]
    layer["self_attention"]["feat_sizes"] = [feat, feat]
    layer["cross_attention"]["feat_sizes"] = [feat, feat]
    if video_predictor_settings:
        model.update(copy.deepcopy(VIDEO_PREDICTOR_SETTINGS))
    return model


def build_icl_sam2(
    preset: str = "sam2.1_hiera_tiny",
    image_size: int | None = None,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    model_class: str = MODEL_TARGET,
    encoder_backend: str = "torch",
    encoder_cache_dir: str | None = None,
    compile: str = "off",
    **model_kwargs: Any,
):
    """Build an :class:`~model_core.modeling.network.InContextSAM2` from a preset, in eval mode.

    Args:
        preset: a name from ``PRESETS``.
        image_size: square model input size (multiple of 32); default per preset.
        checkpoint: optional path of an official SAM2/SAM2.1, MedSAM2, Medical-SAM2
            or ICL-SAM2 training checkpoint, loaded strictly.
        device: where to put the model.
        precision: ``"fp32"`` (default, bit-faithful to SAM2), ``"bf16"`` (bfloat16 autocast
            inside the network) or ``"auto"``, resolved here for ``device`` to ``bf16`` where it
            is native (CUDA with bf16, CPUs with AMX-BF16 or AVX512-BF16) and ``fp32``
            elsewhere (:func:`~model_core.modeling.precision.resolve_precision`). The model's
            ``precision`` attribute holds the resolved value.
        model_class: the dotted name of the class to instantiate, ``InContextSAM2`` or a subclass
            with the same constructor (training passes its own, so this module never imports it).
        encoder_backend: who computes image features in eval mode: ``torch`` (default), ``torch-bf16``,
            ``onnxruntime``, ``openvino``, ``openvino-bf16`` or ``auto``
            (:mod:`model_core.modeling.encoders`); exported backends export on first use, after
            the checkpoint is loaded.
        encoder_cache_dir: where exported encoders and ``auto``'s probe results are kept.
        compile: ``off`` (default), ``default``, ``reduce-overhead`` or ``max-autotune``: the image
            encoder and the tracking step under ``torch.compile`` as sam2's ``vos_optimized=True``
            (:mod:`model_core.modeling.compile`; for GPUs).
        model_kwargs: extra constructor arguments of ``InContextSAM2`` or
            ``SAM2Base`` (e.g. ``memory_storage_dtype``, ``encoder_batch_size``).

    Returns:
        The model in eval mode (:func:`model_core.training.network.build_training_network` builds one to train).
    """

    precision = resolve_precision(precision, device)  # bad values fail before the model is built
    encoder_backend = check_encoder_backend(encoder_backend)
    compile = check_compile_mode(compile)
    cfg = preset_config(preset, image_size)
    cfg.update(model_kwargs)
    cfg.update(precision=precision, encoder_backend=encoder_backend, encoder_cache_dir=encoder_cache_dir)
    cfg["_target_"] = model_class
    model = instantiate(cfg, _recursive_=True, _convert_="all")
    model.preset = preset
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return compile_network(model.to(device).eval(), compile)
