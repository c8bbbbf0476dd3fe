"""``python -m icl_sam2 ...`` is ``icl-sam2 ...``."""

from icl_sam2.cli import main

main()
