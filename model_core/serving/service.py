"""In-context and interactive segmentation of volume files, for servers (the MONAI Label app).

MONAI Label's ``BasicInferTask`` runs one network over one preprocessed image per
request; it has no notion of a support set built from the datastore's labels, nor
of an interactive session whose image features outlive a request. This module
keeps both, and nothing server-specific: the app maps requests onto it.

- Preprocessing and postprocessing are the bundle's own (``inference.json`` layered
  on ``train.json``), so intensities, orientation, resizing and the
  inversion to the image's original space are exactly the bundle's.
- The network is loaded lazily and reloaded when its checkpoint file changes (a
  newly published model); with no checkpoint it runs its initial weights and says so.
- Support memories are built from the labelled volumes once and rebuilt only when
  those files or the weights change.
- Interactive sessions are keyed by (client, image): the preprocessed volume, its slice
  features and results stay in an LRU under a memory cap that counts every tensor a
  session holds, so a follow-up click runs the decoder and propagation only.
- Volumes read and preprocessed at once are bounded (:class:`VolumeSlots`): a request
  that needs a new volume waits for a slot for a bounded time, then is told to come back
  (:class:`~model_core.validation.ServiceBusy`, a 503 with ``Retry-After`` at a server).

Request flow (where each step happens):

1. A click or box in 3D Slicer / OHIF arrives as ``POST /infer/<model>?image=<id>``:
   ``monailabel_app/lib/routes.py`` (ids checked, off the event loop) ->
   ``monailabel_app/main.py`` ``ICLSAM2App.infer`` (id resolved to a datastore file) ->
   ``monailabel_app/lib/infers/icl_sam2.py`` (params typed by ``lib/requests.py``, the image's header checked;
   its voxels are checked as :meth:`SegmentationService.preprocess` reads them, once; a ``.nii.gz`` is inflated
   by ISA-L and laid out while it inflates: :class:`~model_core.io.readers.IsalNibabelReader`).
2. Voxel ``[i, j, k]`` of the image file -> model grid ``(x, y, slice)``:
   :meth:`SegmentationService.to_model_grid`, through the bundle's own preprocessing
   (:meth:`SegmentationService._session` loads and preprocesses the volume once per client and image).
3. Prompt: :meth:`SegmentationService.interact` groups clicks per slice into
   :class:`~model_core.modeling.prompts.SlicePrompt` (a ROI becomes a box on its middle slice).
4. Support memory (in-context and ``from_in_context``): the datastore's checked labels
   (``lib/datastore.py`` ``labelled_volumes``) -> :meth:`SegmentationService.support_memory`
   -> :func:`~model_core.workflows.inferers.build_support` -> ``InContextSAM2.build_support_memory``
   (``model_core/modeling/network.py``), cached until a label or the weights change.
5. Tracking step on the prompted slice: ``VolumePredictor.add_prompt``
   (``model_core/predictor.py``), which calls sam2's ``track_step`` on the network.
6. Propagation through the volume, both directions: ``VolumePredictor.propagate``.
7. Probabilities ``(K + 1, H, W, D)``: sigmoid of the logits, background first
   (:meth:`SegmentationService.interact` / :meth:`SegmentationService.segment` via
   :class:`~model_core.workflows.inferers.InContextInferer`).
8. Postprocessing to the image's space: :meth:`SegmentationService._to_original`
   (the bundle's postprocessing, inverted transforms, argmax to label values, on the slices
   where a structure can be, or a follow-up's changed slices, written into the previous answer
   once no caller reads it: :func:`~model_core.io.transforms.postprocess_slices`,
   :class:`~model_core.serving.sessions.AnswerReaders`).
9. Label file: ``lib/infers/icl_sam2.py`` ``write_label`` (NIfTI/NRRD, the image's
   affine, gzipped by :mod:`model_core.io.block_gzip`), returned to the viewer; ``save_label``
   stores it through the checked datastore; :meth:`Segmentation.release` then frees the answer for
   the next follow-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from model_core.corrections import correct_incrementally
from model_core.io.transforms import postprocess_slices
from model_core.io.validation import InputError, preprocess_checked_image
from model_core.modeling.checkpoint import load_checkpoint
from model_core.modeling.inputs import as_slices, volume_to_slices
from model_core.modeling.memory import SupportMemory
from model_core.modeling.presets import build_icl_sam2
from model_core.modeling.prompts import SlicePrompt
from model_core.predictor import VolumePredictor
from model_core.serving.config import ServiceConfig, load_bundle_parser
from model_core.serving.sessions import AnswerReaders, Session, Track, VolumeSlots
from model_core.serving.threads import one_core, run_on_model_thread
from model_core.workflows.inferers import InContextInferer, build_support
from model_core.workflows.proposals import propose_image

__all__ = ["Segmentation", "SegmentationService"]


@dataclass
class Segmentation:
    """A label map in the image's original space and what goes with it.

    Attributes:
        label: ``(1, *original spatial shape)`` int16 ``MetaTensor`` with the original affine. An interactive
            answer is also kept by its session (a follow-up click builds on it): read it, do not change it, and
            :meth:`release` it when done (a later follow-up may then write its answer into the same memory).
        confidence: ``{label name: confidence in [0, 1]}``.
        info: counters and provenance (model version, slices encoded, seconds).
        values: the label values ``label`` was made with (every value it can hold besides 0), when its maker knows
            them: a writer then checks its type's range against these instead of scanning every voxel. None: not
            known.
    """

    label: MetaTensor
    confidence: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    values: tuple[int, ...] | None = None
    #: counts this caller off the answer's readers (:class:`~model_core.serving.sessions.AnswerReaders`)
    on_release: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Say ``label`` will not be read again: the session may then write the next follow-up's answer into its
        memory instead of a copy. Optional (an answer never released is never changed); once is enough."""
        if self.on_release is not None:
            self.on_release()


def _slice_prompt(entry: dict[str, Any]) -> SlicePrompt:
    """A slice's clicks and box (``{"points", "labels", "box"}`` on the model grid) as a :class:`SlicePrompt`."""
    return SlicePrompt(
        points=torch.tensor(entry["points"]) if entry["points"] else None,
        labels=torch.tensor(entry["labels"]) if entry["labels"] else None,
        box=torch.tensor(entry["box"]) if entry["box"] is not None else None,
    )


class SegmentationService:
    """In-context and interactive segmentation of volume files with one network.

    Thread-safe. Model work (loading weights, the support memory, encoding, tracking and
    mapping the result back to the image's space) runs on the process's model thread
    (:func:`~model_core.serving.threads.run_on_model_thread`: one OpenMP team for the
    process, see :mod:`model_core.serving.threads`), serialized by one lock: one network,
    one device. Reading and preprocessing a new volume runs in the request's own thread on
    one core, so clients working on other images do not wait for one another's file work;
    the session table has its own short lock. Each request binds the network once, so a
    checkpoint published mid-request never mixes two sets of weights in one answer.

    Args:
        config: see :class:`ServiceConfig`.
    """

    def __init__(self, config: ServiceConfig):
        if not config.labels:
            raise ValueError("No labels configured: give the structures to segment as {name: label value}.")
        self.config = config
        self.labels = {str(k): int(v) for k, v in config.labels.items()}
        self.names = {v: k for k, v in self.labels.items()}
        self.classes = sorted(self.labels.values())
        overrides = {
            "preset": config.preset,
            "image_size": int(config.image_size),
            "classes": self.classes,
            "modality": config.modality,
            "intensity#window": [float(v) for v in config.window],
            "intensity#percentiles": [float(v) for v in config.percentiles],
            "channel_mode": config.channel_mode,
            "device": f"$torch.device('{config.device}')",
        }
        parser = load_bundle_parser(config.bundle_dir, "inference.json", overrides)
        self.preprocessing: Compose = parser.get_parsed_content("preprocessing")
        self.support_preprocessing: Compose = parser.get_parsed_content("train#preprocessing")
        post = parser.get_parsed_content("postprocessing")
        # the bundle's postprocessing ends with SaveImaged; a server writes its own files
        self.postprocessing = Compose([t for t in post.transforms if type(t).__name__ != "SaveImaged"])
        self.device = torch.device(config.device)
        self._lock = threading.RLock()  # model work
        self._sessions_lock = threading.Lock()  # the session table (never held while waiting for _lock)
        self._network = None
        self._loaded_stamp: tuple | None = None
        self._support: tuple[str, SupportMemory] | None = None
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()
        #: requests that hold a volume being read and preprocessed (and then worked on) at once
        self.volume_slots = VolumeSlots(config.max_preprocessing, config.preprocessing_wait_s)
        #: number of times weights were (re)loaded from the checkpoint
        self.reloads = 0

    # ------------------------------------------------------------------ model
    def _checkpoint_stamp(self) -> tuple | None:
        path = self.config.checkpoint
        if not path or not os.path.isfile(path):
            return None
        st = os.stat(path)
        return (os.path.abspath(path), st.st_mtime_ns, st.st_size)

    @property
    def network(self):
        """The network, (re)loaded when the checkpoint file appeared or changed since the last request.

        Without the model lock when nothing changed, so a request can start its file work
        while another one runs the model; a reload waits for the running model work.
        """
        network, stamp = self._network, self._checkpoint_stamp()
        if network is not None and stamp == self._loaded_stamp:
            return network
        return run_on_model_thread(self._load_network)

    def _load_network(self):
        with self._lock:
            stamp = self._checkpoint_stamp()
            if self._network is None or stamp != self._loaded_stamp:
                with torch.random.fork_rng(devices=[]):  # untrained weights: the same at every start
                    torch.manual_seed(int(self.config.seed))
                    network = build_icl_sam2(
                        self.config.preset,
                        image_size=int(self.config.image_size),
                        device=self.device,
                        precision=self.config.precision,
                        encoder_backend=self.config.encoder_backend,
                        encoder_cache_dir=self.config.encoder_cache_dir,
                        compile=self.config.compile,
                    )
                if stamp is not None:
                    load_checkpoint(network, stamp[0])
                    self.reloads += 1
                choose = getattr(network.encoder_backend, "resolve", None)
                if choose is not None:  # encoder_backend auto: chosen now, for the weights served
                    choose(network)
                with self._sessions_lock:
                    self._sessions.clear()  # their features came from the old weights
                self._network = network.eval()
                self._loaded_stamp = stamp
            return self._network

    def encoder_info(self) -> dict[str, Any] | None:
        """The served network's image-encoder backend (``describe_encoder()``); None before the network is built."""
        network = self._network
        return None if network is None else network.describe_encoder()

    def model_info(self, network=None) -> dict[str, Any]:
        """Which weights serve requests: the checkpoint (or that there is none) and a version id."""
        network = network if network is not None else self.network
        version = network.weights_version
        return {
            "checkpoint": self._loaded_stamp[0] if self._loaded_stamp else None,
            "untrained": self._loaded_stamp is None,
            "model_version": version,
            "preset": self.config.preset,
            "image_size": int(self.config.image_size),
        }

    # ------------------------------------------------------------------ support
    def support_memory(self, labelled: Sequence[dict[str, str]], network=None) -> SupportMemory:
        """The support memory of the labelled volumes, rebuilt only when they or the weights change.

        Args:
            labelled: ``[{"image": path, "label": path}]``, most relevant first; the first
                ``max_support_volumes`` are used.
            network: the request's network (default: the current one).

        Raises:
            InputError: no labelled volume.
            ValueError: a class absent from all of them.
        """
        if not labelled:
            raise InputError(
                "No labelled volume yet: label at least one volume (save it as a final label) "
                "so in-context segmentation has a support set."
            )
        return run_on_model_thread(self._support_memory, labelled, network)

    @torch.inference_mode()
    def _support_memory(self, labelled: Sequence[dict[str, str]], network) -> SupportMemory:
        with self._lock:
            network = network if network is not None else self.network
            used = [dict(item) for item in labelled[: max(int(self.config.max_support_volumes), 1)]]
            stamp = [
                [item["image"], item["label"], *(os.stat(item[k]).st_mtime_ns for k in ("image", "label"))]
                for item in used
            ]
            key = json.dumps([stamp, network.architecture["weights"]])
            if self._support is None or self._support[0] != key:
                memory = build_support(
                    network,
                    used,
                    self.support_preprocessing,
                    self.classes,
                    int(self.config.num_support_slices),
                    channel_mode=self.config.channel_mode,
                )
                self._support = (key, memory)
            return self._support[1]

    def invalidate_support(self) -> None:
        """Forget the cached support memory (e.g. a label was saved).

        Without the lock: a label upload must not wait for a running inference (the
        support key holds the labels' modification times, so a request already running
        cannot reuse a stale memory after it either).
        """
        self._support = None

    # ------------------------------------------------------------------ helpers
    def preprocess(self, image_path: str, network) -> tuple[MetaTensor, torch.Tensor]:
        """The image through the bundle's preprocessing ``(1, H, W, D)`` (its meta maps back to the
        file's voxels) and the network's input slices ``(D, 3, S, S)``.

        With ``replicate`` channels on a float32 image already at the model's size (what the
        bundle's preprocessing makes), the slices are a view of the image (each slice in all
        three channels without copying): a session then holds the volume once instead of four
        times (the image and a three-channel copy). Same values as :func:`volume_to_slices`.
        """
        try:  # a new image is read once: a server checks only its header before (image_header_problem)
            item = preprocess_checked_image(image_path, self.preprocessing)
        except InputError as e:
            raise InputError(f"This image cannot be segmented: {e}", e.status) from e
        image = item["image"]
        size = network.image_size
        if (
            self.config.channel_mode == "replicate"
            and image.dtype == torch.float32
            and image.ndim == 4
            and image.shape[0] == 1
            and tuple(image.shape[1:3]) == (size, size)
        ):
            volume = image.as_tensor().clamp_(0, 1)[0]  # (H, W, D), the image's own storage
            return image, volume.permute(2, 0, 1)[:, None].expand(-1, 3, -1, -1)
        slices = volume_to_slices(as_slices(image).float().clamp(0, 1), size, self.config.channel_mode)
        return image, slices

    def _to_original(
        self,
        image: MetaTensor,
        probabilities: torch.Tensor | Callable[[int, int], torch.Tensor],
        label_values: Sequence[int],
        changed: tuple[int, int] | None = None,
        previous: MetaTensor | None = None,
        reuse_previous: bool = False,
    ) -> MetaTensor:
        """``(K + 1, H, W, D)`` probabilities on the model grid (or a function giving their slices) to an int16 label
        map in the image's original space (the bundle's postprocessing, on the slices where a structure can be, or
        on the ``changed`` slices of a ``previous`` answer, written into a copy of it or, with ``reuse_previous``,
        into it: :func:`postprocess_slices`)."""
        lut = None
        if list(label_values) != self.classes:
            # the bundle's postprocessing maps channel k to classes[k - 1]; give it this request's objects
            # int16, the answer's type (values < 2**15): indexing it gives the answer, twice as fast as an int64 one
            lut = torch.zeros(max(self.classes) + 1, dtype=torch.int16)
            for k, value in enumerate(label_values, start=1):
                lut[self.classes[k - 1]] = int(value)

        def postprocessing(data: dict) -> dict:
            out = self.postprocessing(data)["pred"]
            # int32 indices: the same lookup as int64 ones, a third faster (half the bytes to make and read)
            values = torch.as_tensor(out).to(torch.int16) if lut is None else lut[torch.as_tensor(out).int()]
            return {"pred": MetaTensor(values, meta=out.meta)}

        return postprocess_slices(postprocessing, image, probabilities, changed, previous, reuse_previous)

    # ------------------------------------------------------------------ in-context
    @torch.inference_mode()
    def segment(self, image_path: str, labelled: Sequence[dict[str, str]], wait_s: float | None = None) -> Segmentation:
        """Segment every configured class of a volume in context of the labelled volumes.

        Args:
            wait_s: longest wait for a volume slot (default: ``preprocessing_wait_s``; ``math.inf`` for
                batch work such as scoring, which should queue rather than fail).

        Raises:
            ServiceBusy: no volume slot within the wait.
        """
        network = self.network
        start = time.perf_counter()
        with self.volume_slots.hold(wait_s):  # a whole volume in memory until the answer is made
            with one_core():  # file work: outside the model lock and thread
                image, _ = self.preprocess(image_path, network)
            label, support, scores, encoded = run_on_model_thread(self._segment_model, image, labelled, network)
        confidence = {self.names[c]: round(float(v), 4) for c, v in zip(support.object_ids, scores)}
        info = {
            **self.model_info(network),
            "encoded_slices": encoded,
            "propagated_slices": int(image.shape[-1]),  # in context: every slice, to find the structures
            "seconds": round(time.perf_counter() - start, 3),
            "support_volumes": len(labelled[: self.config.max_support_volumes]),
        }
        return Segmentation(label, confidence, info, tuple(self.classes))

    @torch.inference_mode()
    def _segment_model(self, image: MetaTensor, labelled, network):
        """:meth:`segment`'s model work (on the model thread): the label map, the support memory, each
        object's confidence and the slices encoded."""
        with self._lock:
            encoded = network.encoded_slices
            support = self.support_memory(labelled, network)
            inferer = InContextInferer(support, channel_mode=self.config.channel_mode)
            probabilities = inferer(image[None].to(self.device), network)[0].cpu()
            encoded = network.encoded_slices - encoded
        label = self._to_original(image, probabilities, self.classes)
        return label, support, inferer.last_confidence[0], encoded

    # ------------------------------------------------------------------ proposals
    @torch.inference_mode()
    def propose(self, image_path: str, settings):
        """Automatic lesion proposals of a volume (:func:`model_core.workflows.proposals.propose_image`): sam2's
        automatic mask generator on its slices, merged into 3D, in the image's original space.

        Args:
            image_path: the image file.
            settings: a :class:`~model_core.proposals.ProposalSettings`.

        Returns:
            :class:`~model_core.proposals.Proposals` (label values 1..N, one dict per candidate).
        """

        network = self.network
        start = time.perf_counter()
        with self.volume_slots.hold():
            with one_core():  # file work: outside the model lock and thread
                image, _ = self.preprocess(image_path, network)
            result = run_on_model_thread(self._propose_model, image, settings, network)
        result.info.update({**self.model_info(network), "seconds": round(time.perf_counter() - start, 3)})
        return result

    @torch.inference_mode()
    def _propose_model(self, image: MetaTensor, settings, network):
        with self._lock:
            return propose_image(network, image, self.preprocessing, settings, self.config.channel_mode)

    # ------------------------------------------------------------------ interactive
    def _session(self, client: str, image_path: str, network, slot: contextlib.ExitStack) -> Session:
        """The client's session on this image; a new one reads and preprocesses the file outside every lock,
        holding a volume slot (entered on ``slot``, so it is held until the request has answered)."""
        key = (str(client), os.path.abspath(image_path))
        with self._sessions_lock:
            session = self._sessions.get(key)
        if session is None:
            slot.enter_context(self.volume_slots.hold())
            with one_core():  # file work: outside the model lock and thread
                fresh = Session(*self.preprocess(image_path, network))
            with self._sessions_lock:  # a concurrent request of the same client may have made one meanwhile
                session = self._sessions.setdefault(key, fresh)
                if session is fresh:
                    self._evict(session)  # make room now: the volume counts before its features do
        with self._sessions_lock:
            if key in self._sessions:
                self._sessions.move_to_end(key)
            session.used = time.monotonic()
        return session

    def _enforce_cache_limits(self, current: Session) -> None:
        """Measure the session just worked on and evict the least recently used sessions over ``max_sessions``
        or ``session_cache_mb`` (under the model lock, so no other request changes ``current`` meanwhile)."""
        current.measure()
        with self._sessions_lock:
            self._evict(current)

    def session_bytes(self, client: str, image_path: str) -> int | None:
        """What the client's session on this image holds in bytes, as ``session_cache_mb`` counts it (None: no
        session).
        """
        with self._sessions_lock:
            session = self._sessions.get((str(client), os.path.abspath(image_path)))
            return None if session is None else session.held

    def _session_totals(self) -> dict[str, Any]:
        with self._sessions_lock:
            return {
                "session_cache_mb": round(sum(s.held for s in self._sessions.values()) / 2**20, 2),
                "sessions": len(self._sessions),
            }

    def _evict(self, current: Session) -> None:
        """Drop the least recently used other sessions until the table fits its caps (under the sessions lock);
        when ``current`` alone is over the MiB cap, its least recently used slice features go."""
        cap = int(float(self.config.session_cache_mb) * 2**20)
        while len(self._sessions) > max(int(self.config.max_sessions), 1) or (
            sum(s.held for s in self._sessions.values()) > cap and len(self._sessions) > 1
        ):
            oldest_key = next((k for k, s in self._sessions.items() if s is not current), None)
            if oldest_key is None:
                break
            del self._sessions[oldest_key]
        if current.anchor is not None and current.held > cap:
            features = current.anchor.features
            features.shrink(max(cap - (current.held - features.nbytes), 0))
            current.measure()

    def to_model_grid(self, image: MetaTensor, points: Sequence[Sequence[float]]) -> np.ndarray:
        """Voxel indices ``[i, j, k]`` of the image file (as Slicer and OHIF send them) to
        ``(x, y, slice)`` on the model grid, through the original and preprocessed affines.

        Clamped to the grid: ``x`` in ``[0, W - 1]``, ``y`` in ``[0, H - 1]``, ``slice`` in
        ``[0, D - 1]`` of the ``(1, H, W, D)`` preprocessed volume. Resampling maps voxel
        centres onto pixel centres, so when a slice is shrunk to the model's size the
        image's border voxels land up to half a model pixel outside the outermost pixel
        centres (voxel 0 of 96 -> x = -0.17 on a 64 grid), though they are inside the image.
        Callers check first that the voxel lies in the image (:meth:`interact` does); the
        clamp then moves a point by less than one model pixel.
        """
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        original = np.asarray(image.meta["original_affine"], dtype=np.float64)
        current = np.asarray(image.affine, dtype=np.float64)
        world = original @ np.concatenate([pts, np.ones((len(pts), 1))], axis=1).T
        index = (np.linalg.inv(current) @ world)[:3].T  # (row, column, slice) of the (1, H, W, D) volume
        H, W, D = (int(v) for v in image.shape[1:4])
        return np.stack([index[:, 1].clip(0, W - 1), index[:, 0].clip(0, H - 1), index[:, 2].clip(0, D - 1)], axis=1)

    def _model_box(self, image: MetaTensor, lo: Sequence[float], hi: Sequence[float]) -> tuple[list[float], int]:
        """An ROI's corners (voxel indices) as a box ``[x0, y0, x1, y1]`` on the model grid, at least one
        pixel wide and inside it, and the ROI's middle slice."""
        corners = self.to_model_grid(image, [lo, hi])
        box = []
        for axis, size in ((0, int(image.shape[2])), (1, int(image.shape[1]))):
            low, high = sorted(corners[:, axis])
            if high - low < 1:  # a box one voxel wide, or two border voxels on one model pixel
                high = min(low + 1, size - 1)
                low = high - 1
            box.append((float(low), float(high)))
        z = int(np.clip(round(corners[:, 2].mean()), 0, int(image.shape[3]) - 1))
        return [box[0][0], box[1][0], box[0][1], box[1][1]], z

    def _check_points(self, image: MetaTensor, points: Sequence[Sequence[float]], what: str) -> None:
        shape = np.asarray(image.meta["spatial_shape"], dtype=np.float64)
        for p in points:
            if len(p) != 3:
                raise InputError(f"{what} point {list(p)} must be [i, j, k] voxel indices of the image.")
            if np.any(np.asarray(p, dtype=np.float64) < 0) or np.any(np.asarray(p, dtype=np.float64) > shape - 1):
                raise InputError(
                    f"{what} point {list(p)} is outside the image "
                    f"(voxel indices 0..{(shape - 1).astype(int).tolist()})."
                )

    @torch.inference_mode()
    def interact(
        self,
        client: str,
        image_path: str,
        label: str | None = None,
        foreground: Sequence[Sequence[float]] = (),
        background: Sequence[Sequence[float]] = (),
        roi: Sequence[float] | None = None,
        from_in_context: bool = False,
        labelled: Sequence[dict[str, str]] = (),
    ) -> Segmentation:
        """Segment from clicks and a box, propagated through the volume in both directions.

        Each request carries all of the current clicks (as the Slicer and OHIF plugins
        send them). The session keeps the image's features and, per structure, the clicks
        it answered with their result: when clicks were only added, just the changed
        slices and their surroundings run again (``incremental``,
        :func:`~model_core.corrections.correct_incrementally`);
        otherwise the whole volume is propagated.

        Args:
            client: the client session (two clients never share results).
            image_path: the image file.
            label: the structure's name (default: the first configured label).
            foreground, background: ``[[i, j, k], ...]`` voxel indices of the image file.
            roi: ``[i0, i1, j0, j1, k0, k1]`` voxel box (Slicer's ROI); its middle slice gets a box prompt.
            from_in_context: start from the in-context result of ``labelled`` and correct it.
            labelled: the support volumes (for ``from_in_context``).

        Raises:
            InputError: unknown label, points outside the volume, an empty box, no prompt.
        """
        label = label or next(iter(self.labels))
        if label not in self.labels:
            raise InputError(f"Unknown label {label!r}; this model segments {sorted(self.labels)}.")
        if not foreground and not background and roi is None:
            raise InputError("Nothing to segment from: give foreground/background points or an ROI box.")
        network = self.network
        start = time.perf_counter()
        with contextlib.ExitStack() as slot:  # a new session's volume slot, held until the answer is made
            session = self._session(client, image_path, network, slot)  # file work: outside the model lock
            image = session.image
            self._check_points(image, foreground, "Foreground")
            self._check_points(image, background, "Background")
            value = self.labels[label]
            prompts: dict[int, dict[str, list]] = {}
            roi_slices = None
            for points, positive in ((foreground, 1), (background, 0)):
                for x, y, z in self.to_model_grid(image, points) if len(points) else []:
                    z = int(np.clip(round(z), 0, session.slices.shape[0] - 1))
                    entry = prompts.setdefault(z, {"points": [], "labels": [], "box": None})
                    entry["points"].append([float(x), float(y)])
                    entry["labels"].append(positive)
            if roi is not None:
                roi = [float(v) for v in roi]
                if len(roi) != 6:
                    raise InputError(f"roi must be [i0, i1, j0, j1, k0, k1], got {roi}.")
                lo, hi = [roi[0], roi[2], roi[4]], [roi[1], roi[3], roi[5]]
                if abs(lo[0] - hi[0]) < 1 or abs(lo[1] - hi[1]) < 1:
                    raise InputError(f"The ROI box {roi} has zero size in-plane; draw a box around the structure.")
                self._check_points(image, [lo, hi], "ROI corner")
                box, z = self._model_box(image, lo, hi)
                entry = prompts.setdefault(z, {"points": [], "labels": [], "box": None})
                entry["box"] = box
                k_lo, k_hi = sorted(self.to_model_grid(image, [lo, hi])[:, 2])
                roi_slices = (int(max(np.floor(k_lo), 0)), int(np.ceil(k_hi)) + 1)  # nothing outside them
            result, values, encoded, ran, mode, release = run_on_model_thread(
                self._interact_model, session, prompts, label, value, from_in_context, labelled, roi_slices, network
            )
            try:
                info = {
                    **self.model_info(network),
                    "encoded_slices": encoded,
                    "seconds": round(time.perf_counter() - start, 3),
                    "prompted_slices": sorted(prompts),
                    "mode": mode,
                    "propagated_slices": ran,
                    **self._session_totals(),
                }
            except BaseException:
                release()  # no caller will read it
                raise
            return Segmentation(result, {}, info, values, release)

    @torch.inference_mode()
    def _interact_model(
        self,
        session: Session,
        prompts: dict[int, dict[str, list]],
        label: str,
        value: int,
        from_in_context: bool,
        labelled: Sequence[dict[str, str]],
        roi_slices: tuple[int, int] | None,
        network,
    ) -> tuple[MetaTensor, tuple[int, ...], int, int, str, Callable[[], None]]:
        """:meth:`interact`'s model work (on the model thread): the label map in the image's space, the label values
        it was made with, the slices encoded and propagated, how the answer was made (``full``, ``incremental``,
        ``unchanged``), and the release of the caller's read of the answer (:class:`AnswerReaders`).

        Args:
            roi_slices: ``[start, stop)`` slices of an ROI: the structure is cleared outside them.
        """
        image = session.image
        with self._lock:
            encoded = network.encoded_slices
            support, objects = None, [value]
            if from_in_context:
                support = self.support_memory(labelled, network)
                objects = list(support.object_ids)
                if value not in objects:
                    raise InputError(f"Label {label!r} is not in the support set {objects}.")
            values = tuple(objects)  # the label values of this answer's channels
            predictor = VolumePredictor(network)
            track_key = (value, bool(from_in_context))
            track = session.tracks.get(track_key)
            changed = None
            if self.config.incremental and track is not None and track.support is support:
                changed = track.changed_slices(prompts)
            if changed == []:  # the same clicks again: the same answer
                state, ran, mode = track.state, 0, "unchanged"
            elif changed is not None:
                state, mode = track.state, "incremental"
                ran = correct_incrementally(
                    predictor,
                    state,
                    value,
                    {z: _slice_prompt(entry) for z, entry in prompts.items()},
                    changed,
                    int(self.config.incremental_patience),
                    float(self.config.incremental_iou),
                    **self.config.stopping(),  # a pass also stops where the structure ends
                )
                track.prompts = prompts
            else:
                state = predictor.init_state(
                    session.slices,
                    support,
                    objects,
                    feature_cache_slices=session.slices.shape[0],
                    share_features_with=session.anchor,
                )
                if session.anchor is None:
                    session.anchor = state
                for z, entry in sorted(prompts.items()):
                    predictor.add_prompt(state, z, value, _slice_prompt(entry))
                ran = sum(1 for _ in predictor.propagate(state, min(prompts), "both", **self.config.stopping()))
                session.tracks[track_key] = Track(state, prompts, support)
                mode = "full"
            # (K, D, h, w), this request's copy
            low_res = state.low_res_logits[:, :, 0].transpose(0, 1).float().clone()
            encoded = network.encoded_slices - encoded
            track = session.tracks[track_key]
            previous, before = (track.answer, track.answered_logits) if mode != "full" else (None, None)
            track.answer = track.answered_logits = None  # set again once this answer is made
            if mode == "full" or encoded:  # what grew before the answer is made: room for it now
                self._enforce_cache_limits(session)
        changed = None
        if previous is not None and before is not None and before.shape == low_res.shape:
            moved = (low_res != before).transpose(0, 1).reshape(low_res.shape[1], -1).any(1).nonzero()[:, 0]
            if len(moved) == 0:  # the same result: the same answer
                track.answer, track.answered_logits = previous, before
                return previous, values, encoded, ran, mode, track.answer_readers.add()
            changed = (int(moved[0]), int(moved[-1]) + 1)  # only these slices are mapped back again
        H = W = network.image_size
        outside = None
        if roi_slices is not None:  # nothing outside the ROI's slices
            outside = torch.ones(session.slices.shape[0], dtype=torch.bool)
            outside[roi_slices[0] : roi_slices[1]] = False

        def probabilities(start: int, stop: int) -> torch.Tensor:
            """``(K + 1, H, W, stop - start)`` of those slices, channel 0 the background (each slice on its own: a
            follow-up computes only the slices it changed)."""
            # (K, n, H, W)
            logits = torch.nn.functional.interpolate(
                low_res[:, start:stop], size=(H, W), mode="bilinear", align_corners=False
            )
            probs = logits.sigmoid().permute(0, 2, 3, 1)  # (K, H, W, n)
            if outside is not None:
                probs[objects.index(value), :, :, outside[start:stop]] = 0
            return torch.cat([1 - probs.max(0, keepdim=True).values, probs])

        # a follow-up whose previous answer no caller reads any more is written into it
        reuse = changed is not None and track.answer_readers.idle
        result = self._to_original(image, probabilities, values, changed, previous if changed else None, reuse)
        if previous is None or result.data_ptr() != previous.data_ptr():
            track.answer_readers = AnswerReaders()  # a new answer: the previous one's readers do not read it
        track.answer, track.answered_logits = result, low_res
        release = track.answer_readers.add()  # here, on the model thread: counted before the next answer is made
        with self._lock:
            self._enforce_cache_limits(session)  # the answer is part of what the session holds
        return result, values, encoded, ran, mode, release
