"""Model ``lesion_proposals``: automatic 3D lesion candidates (sam2's automatic mask generator), to accept or reject.

Served with ``--conf models icl_sam2,lesion_proposals`` (or ``all``). It shares the
``icl_sam2`` settings (bundle, preset, image size, checkpoint, device, intensity
scaling), and adds:

- ``--conf proposal_settings '{"points_per_side": 16, ...}'``: the server's defaults of
  :class:`model_core.proposals.ProposalSettings` (a request may change some of them);
- ``--conf proposal_label lesion``: the configured structure accepted candidates become
  (default: the first of ``--conf labels``).

It has no trainer, strategy or scoring of its own (``icl_sam2`` has them), and its own
:class:`~model_core.serving.service.SegmentationService`, so it also runs alone.
"""

from __future__ import annotations

import json
from typing import Any

from lib.configs.icl_sam2 import ICLSAM2
from lib.infers.lesion_proposals import ProposalInfer
from lib.settings import OPTIONS
from model_core.proposals import ProposalSettings


def parse_proposal_settings(conf: dict[str, str]) -> ProposalSettings:
    """``--conf proposal_settings`` (JSON object of ``ProposalSettings`` fields) as settings, or a ValueError."""
    raw = conf.get("proposal_settings", OPTIONS["proposal_settings"][0])
    try:
        values = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        raise ValueError(f"--conf proposal_settings must be a JSON object, got {raw!r}: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"--conf proposal_settings must be a JSON object of proposal settings, got {raw!r}.")
    try:
        return ProposalSettings.from_dict(values)
    except ValueError as e:
        raise ValueError(f"--conf proposal_settings: {e}") from e


def parse_proposal_label(conf: dict[str, str], labels: dict[str, int]) -> str:
    """``--conf proposal_label``: a configured label name (default: the first)."""
    name = conf.get("proposal_label") or next(iter(labels))
    if name not in labels:
        raise ValueError(f"--conf proposal_label {name!r} is not one of the configured labels {sorted(labels)}.")
    return name


class LesionProposals(ICLSAM2):
    """The ``icl_sam2`` model's settings, status and service, with one infer task: :class:`ProposalInfer`."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.proposal_defaults = parse_proposal_settings(conf)
        self.proposal_label = parse_proposal_label(conf, self.labels)

    def infer(self):
        return {
            self.name: ProposalInfer(
                self.service, self.datastore, self.labels, self.describe, self.proposal_defaults, self.proposal_label
            )
        }

    def trainer(self):
        return None

    def strategy(self):
        return {}

    def scoring_method(self):
        return {}
