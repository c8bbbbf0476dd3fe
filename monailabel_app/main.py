"""ICL-SAM2 MONAI Label app: in-context and interactive SAM2 segmentation for 3D Slicer and OHIF.

    icl-sam2 serve --studies <images> --conf models icl_sam2 \
        [--conf labels '{"kidney": 1}'] [--conf preset sam2.1_hiera_tiny] [--conf checkpoint <file>] \
        [--conf device cpu] [--conf modality CT]

Layout as in MONAI Label's radiology app: lib/configs (one TaskConfig per model),
lib/infers, lib/trainers, lib/activelearning, lib/scoring. The options are listed
in lib/settings.py and under /info's ``config``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First

# MONAI Label puts the app's folder on sys.path while it loads this file, so `lib` imports here (as in its
# sample apps) and stays in sys.modules afterwards;
# model_core is the installed project (scripts/setup.sh installs it into the venv).
import lib.configs.icl_sam2
import lib.configs.lesion_proposals
import lib.configs.medsam_lite
from lib import routes
from lib.activelearning.random import SafeRandom
from lib.datastore import CheckedDatastore
from lib.dicomweb import CheckedDICOMwebDatastore
from lib.messages import LastErrors, panel_name
from lib.origin import parse_origins
from lib.readonly import ReadOnlyDatastore, is_read_only
from lib.requests import check_id, http_error
from lib.scoring.schedule import ScoringSchedule
from lib.sessions import CheckedSessions
from lib.settings import OPTIONS, parse_labels, parse_modalities, parse_scoring
from model_core.io.seg_metadata import SegIdentity
from model_core.io.validation import InputError

logger = logging.getLogger(__name__)

MODELS = {
    "icl_sam2": lib.configs.icl_sam2.ICLSAM2,
    "lesion_proposals": lib.configs.lesion_proposals.LesionProposals,
    "medsam_lite": lib.configs.medsam_lite.MedSAMLite,
}


class ReadOnlyCheckedDatastore(ReadOnlyDatastore, CheckedDatastore):
    """The local datastore with ``MONAI_LABEL_DATASTORE_READ_ONLY=true`` (``lib/readonly.py``)."""


class ReadOnlyDICOMwebDatastore(ReadOnlyDatastore, CheckedDICOMwebDatastore):
    """The DICOMweb datastore with ``MONAI_LABEL_DATASTORE_READ_ONLY=true`` (``lib/readonly.py``)."""


class ICLSAM2App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        names = [m.strip() for m in conf.get("models", "icl_sam2").split(",") if m.strip()]
        names = list(MODELS) if names == ["all"] else names
        unknown = [n for n in names if n not in MODELS]
        if unknown or not names:
            raise ValueError(
                f"--conf models {conf.get('models')!r}: unknown {unknown}; available: {sorted(MODELS)} (or 'all')."
            )
        self.studies_dir = studies
        self.model_names = names
        self.models = {}
        self._conf = conf
        self._app_dir = app_dir
        #: origins besides the server's own that browsers may use it from (lib/origin.py)
        self.allowed_origins = parse_origins(conf.get("allowed_origins", OPTIONS["allowed_origins"][0]))
        self.scoring_mode, self.scoring_idle_s = parse_scoring(conf)
        #: automatic scoring runs of the server (on_init_complete; lib/scoring/schedule.py)
        self.scoring_schedule: ScoringSchedule | None = None
        #: the last failed inference request per model, for /info and the OHIF panel (lib/messages.py)
        self.last_errors = LastErrors()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="ICL-SAM2",
            description="In-context and interactive SAM2 segmentation of CT and MRI volumes",
            version="0.1.0",
        )
        if is_read_only():
            self._auto_update_scoring = False  # scores are stored in the datastore, which accepts no write
        routes.install(self)  # the reviewed route table, its checks, the error rule and the origin rule

    def init_datastore(self):
        logger.info(f"Init datastore for {self.studies}")
        if self.studies.startswith(("http://", "https://")):  # a DICOMweb PACS, never a folder of that name
            self.studies = self.studies.rstrip("/")
            return self._dicomweb_datastore()
        # read-only: MONAI Label's own flag would skip indexing the folder at start-up (a fresh folder lists nothing);
        # here the index is built in memory and never written, and every write is refused (lib/readonly.py)
        datastore = ReadOnlyCheckedDatastore if is_read_only() else CheckedDatastore
        return datastore(
            self.studies,
            label_values=parse_labels(self._conf).values(),
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
        )

    def _dicomweb_datastore(self):
        """MONAI Label's DICOMweb client for ``--studies`` (its settings: credentials, URL prefixes), our datastore."""
        from dicomweb_client.session_utils import create_session_from_user_pass
        from monailabel.datastore.dicom import DICOMwebClientX

        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(
                settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
            )
        client = DICOMwebClientX(
            url=self.studies,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        self._download_dcmqi_tools()
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
        datastore = ReadOnlyDICOMwebDatastore if is_read_only() else CheckedDICOMwebDatastore
        return datastore(
            client,
            parse_labels(self._conf),
            parse_modalities(self._conf),
            cache_path=cache,
            list_ttl=float(self._conf.get("dicomweb_list_ttl", OPTIONS["dicomweb_list_ttl"][0])),
            seg_identity=self.seg_identity,
        )

    def seg_identity(self, label_info: dict) -> SegIdentity:
        """Who made a label saved as final: a person (``MANUAL``), or, when its ``label_info`` names a served
        model (``{"model": "icl_sam2"}``), that model's result approved by a person (``SEMIAUTOMATIC``, naming
        the model and its weights)."""
        model = label_info.get("model") if isinstance(label_info, dict) else None
        task = self._infers.get(model) if isinstance(model, str) else None
        if task is None:
            return SegIdentity()
        weights = getattr(task, "weights_info", None)
        return SegIdentity.for_model(model, weights() if weights else {}, "SEMIAUTOMATIC")

    def _download_dcmqi_tools(self):
        """dcmqi's ``itkimage2segimage`` comes from its pinned wheel (requirements.txt), never from a download:
        MONAI Label looks for it on PATH, so the environment's own bin folder goes first."""
        bin_dir = os.path.dirname(sys.executable)
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        import shutil

        if not shutil.which("itkimage2segimage"):
            raise RuntimeError(
                "dcmqi's itkimage2segimage is not installed (pip install dcmqi; bash scripts/setup.sh does); "
                "it writes labels to the PACS as DICOM SEG."
            )

    def _configs(self):
        if not self.models:
            for name in self.model_names:
                config = MODELS[name]()
                config.init(name, self.model_dir, self._conf, None, app_dir=self._app_dir, datastore=self.datastore)
                self.models[name] = config
        return self.models

    def init_infers(self):
        infers = {}
        for config in self._configs().values():
            infers.update(config.infer())
        return infers

    def init_trainers(self):
        trainers = {name: config.trainer() for name, config in self._configs().items()}
        # lesion_proposals and medsam_lite have no trainer
        return {name: trainer for name, trainer in trainers.items() if trainer is not None}

    def init_strategies(self):
        strategies = {"first": First()}
        for config in self._configs().values():
            strategies.update(config.strategy())
        return {"random": SafeRandom(choices=["random", *strategies]), **strategies}

    def next_sample(self, request):
        """MONAI Label's Next Sample; a strategy named in the request's options (OHIF's panel: ``random``'s
        ``strategy`` option, ``lib/activelearning/random.py``) must be one of the server's (404 otherwise)."""
        strategy = request.get("strategy") or "random"
        if not isinstance(strategy, str) or strategy not in self._strategies:
            raise http_error(
                InputError(f"Unknown strategy {strategy!r}; this server has {sorted(self._strategies)}.", status=404)
            )
        return super().next_sample(request)

    def init_scoring_methods(self):
        methods = {}
        for config in self._configs().values():
            methods.update(config.scoring_method())
        return methods

    def info(self):
        """MONAI Label's info, with each model's weights, its last failed request, and the scoring schedule.

        ``name`` is what OHIF's panel shows (its subtitle): it also says what the panel cannot
        (untrained weights, labelled series, the last error; ``lib/messages.py``).
        """
        info = super().info()
        info["config_options"] = {k: {"default": v[0], "about": v[1]} for k, v in OPTIONS.items()}
        info["models_status"] = {}
        untrained = []
        for name, config in self._configs().items():
            status = config.status()
            info["models_status"][name] = {**status, "untrained": not status["trained"]}
            if not status["trained"] and name in self._infers:
                untrained.append(name)
        for name in self._infers:
            error = self.last_errors.get(name)
            if error:
                info["models_status"].setdefault(name, {})["last_error"] = error
        datastore = info.get("datastore") or {}
        labelled = None if "error" in datastore else datastore.get("completed")
        info["name"] = panel_name(
            self.name, untrained, labelled, self.last_errors.latest(), str(datastore.get("error") or "")
        )
        info["scoring_schedule"] = {
            "mode": self.scoring_mode if self._auto_update_scoring else "off",
            "idle_s": self.scoring_idle_s,
            "runs_started": len(self.scoring_schedule.runs) if self.scoring_schedule else 0,
        }
        return info

    # ------------------------------------------------------------------ scoring (lib/scoring/schedule.py)
    def on_init_complete(self):
        super().on_init_complete()  # no schedule yet: MONAI Label's start-up run is left to async_scoring
        if not self._server_mode:
            return
        mode = self.scoring_mode if self._auto_update_scoring else "off"
        self.scoring_schedule = ScoringSchedule(
            mode,
            self.scoring_idle_s,
            start_run=lambda: MONAILabelApp.async_scoring(self, None),
            scores_key=self._scores_key,
            weights_stamp=self._weights_stamp,
        )
        self.scoring_schedule.start()

    def async_scoring(self, method, params=None):
        """MONAI Label calls this at start-up, after Next Sample and after training; with ``--conf scoring idle``
        or ``off`` the schedule decides (start-up: no run; a training subprocess: the server sees the new weights)."""
        if method is not None or self.scoring_mode == "immediate":
            return super().async_scoring(method, params)
        if self.scoring_schedule is not None:
            self.scoring_schedule.ask("next sample")
        return {}

    def _weights_stamp(self):
        stamps = []
        for config in self._configs().values():
            path = getattr(getattr(config, "settings", None), "checkpoint", None)
            stamps.append((os.stat(path).st_mtime_ns, os.stat(path).st_size) if path and os.path.isfile(path) else None)
        return tuple(stamps)

    def _scores_key(self):
        return self._weights_stamp(), tuple(sorted(self.datastore().get_labeled_images()))

    def _load_sessions(self, load=False):
        """MONAI Label's sessions, with archives extracted safely and session ids checked (``lib/sessions.py``)."""
        if not load:
            return None
        max_mb = float(self._conf.get("session_max_mb", OPTIONS["session_max_mb"][0]))
        max_files = int(self._conf.get("session_max_files", OPTIONS["session_max_files"][0]))
        return CheckedSessions(
            settings.MONAI_LABEL_SESSION_PATH,
            settings.MONAI_LABEL_SESSION_EXPIRY,
            max_files=max_files,
            max_bytes=int(max_mb * 2**20),
        )

    def _upload_file(self, path) -> bool:
        """A file MONAI Label wrote for this request: an uploaded image (``NamedTemporaryFile`` in the temp
        folder) or a session's image. Clients cannot name such paths: the infer route takes ids only
        (``lib/routes.py`` ``check_infer_request``), and the whole-slide route that took paths is not mounted."""
        if not isinstance(path, str) or not os.path.isabs(path):
            return False
        if self._sessions is not None and self._sessions.owns(path):
            return True
        real = os.path.realpath(path)
        return (
            os.path.isfile(real)
            and os.path.dirname(real) == os.path.realpath(tempfile.gettempdir())
            and os.path.basename(real).startswith("tmp")
        )

    def infer(self, request, datastore=None):
        """:meth:`resolved_infer`, with its failure kept for /info and OHIF's panel (``lib/messages.py``)."""
        model = request.get("model")
        known = isinstance(model, str) and model in self._infers
        image = request.get("image") if isinstance(request.get("image"), str) else None
        try:
            result = self.resolved_infer(request, datastore)
        except HTTPException as e:
            if known:
                self.last_errors.failed(model, e.status_code, e.detail, image and image[:200])
            raise
        except Exception as e:
            if known:
                self.last_errors.failed(model, 500, f"server fault ({type(e).__name__}); see the server's log", None)
            raise
        if known:
            self.last_errors.succeeded(model)
        return result

    def _scoring_waits(self):
        """While an inference runs, and ``scoring_idle_s`` after it, no automatic scoring run starts."""
        return self.scoring_schedule.request() if self.scoring_schedule is not None else contextlib.nullcontext()

    def resolved_infer(self, request, datastore=None):
        """MONAI Label's infer, with the image resolved only as a datastore id (or MONAI Label's own upload file).

        MONAI Label takes any existing path as the image and answers an unknown model or
        image with a 500; here the id is checked (400), looked up (404) and resolved to
        its file first, and ``save_label`` is done here, through the checked datastore.
        """
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"Unknown model {model!r}; this server has {sorted(self._infers)}."
            )
        datastore = datastore or self.datastore()
        image = request.get("image")
        try:
            if self._upload_file(image):
                image_id = None  # an upload or a session for this request only: never saved
                if self._sessions is not None and self._sessions.owns(image):
                    image = self._sessions.volume(image)  # an extracted archive: its one volume
            else:
                image_id = check_id(image, "image")
                if not datastore.get_image_uri(image_id):
                    raise InputError(f"Image {image_id!r} is not in the datastore.", status=404)
        except InputError as e:
            raise http_error(e) from e
        save = request.get("save_label") is True and image_id is not None
        tag = request.get("label_tag", "original")
        with self._scoring_waits():
            result = super().infer(
                {**request, "image": datastore.get_image_uri(image_id) if image_id else image, "save_label": False},
                datastore,
            )
        if save and result.get("file"):
            # after MONAI Label's infer, which saves only when given an id it resolves itself; the tag was checked
            # (never 'final') by the params schema, the file is checked by the datastore like an upload
            result["label"] = datastore.save_label(
                image_id, result["file"], tag, {"model": model, "params": result.get("params")}
            )
            result["tag"] = tag
        return result

    def on_save_label(self, image_id, label_id):
        # a new or changed label changes the support set: its memory is rebuilt on the next request
        for config in self._configs().values():
            config.invalidate_support()
        if self.scoring_schedule is not None:
            self.scoring_schedule.ask("label saved")  # the scores used the old support set
        return super().on_save_label(image_id, label_id)
