"""LiteMedSAM, the box-prompt model of the CVPR 2024 "MedSAM on Laptop" challenge, with its real weights:
the network steps and their torch runtime (``backends``), the model (``model``), box prompts on volumes
(``volume``), the challenge's case format and scoring (``challenge``), generated cases in that format
(``phantom_cases``) and the evaluation against an atlas (``atlas``)."""

from model_core.medsam_lite.model import LiteMedSAM

__all__ = ["LiteMedSAM"]
