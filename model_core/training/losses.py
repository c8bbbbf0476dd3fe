"""SAM2's training loss for in-context episodes, on MONAI's focal and Dice losses.

SAM2 (``training/loss_fns.py``, ``MultiStepMultiMasksAndIous``) scores each of the
three candidate masks with focal x20 + Dice x1, trains the mask losses on the best
candidate only, regresses the predicted IoU with L1 and the object score with BCE;
mask and IoU losses count only where the object is present. sam2's pip package
ships no training code, and MONAI has the parts but not this multi-candidate
combination, so it is assembled here from ``monai.losses.FocalLoss`` and
``monai.losses.DiceLoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss

__all__ = ["ICLSAM2Loss"]


class ICLSAM2Loss(torch.nn.Module):
    """Multi-candidate mask loss, IoU regression and object-score loss.

    Args:
        weight_focal, weight_dice, weight_iou, weight_class: SAM2.1's weights (20, 1, 1, 1).
        focal_alpha, focal_gamma: sigmoid focal loss parameters (0.25, 2).
        supervise_all_iou: regress the IoU of all candidates (SAM2.1 training) or only the best.
        return_parts: return the dict of parts (True) or only the total (False, for
            MONAI/Ignite trainers, which call ``loss(pred, target).mean()``); the parts of
            the last call are kept in ``last_parts`` either way.
    """

    def __init__(
        self,
        weight_focal: float = 20.0,
        weight_dice: float = 1.0,
        weight_iou: float = 1.0,
        weight_class: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        supervise_all_iou: bool = True,
        return_parts: bool = True,
    ):
        super().__init__()
        self.weights = {"focal": weight_focal, "dice": weight_dice, "iou": weight_iou, "class": weight_class}
        self.focal = FocalLoss(use_softmax=False, gamma=focal_gamma, alpha=focal_alpha, reduction="none")
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, reduction="none")
        self.supervise_all_iou = supervise_all_iou
        self.return_parts = return_parts
        self.last_parts: dict[str, float] = {}

    def forward(
        self, outputs: dict[str, list[torch.Tensor]], query_masks: torch.Tensor
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """Loss of an episode batch.

        Args:
            outputs: :meth:`model_core.training.network.InContextSAM2Train.forward` output (lists over Q query slices).
            query_masks: ``(B, Q, K, H, W)`` ground truth of the query slices.

        Returns:
            ``loss`` (weighted total, for backward) and its unweighted parts
            ``focal``, ``dice``, ``iou``, ``class``, each averaged over tracks and slices.
        """
        Q = len(outputs["multimask_logits"])
        if query_masks.ndim != 5 or query_masks.shape[1] != Q:
            raise ValueError(f"query_masks must be (B, {Q}, K, H, W), got {tuple(query_masks.shape)}.")
        parts = {name: 0.0 for name in self.weights}
        for q in range(Q):
            logits = outputs["multimask_logits"][q]  # (N, M, H, W)
            target = query_masks[:, q].flatten(0, 1)[:, None].to(logits.device, logits.dtype)  # (N, 1, H, W)
            if target.shape[-2:] != logits.shape[-2:]:
                raise ValueError(
                    f"query_masks are {tuple(target.shape[-2:])} but predictions are {tuple(logits.shape[-2:])}."
                )
            target_m = target.expand_as(logits)
            present = (target.flatten(1).sum(1) > 0).to(logits.dtype)  # (N,)
            focal = self.focal(logits, target_m).flatten(2).mean(-1)  # (N, M)
            dice = self.dice(logits, target_m).flatten(1)  # (N, M)
            best = torch.argmin(self.weights["focal"] * focal + self.weights["dice"] * dice, dim=1)
            rows = torch.arange(logits.shape[0], device=logits.device)
            with torch.no_grad():
                pred = logits > 0
                inter = (pred & (target_m > 0)).flatten(2).sum(-1).float()
                union = (pred | (target_m > 0)).flatten(2).sum(-1).float()
                actual_iou = inter / union.clamp(min=1.0)
            iou_l1 = F.l1_loss(outputs["ious"][q].float(), actual_iou, reduction="none")  # (N, M)
            iou = iou_l1.mean(1) if self.supervise_all_iou else iou_l1[rows, best]
            cls = F.binary_cross_entropy_with_logits(
                outputs["object_score_logits"][q].float().flatten(), present, reduction="none"
            )
            parts["focal"] = parts["focal"] + (focal[rows, best] * present).mean()
            parts["dice"] = parts["dice"] + (dice[rows, best] * present).mean()
            parts["iou"] = parts["iou"] + (iou * present).mean()
            parts["class"] = parts["class"] + cls.mean()
        parts = {k: v / Q for k, v in parts.items()}
        total = sum(self.weights[k] * parts[k] for k in parts)
        self.last_parts = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in parts.items()}
        return {"loss": total, **parts} if self.return_parts else total
