"""The bundle's JSON configs as a ``ConfigParser``: ``train.json`` with another config layered on top.

Whoever runs the bundle's pre- and postprocessing outside ``python -m monai.bundle run`` (the app's
service, ``icl-sam2 segment``) reads them here, so intensities, orientation, resizing and the
inversion to a volume's own space are the bundle's in every front end.
"""

from __future__ import annotations

import os
from typing import Any

from monai.bundle import ConfigParser

__all__ = ["load_bundle_parser"]


def load_bundle_parser(
    bundle_dir: str, config: str = "inference.json", overrides: dict[str, Any] | None = None
) -> ConfigParser:
    """A ``ConfigParser`` of the bundle's ``train.json`` with ``config`` layered on top.

    The same layering as ``python -m monai.bundle run --config_file "['train.json', '<config>']"``;
    the paths are absolute, so it works from any working directory.
    """
    configs = os.path.join(os.path.abspath(bundle_dir), "configs")
    parser = ConfigParser()
    parser.read_config([os.path.join(configs, name) for name in dict.fromkeys(["train.json", config])])
    parser["bundle_root"] = os.path.abspath(bundle_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser
