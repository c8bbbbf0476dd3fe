"""Start the MONAI Label server on the ICL-SAM2 app; it listens on 127.0.0.1 unless ``--host`` says otherwise.

    icl-sam2 serve --studies /data/my_study --conf labels '{"kidney": 1}'

Every argument is MONAI Label's ``start_server`` argument (``--port``, ``--host``,
``--conf name value``, ...). Two defaults differ from ``monailabel start_server``:
``--app`` is this repository's ``monailabel_app``, and ``--host`` is ``127.0.0.1``
(MONAI Label's is ``0.0.0.0``, which exposes the datastore and the models to the
whole network; pass ``--host 0.0.0.0`` deliberately, see README "Running for a team").
Arguments reach MONAI Label as given: the ``monailabel`` shell launcher re-splits
quoted JSON such as ``'{"kidney": 1}'``.

``MONAI_LABEL_CORS_ORIGINS`` (MONAI Label's way to name the web origins a browser may
use the server from) stops MONAI Label 0.8.5 at start-up: it dumps its settings with
``json.dumps``, which cannot encode pydantic's ``AnyHttpUrl`` (and its training and
scoring subprocesses do the same). Here the variable is taken out of the environment
before MONAI Label reads it and passed on as ``--conf allowed_origins``, the app's own
option (``monailabel_app/lib/origin.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "monailabel_app"
CORS_VARIABLE = "MONAI_LABEL_CORS_ORIGINS"


def with_cors_origins(argv: list[str], environ: dict[str, str]) -> list[str]:
    """``argv`` with ``MONAI_LABEL_CORS_ORIGINS`` (removed from ``environ``) as ``--conf allowed_origins``.

    An ``--conf allowed_origins`` already in ``argv`` is kept and the variable dropped.
    """
    value = environ.pop(CORS_VARIABLE, None)
    if value is None:
        return argv
    if any(argv[i : i + 2] == ["--conf", "allowed_origins"] for i in range(len(argv))):
        print(f"{CORS_VARIABLE} ignored: --conf allowed_origins is given", file=sys.stderr)
        return argv
    return [*argv, "--conf", "allowed_origins", value]


def main(argv: list[str]) -> None:
    argv = with_cors_origins(argv, os.environ)
    from monailabel.main import Main  # after the environment is settled: MONAI Label reads it on import

    class ICLSAM2Main(Main):
        """MONAI Label's command line with the app and a loopback host as defaults."""

        def args_start_server(self, parser):
            super().args_start_server(parser)
            parser.set_defaults(app=str(APP), host="127.0.0.1")

    sys.argv = [sys.argv[0], "start_server", *argv]
    ICLSAM2Main().run()


if __name__ == "__main__":
    main(sys.argv[1:])
