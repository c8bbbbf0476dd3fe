"""Drive OHIF 3.13 (npm's ``@ohif/app``, served by ``icl_sam2.ohif``) in a real headless Chromium, as a user does.

Debian's ``chromium`` through Playwright (``executable_path``, never ``playwright install``), with
the flags and the loopback-only routing of :mod:`tests.dicomweb.ohif`.

What the page offers (OHIF 3.13's Segmentation mode, ``/segmentation?StudyInstanceUIDs=...``):
- one stack viewport per series; the study browser's SEG rows ``[data-cy="study-browser-thumbnail-no-image"]``;
- "Add segmentation", the tools ``[data-cy="Brush-btn"]`` (radius field ``input[type=number]``),
  segment rows ``[data-cy="data-row"]`` with their menu ``[data-cy="actionsMenuTrigger"]`` (Rename),
  the segmentation menu ``[data-cy="segmentation-collapsed-more-btn-Labelmap"]`` (Export > DICOM SEG:
  the "Store Segmentation" dialog, whose Save stores through STOW-RS);
- ``window.services`` (OHIF's services) and ``window.cornerstone``: a labelmap is one derived image
  per source slice (``representationData.Labelmap.imageIds``), each naming its ``referencedImageId``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .ohif import CHROMIUM, CHROMIUM_FLAGS, LOOPBACK

#: the viewport showing a series (by SeriesInstanceUID), or null
_VIEWPORT_OF = """(seriesUid) => {
  const grid = window.services.viewportGridService.getState();
  for (const [id, vp] of grid.viewports) {
    for (const uid of vp.displaySetInstanceUIDs || []) {
      const ds = window.services.displaySetService.getDisplaySetByUID(uid);
      if (ds && ds.SeriesInstanceUID === seriesUid && ds.Modality !== 'SEG') return id;
    }
  }
  return null;
}"""

#: every viewport shows an image that is loaded
_READY = """(count) => {
  if (!window.services || !window.cornerstone) return false;
  const ids = window.services.cornerstoneViewportService.getViewportIds();
  if (ids.length < count) return false;
  return ids.every(id => {
    const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(id);
    const image = vp && vp.getCurrentImageId && vp.getCurrentImageId();
    return image && window.cornerstone.cache.getImage(image);
  });
}"""

#: show slice k (InstanceNumber k + 1, as model_core.io.dicom numbers them) in a viewport
_GO_TO_SLICE = """async ([viewportId, k]) => {
  const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(viewportId);
  const index = vp.getImageIds().findIndex(
    id => Number(window.cornerstone.metaData.get('generalImageModule', id).instanceNumber) === k + 1);
  if (index < 0) throw new Error('no slice ' + k);
  await vp.setImageIdIndex(index);
  vp.render();
}"""

#: page coordinates of pixel (column i, row j) of the slice a viewport shows
_PIXEL_ON_PAGE = """([viewportId, i, j]) => {
  const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(viewportId);
  const world = window.cornerstone.utilities.imageToWorldCoords(vp.getCurrentImageId(), [i, j]);
  const c = vp.worldToCanvas(world), r = vp.element.getBoundingClientRect();
  return {x: r.left + c[0], y: r.top + c[1]};
}"""

_VIEWPORT_CENTRE = """(viewportId) => {
  const r = window.services.cornerstoneViewportService.getCornerstoneViewport(viewportId).element
    .getBoundingClientRect();
  return {x: r.left + r.width / 2, y: r.top + r.height / 2};
}"""

#: a segmentation's labelmap: per source slice its non-zero pixels (index, segment), and the segments' names
_LABELMAP = """(label) => {
  const cs = window.cornerstone;
  const seg = window.services.segmentationService.getSegmentations().find(s => s.label === label);
  if (!seg || !seg.representationData.Labelmap) return null;
  const slices = [];
  for (const id of seg.representationData.Labelmap.imageIds || []) {
    const image = cs.cache.getImage(id);
    if (!image) return null;
    const k = Number(cs.metaData.get('generalImageModule', image.referencedImageId).instanceNumber) - 1;
    const data = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
    const nonzero = [];
    for (let p = 0; p < data.length; p++) if (data[p]) nonzero.push(p, data[p]);
    slices.push({k: k, rows: image.rows, columns: image.columns, nonzero: nonzero});
  }
  const names = {};
  for (const g of Object.values(seg.segments)) if (g) names[g.segmentIndex] = g.label;
  return {slices: slices, names: names};
}"""


class OHIF3:
    """One headless Chromium page on OHIF 3.13 at ``url``; screenshots go to ``shots``."""

    def __init__(self, url: str, shots: Path):
        from playwright.sync_api import sync_playwright

        self.url, self.shots = url.rstrip("/"), Path(shots)
        self.shots.mkdir(parents=True, exist_ok=True)
        self.aborted: list[str] = []
        self.errors: list[str] = []
        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        self.context = self.browser.new_context(viewport={"width": 1600, "height": 1000})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

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

    def open_study(self, study_uid: str, series: int) -> None:
        """Segmentation mode on the study, until each of its ``series`` viewports shows a loaded image."""
        self.page.goto(f"{self.url}/segmentation?StudyInstanceUIDs={study_uid}", timeout=180000)
        self.page.wait_for_function(_READY, arg=series, timeout=300000)
        self.page.wait_for_timeout(1000)

    def viewport(self, series_uid: str) -> str:
        """The id of the viewport that shows the series, made the active one by a click on it."""
        viewport = self.page.evaluate(_VIEWPORT_OF, series_uid)
        assert viewport, f"no viewport shows series {series_uid}"
        centre = self.page.evaluate(_VIEWPORT_CENTRE, viewport)
        self.page.mouse.click(centre["x"], centre["y"])
        return viewport

    def go_to_slice(self, viewport: str, k: int) -> None:
        self.page.evaluate(_GO_TO_SLICE, [viewport, int(k)])
        self.page.wait_for_timeout(300)

    def brush(self, viewport: str, strokes: list[list[tuple[float, float]]], radius_mm: float = 3) -> None:
        """The Brush tool at ``radius_mm``, dragged along each stroke of ``(column, row)`` pixels of the shown slice."""
        self.page.locator('[data-cy="Brush-btn"]').click()
        radius = self.page.locator('input[type="number"]').first
        radius.fill(str(radius_mm))
        radius.press("Enter")
        for stroke in strokes:
            points = [self.page.evaluate(_PIXEL_ON_PAGE, [viewport, i, j]) for i, j in stroke]
            self.page.mouse.move(points[0]["x"], points[0]["y"])
            self.page.mouse.down()
            for point in points[1:]:
                self.page.mouse.move(point["x"], point["y"], steps=8)
            self.page.mouse.up()
        self.page.wait_for_timeout(300)

    def add_segmentation(self) -> None:
        """ "Add segmentation" for the active viewport's series (one segment, "Segment 1")."""
        self.page.get_by_text("Add segmentation").click()
        self.page.locator('[data-cy="data-row"]').first.wait_for()

    def rename_segment(self, name: str, row: int = 0) -> None:
        self.page.locator('[data-cy="actionsMenuTrigger"]').nth(row).click()
        self.page.get_by_role("menuitem", name="Rename").click()
        dialog = self.page.locator("[role=dialog]")
        dialog.locator("input").fill(name)
        dialog.get_by_role("button", name="Save").click()
        dialog.wait_for(state="detached")

    def store_segmentation(self, series_description: str | None = None):
        """Export > DICOM SEG > Save; with ``series_description`` a new series of that name, else the dialog's
        choice (a loaded SEG's own series). Returns the STOW-RS response."""
        self.page.locator('[data-cy="segmentation-collapsed-more-btn-Labelmap"]').click()
        self.page.get_by_role("menuitem", name="Export").hover()
        self.page.get_by_role("menuitem", name="DICOM SEG").click()
        dialog = self.page.locator("[role=dialog]")
        if series_description is not None:
            dialog.locator("input").fill(series_description)
        with self.page.expect_response(
            lambda r: r.url.endswith("/dicom-web/studies") and r.request.method == "POST", timeout=120000
        ) as stow:
            dialog.get_by_role("button", name="Save").click()
        return stow.value

    def open_seg(self, description: str) -> None:
        """Double-click the SEG in the study browser and answer Yes to "Do you want to open this Segmentation?"."""
        row = self.page.locator('[data-cy="study-browser-thumbnail-no-image"]', has_text=description)
        row.wait_for(timeout=60000)
        row.dblclick()
        self.page.get_by_role("button", name="Yes").click(timeout=120000)
        self.page.wait_for_function(f"() => ({_LABELMAP})({description!r}) !== null", timeout=120000)
        self.page.wait_for_timeout(1000)

    def labelmap(self, label: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, dict[int, str]]:
        """OHIF's labelmap of the segmentation named ``label`` as ``(I, J, K)`` segment numbers (column, row,
        slice, as model_core.io.dicom's NIfTI grid), and ``{segment number: name}``."""
        state = self.page.evaluate(_LABELMAP, label)
        assert state is not None, f"no segmentation {label!r} in OHIF"
        columns, rows, slices = shape
        volume = np.zeros((slices, rows, columns), dtype=np.int32)
        for item in state["slices"]:
            assert (item["rows"], item["columns"]) == (rows, columns), item
            flat = np.zeros(rows * columns, dtype=np.int32)
            pairs = np.asarray(item["nonzero"], dtype=np.int64).reshape(-1, 2)
            flat[pairs[:, 0]] = pairs[:, 1]
            volume[item["k"]] = flat.reshape(rows, columns)
        return volume.transpose(2, 1, 0), {int(k): v for k, v in state["names"].items()}
