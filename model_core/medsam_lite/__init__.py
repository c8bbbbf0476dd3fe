"""LiteMedSAM, the box-prompt model of the CVPR 2024 "MedSAM on Laptop" challenge, with its real weights:
the model (``model``), box prompts on volumes (``volume``), the challenge's case format and scoring
(``challenge``) and the evaluation against an atlas (``atlas``)."""

from model_core.medsam_lite.model import LiteMedSAM

__all__ = ["LiteMedSAM"]
