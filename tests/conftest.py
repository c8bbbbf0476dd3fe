"""Test-wide settings: quiet progress bars (sam2's propagate_in_video uses tqdm)."""

import os

os.environ.setdefault("TQDM_DISABLE", "1")
