"""The freezing matrix: which parameter groups of the network train.

Groups follow sam2's parts (image encoder as trunk and neck, memory attention, memory
encoder, prompt encoder, mask decoder); every ``SAM2Base`` parameter belongs to exactly one,
so a new sam2 attribute fails loudly instead of training silently.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["TRAINABLE_ALIASES", "TRAINABLE_GROUPS", "format_trainable_summary", "parameter_unit", "resolve_trainable"]


#: The freezing matrix's groups and the ``SAM2Base`` attributes each owns. Submodules go to
#: their part; SAM2's loose parameters and small heads go to the part whose ``SAM2Base``
#: method reads them: ``_prepare_memory_conditioned_features`` (what memory attention
#: attends to: the memories' temporal encoding, the no-memory embedding, the pointers'
#: temporal projection), ``_encode_new_memory`` (the no-object spatial embedding),
#: ``_forward_sam_heads`` (the object pointer is the decoder's output token, projected) and
#: ``_use_mask_as_output`` (a mask downsampled into the prompt encoder's mask input).
TRAINABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "image_encoder": ("image_encoder",),
    "memory_attention": ("memory_attention", "maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc", "obj_ptr_tpos_proj"),
    "memory_encoder": ("memory_encoder", "no_obj_embed_spatial"),
    "prompt_encoder": ("sam_prompt_encoder", "mask_downsample"),
    "mask_decoder": ("sam_mask_decoder", "obj_ptr_proj", "no_obj_ptr"),
}


#: Finer units inside a group (what the old ``neck`` setting needs).
_SUBGROUPS = {"image_encoder": ("image_encoder.trunk", "image_encoder.neck")}


_UNITS = tuple(u for g in TRAINABLE_GROUPS for u in _SUBGROUPS.get(g, (g,)))


#: Names for common choices; ``frozen``, ``neck`` and ``all`` are the old ``train_encoder`` values.
TRAINABLE_ALIASES: dict[str, tuple[str, ...]] = {
    "all": tuple(TRAINABLE_GROUPS),
    "frozen": tuple(g for g in TRAINABLE_GROUPS if g != "image_encoder"),
    "neck": ("image_encoder.neck", *(g for g in TRAINABLE_GROUPS if g != "image_encoder")),
    "none": (),
}


_OWNER = {attr: group for group, attrs in TRAINABLE_GROUPS.items() for attr in attrs}


def resolve_trainable(trainable: str | Sequence[str]) -> tuple[str, ...]:
    """The freezing matrix's one point of validation: names to the units that train.

    Args:
        trainable: an alias of :data:`TRAINABLE_ALIASES`, a group of :data:`TRAINABLE_GROUPS`,
            a subgroup (``image_encoder.trunk``, ``image_encoder.neck``) or a list of them.

    Returns:
        The units that train, in a fixed order (groups, with the image encoder as trunk and neck).

    Raises:
        ValueError: a name that is none of these, or not a string or list; the message lists the valid names.
    """
    valid = (
        f"groups {list(TRAINABLE_GROUPS)}, subgroups {list(_SUBGROUPS['image_encoder'])} or aliases "
        f"{list(TRAINABLE_ALIASES)}"
    )
    names = [trainable] if isinstance(trainable, str) else trainable
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"trainable must be a name or a list of names among {valid}; got {trainable!r}.")
    units: set[str] = set()
    for name in names:
        key = name.strip()
        if key in TRAINABLE_ALIASES:
            expanded = TRAINABLE_ALIASES[key]
        elif key in TRAINABLE_GROUPS or key in _UNITS:
            expanded = (key,)
        else:
            raise ValueError(f"Unknown trainable group {name!r}; valid: {valid}.")
        for unit in expanded:
            units.update(_SUBGROUPS.get(unit, (unit,)))
    return tuple(u for u in _UNITS if u in units)


def parameter_unit(name: str) -> str:
    """The freezing-matrix unit that owns parameter (or module) ``name`` of the network.

    Raises:
        ValueError: a parameter no group owns (a ``SAM2Base`` attribute this table does not know yet).
    """
    head, _, rest = name.partition(".")
    group = _OWNER.get(head)
    if group is None:
        raise ValueError(
            f"Parameter {name!r} belongs to no trainable group; add its attribute {head!r} to "
            "model_core.training.trainable.TRAINABLE_GROUPS."
        )
    if group in _SUBGROUPS:
        return f"{group}.{rest.partition('.')[0]}"
    return group


def format_trainable_summary(
    summary: dict[str, dict[str, int]], units: Sequence[str], lora: dict[str, Any] | None
) -> str:
    """The training log's table of trainable parameters per group (from ``InContextSAM2Train.trainable_summary``)."""
    lines = [
        f"Trainable parameters (trainable: {list(units)}; "
        + (f"LoRA rank {lora['rank']} on {lora['targets']}" if lora else "no LoRA")
        + "):"
    ]
    for group, row in summary.items():
        if group == "lora" and not lora:
            continue
        share = row["trainable"] / row["total"] if row["total"] else 0.0
        lines.append(f"  {group:<17} {row['trainable']:>12,} / {row['total']:>12,}  ({share:6.1%})")
    return "\n".join(lines)
