"""Start the MONAI Label server on the ICL-SAM2 app; it listens on 127.0.0.1 unless ``--host`` says otherwise.

    icl-sam2 serve --studies /data/my_study --conf labels '{"kidney": 1}'

Every argument is MONAI Label's ``start_server`` argument (``--port``, ``--host``,
``--conf name value``, ...). Two defaults differ from ``monailabel start_server``:
``--app`` is this repository's ``monailabel_app``, and ``--host`` is ``127.0.0.1``
(MONAI Label's is ``0.0.0.0``, which exposes the datastore and the models to the
whole network; pass ``--host 0.0.0.0`` deliberately, see README "Running for a team").
Arguments reach MONAI Label as given: the ``monailabel`` shell launcher re-splits
quoted JSON such as ``'{"kidney": 1}'``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from monailabel.main import Main

APP = Path(__file__).resolve().parents[1] / "monailabel_app"


class ICLSAM2Main(Main):
    """MONAI Label's command line with the app and a loopback host as defaults."""

    def args_start_server(self, parser):
        super().args_start_server(parser)
        parser.set_defaults(app=str(APP), host="127.0.0.1")


def main(argv: list[str]) -> None:
    sys.argv = [sys.argv[0], "start_server", *argv]
    ICLSAM2Main().run()


if __name__ == "__main__":
    main(sys.argv[1:])
