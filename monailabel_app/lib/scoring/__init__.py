"""ICL-SAM2 MONAI Label app."""
