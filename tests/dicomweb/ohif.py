"""Drive MONAI Label's bundled OHIF viewer (v3, mode ``/ohif/monai-label``) in a real headless Chromium.

Debian's ``chromium`` through Playwright (``executable_path``, never ``playwright install``);
WebGL runs on SwiftShader through ANGLE. Every request that is not to loopback is
aborted (OHIF asks for web fonts; there is no internet).

What the page offers (MONAI Label 0.8.5's OHIF extension):
- study list rows ``[data-cy="studyRow-<StudyInstanceUID>"]``, then the "MONAI Label" mode button;
- the panel's server field ``#monailabelServerURL`` and its connect button;
- sections ``div.tab`` named by ``label.tab-label``: Auto-Segmentation (``select.selectBox``,
  ``button[title="Run Segmentation"]``), Point Prompts (model, label row ``tr.clickable-row``,
  ``button[title="Run PointPrompts"]``), Active Learning (strategy ``table.optionsTable select``,
  "Next Sample", "Update Model" = train);
- the labelmap the panel fills: ``window.services.segmentationService.getLabelmapVolume('1')``,
  voxels in cornerstone's order (column fastest, then row, then slice).
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import numpy as np

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--use-gl=angle",
    "--ignore-gpu-blocklist",
    "--no-sandbox",
]
LOOPBACK = ("http://127.0.0.1", "http://localhost", "data:", "blob:")

_VOLUME_READY = """() => {
  const cs = window.cornerstone; if (!cs || !window.services) return null;
  const volumes = cs.cache.getVolumes().filter(v => !String(v.volumeId).startsWith('1'));
  if (!volumes.length) return null;
  const ids = volumes[0].imageIds || [];
  const cached = ids.filter(id => cs.cache.getImageLoadObject(id) || cs.cache.getImage(id)).length;
  return {images: ids.length, cached: cached};
}"""

_LABELMAP = """() => {
  const service = window.services.segmentationService;
  const vol = service.getLabelmapVolume('1');
  if (!vol) return null;
  const segments = {};
  for (const s of service.getSegmentations()) {
    for (const g of Object.values(s.segments || {})) { if (g && g.label) segments[g.label] = g.segmentIndex; }
  }
  return {dims: vol.dimensions, data: Array.from(vol.voxelManager.getCompleteScalarDataArray()), segments: segments};
}"""

_FIND_PANEL = """(select) => {
  const key = Object.keys(select).find(k => k.startsWith('__reactFiber$'));
  let fiber = select[key];
  while (fiber && !(fiber.stateNode && fiber.stateNode.setState && fiber.stateNode.state
                    && 'strategy' in fiber.stateNode.state)) fiber = fiber.return;
  if (!fiber) throw new Error('the Active Learning panel component was not found');
  return fiber.stateNode;
}"""

# resolves once React has committed the re-render: a select used before that still has no onChange
_FIX_STRATEGY_SELECT = f"""async (select) => {{
  const panel = ({_FIND_PANEL})(select);
  if (!panel.onChangeStrategy) {{
    panel.onChangeStrategy = (event) => panel.setState({{strategy: event.target.value}});
    await new Promise(resolve => panel.forceUpdate(resolve));
  }}
}}"""

_PANEL_STRATEGY = f"""(select) => ({_FIND_PANEL})(select).state.strategy"""


_CLICK_AT = """async ([viewportId, ijk]) => {
  const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(viewportId);
  const imageData = vp.getImageData().imageData;
  const world = imageData.indexToWorld(ijk);
  const cam = vp.getCamera(), n = cam.viewPlaneNormal, fp = cam.focalPoint;
  const d = (world[0] - fp[0]) * n[0] + (world[1] - fp[1]) * n[1] + (world[2] - fp[2]) * n[2];
  vp.setCamera({focalPoint: fp.map((p, i) => p + d * n[i]), position: cam.position.map((p, i) => p + d * n[i])});
  vp.render();
  await new Promise(r => setTimeout(r, 300));
  const c = vp.worldToCanvas(world), r = vp.element.getBoundingClientRect();
  return {x: r.left + c[0], y: r.top + c[1]};
}"""


_WATCH_TEXTS = """window.__texts = [];
window.addEventListener('DOMContentLoaded', () => new MutationObserver(ms => {
  for (const m of ms) for (const n of m.addedNodes) {
    const t = (n.innerText || n.textContent || '').trim(); if (t) window.__texts.push(t.slice(0, 500)); }
}).observe(document.body, {childList: true, subtree: true}));"""

_SEGMENTS = """() => {
  const service = window.services.segmentationService;
  const viewportId = window.services.viewportGridService.getState().activeViewportId;
  const out = [];
  for (const s of service.getSegmentations()) {
    for (const g of Object.values(s.segments || {})) {
      if (!g) continue;
      let color = null;
      try { color = service.getSegmentColor(viewportId, s.segmentationId, g.segmentIndex); } catch (e) {}
      out.push({segmentation: s.label, index: g.segmentIndex, label: g.label, color: color && color.slice(0, 3)});
    }
  }
  return out;
}"""


def nrrd_mask(body: bytes) -> np.ndarray:
    """The label map of an ``/infer`` reply body (NRRD, as the panel asks) as a ``(K, J, I)`` bool array."""
    if b"\nNRRD" in body[:4096] or not body.startswith(b"NRRD"):  # a multipart reply: the file part
        body = body[body.index(b"NRRD") :]
    head, _, data = body.partition(b"\n\n")
    fields = {}
    for line in head.decode("latin1").splitlines()[1:]:
        if ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip().lstrip("=")
    sizes = [int(v) for v in fields["sizes"].split()]
    if fields.get("encoding", "raw") in ("gzip", "gz"):
        data = gzip.decompress(data)
    dtype = {
        "unsigned char": np.uint8,
        "uchar": np.uint8,
        "uint8": np.uint8,
        "unsigned short": np.uint16,
        "ushort": np.uint16,
        "short": np.int16,
        "int": np.int32,
    }[fields["type"]]
    return np.frombuffer(data, dtype=dtype)[: int(np.prod(sizes))].reshape(sizes[::-1]) > 0


class OHIF:
    """One headless Chromium page on ``server``'s ``/ohif/``; screenshots go to ``shots``."""

    def __init__(self, server: str, shots: Path):
        from playwright.sync_api import sync_playwright

        self.server, self.shots = server.rstrip("/"), Path(shots)
        self.shots.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.aborted: list[str] = []
        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        self.context = self.browser.new_context(viewport={"width": 1600, "height": 1000})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("dialog", lambda dialog: dialog.accept())  # Next Sample confirms with window.confirm
        #: uncaught page errors and console errors (not failed loads of blocked fonts)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        self.page.on(
            "console",
            lambda m: (
                self.errors.append(f"console: {m.text}")
                if m.type == "error" and "Failed to load resource" not in m.text
                else None
            ),
        )
        # every text the page adds (OHIF's notifications come and go): window.__texts
        self.context.add_init_script(_WATCH_TEXTS)

    def _route(self, route) -> None:
        if route.request.url.startswith(LOOPBACK):
            route.continue_()
        else:
            self.aborted.append(route.request.url)
            route.abort()

    def close(self) -> None:
        self.browser.close()
        self._playwright.stop()

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = round(time.perf_counter() - start, 2)

    def _dismiss_banner(self) -> None:
        button = self.page.locator('[data-cy="confirm-and-hide-button"]')
        if button.count() and button.first.is_visible():
            button.first.click()

    def wait_volume(self, timeout: float = 90) -> None:
        deadline, state = time.time() + timeout, None
        while time.time() < deadline:
            state = self.page.evaluate(_VOLUME_READY)
            if state and state["images"] and state["cached"] == state["images"]:
                self.page.wait_for_timeout(500)
                return
            time.sleep(0.25)
        raise TimeoutError(f"OHIF did not load the volume: {state}")

    def open_study(self, study_uid: str) -> None:
        """Study list -> the study's row -> the MONAI Label mode, until every image of the volume is loaded."""
        start = time.perf_counter()
        self.page.goto(f"{self.server}/ohif/")
        row = self.page.locator(f'[data-cy="studyRow-{study_uid}"]')
        row.wait_for(timeout=60000)
        self._dismiss_banner()
        self.shot("01_study_list")
        row.click()
        mode = self.page.get_by_role("button", name="MONAI Label", exact=True)
        mode.wait_for()
        mode.click()
        self.page.wait_for_url("**/ohif/monai-label?StudyInstanceUIDs=*")
        self.wait_volume()
        self._dismiss_banner()
        self._timed("open_study", start)
        self.shot("02_viewer")

    def open_series(self, study_uid: str, series_uid: str | None = None, mode: str = "monai-label") -> None:
        """Open a study (only ``series_uid`` of it, when given) by URL in ``mode`` (``monai-label``, ``viewer``)."""
        url = f"{self.server}/ohif/{mode}?StudyInstanceUIDs={study_uid}"
        self.page.goto(url + (f"&SeriesInstanceUIDs={series_uid}" if series_uid else ""))
        self.page.locator('[data-cy^="study-browser-thumbnail"]').first.wait_for(timeout=60000)
        if mode == "monai-label":  # its viewports are volumes; the Basic Viewer's are stacks
            self.wait_volume()
        else:
            self.page.wait_for_timeout(3000)
        self._dismiss_banner()

    def open_seg(self, description: str) -> None:
        """Double-click the SEG thumbnail showing ``description`` and answer OHIF's "open this Segmentation?" yes."""
        self.page.locator('[data-cy="study-browser-thumbnail-no-image"]', has_text=description).dblclick()
        yes = self.page.locator('[data-cy="yes-hydrate-btn"]:visible').first
        yes.wait_for(timeout=60000)
        yes.evaluate("button => button.click()")  # the prompt overlays the viewport; a pointer click is refused
        self.page.wait_for_timeout(3000)

    def segments(self) -> list[dict]:
        """Every segment OHIF holds: ``{"segmentation", "index", "label", "color" [r, g, b]}`` (active viewport)."""
        return self.page.evaluate(_SEGMENTS)

    def texts(self) -> list[str]:
        """Every text the page added since it loaded (notifications included)."""
        return self.page.evaluate("() => window.__texts || []")

    def subtitle(self) -> str:
        """What the MONAI Label panel shows under its server field: the server's ``/info`` ``name``."""
        return self.page.locator(".monaiLabelPanel p.subtitle").inner_text()

    def set_option(self, section: str, name: str, key: str, value: str) -> None:
        """The panel's "Options / Configurations" dialog: set ``section``/``name``/``key`` to ``value``, Confirm."""
        self.page.get_by_text("Options / Configurations").click()
        form = self.page.locator(".optionsForm")
        form.locator('select[name="selectSection"]').select_option(section)
        form.locator('select[name="selectName"]').select_option(name)
        form.locator(f'[id="{section}{name}{key}"]').select_option(value)
        self.page.get_by_role("button", name="Confirm").click()

    def connect(self) -> None:
        start = time.perf_counter()
        field = self.page.locator("#monailabelServerURL")
        field.wait_for()
        field.fill(self.server + "/")
        field.blur()
        with self.page.expect_response(
            lambda r: r.url.rstrip("/").endswith("/info") and r.request.method == "GET"
        ) as info:
            self.page.locator("table.settingsTable button.actionButton").click()
        assert info.value.status == 200, info.value.status
        # the panel creates segmentation '1' after connecting; until then the service throws
        self.page.wait_for_function(
            "() => { try { return !!window.services.segmentationService.getLabelmapVolume('1'); }"
            " catch (e) { return false; } }",
            timeout=60000,
        )
        self.page.wait_for_timeout(1200)
        self._timed("connect", start)
        self.shot("03_connected")

    def _section(self, name: str):
        return self.page.locator("div.tab", has=self.page.locator("label.tab-label", has_text=name))

    def segmentation(self) -> tuple[np.ndarray, dict[str, int]]:
        """OHIF's labelmap, ``(K, J, I)`` segment indices (slice, row, column), and ``{label name: segment index}``.

        The panel numbers segments by the sorted names of all models' labels, not by label value.
        """
        state = self.page.evaluate(_LABELMAP)
        i, j, k = state["dims"]
        return np.asarray(state["data"], dtype=np.int32).reshape(k, j, i), {
            n: int(v) for n, v in state["segments"].items()
        }

    def labelmap(self) -> np.ndarray:
        """Where OHIF's labelmap holds any segment, ``(K, J, I)`` bool."""
        return self.segmentation()[0] > 0

    def auto_segment(self, model: str, shot: str = "04_auto_segmentation"):
        """Run Auto-Segmentation; returns the ``/infer`` response (the labelmap shows it)."""
        section = self._section("Auto-Segmentation")
        section.locator("label.tab-label").click()
        section.locator("select.selectBox").select_option(model)
        start = time.perf_counter()
        with self.page.expect_response(lambda r: "/infer/" in r.url, timeout=600000) as reply:
            section.locator('button[title="Run Segmentation"]').click()
        assert reply.value.status == 200, (reply.value.status, reply.value.text()[:500])
        self.page.wait_for_function(
            "() => window.services.segmentationService.getLabelmapVolume('1').voxelManager"
            ".getCompleteScalarDataArray().some(v => v > 0)",
            timeout=60000,
        )
        self._timed(f"auto_segmentation_{shot}", start)
        self.page.wait_for_timeout(800)
        self.shot(shot)
        return reply.value

    def click_point(self, model: str, label: str, ijk: list[int], viewport: str = "mpr-axial"):
        """A foreground click on voxel ``[i, j, k]`` in the axial view, then Run; returns the ``/infer`` response."""
        section = self._section("Point Prompts")
        section.locator("label.tab-label").click()
        section.locator("select.selectBox").select_option(model)
        section.locator("tr.clickable-row", has_text=label).click()
        where = self.page.evaluate(_CLICK_AT, [viewport, ijk])
        self.page.wait_for_timeout(300)
        self.page.mouse.click(where["x"], where["y"])
        self.page.wait_for_timeout(300)
        self.shot("05_click")
        start = time.perf_counter()
        with self.page.expect_response(lambda r: "/infer/" in r.url, timeout=600000) as reply:
            section.locator('button[title="Run PointPrompts"]').click()
        assert reply.value.status == 200, (reply.value.status, reply.value.text()[:500])
        self._timed("point_prompt", start)
        self.page.wait_for_timeout(1000)
        self.shot("06_click_result")
        return reply.value

    def next_sample(self, strategy: str) -> dict:
        """Active Learning: choose ``strategy``, Next Sample, OK; the page reloads on the proposed study.

        MONAI Label 0.8.5's panel binds its strategy select to ``this.onChangeStrategy``, which
        it never defines, so the select does nothing and every Next Sample asks for ``random``.
        The missing handler (set the panel's ``strategy`` state) is added to the panel's React
        component and the panel re-rendered; then the select is used as a user would.
        """
        section = self._section("Active Learning")
        section.locator("label.tab-label").click()
        select = section.locator("table.optionsTable select")
        select.evaluate(_FIX_STRATEGY_SELECT)
        select.select_option(strategy)
        deadline = time.monotonic() + 10
        while select.evaluate(_PANEL_STRATEGY) != strategy:
            assert time.monotonic() < deadline, f"the panel's strategy is {select.evaluate(_PANEL_STRATEGY)!r}"
            time.sleep(0.1)
        with self.page.expect_response(lambda r: "/activelearning/" in r.url) as reply:
            section.get_by_role("button", name="Next Sample").click()
        sample = reply.value.json()
        ok = self.page.locator(".nextSampleForm button.actionButton", has_text="OK")
        ok.wait_for()
        self.shot("07_next_sample")
        start = time.perf_counter()
        ok.click()
        self.page.wait_for_url(f"**StudyInstanceUIDs={sample['StudyInstanceUID']}", timeout=60000)
        self.wait_volume()
        self._timed("next_sample", start)
        self.shot("08_next_sample_opened")
        return sample

    def train(self) -> dict:
        """Active Learning's "Update Model": starts a training run with the server's defaults."""
        section = self._section("Active Learning")
        button = section.get_by_role("button", name="Update Model")
        if not button.is_visible():
            section.locator("label.tab-label").click()
        with self.page.expect_response(
            lambda r: r.url.rstrip("/").endswith("/train") and r.request.method == "POST"
        ) as reply:
            button.click()
        assert reply.value.status == 200, reply.value.status
        section.get_by_role("button", name="Stop Training").wait_for()
        self.shot("09_training")
        return reply.value.json()


def chromium_missing() -> str:
    """Why the browser test cannot run ("" when it can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found; install it with `apt-get install chromium`."
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (bash scripts/setup.sh installs it)."
    return ""


def env_shots(default: Path) -> Path:
    """Where screenshots go: ``ICL_SAM2_OHIF_SHOTS`` if set, else ``default``."""
    return Path(os.environ.get("ICL_SAM2_OHIF_SHOTS") or default)
