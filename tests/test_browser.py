"""Browser tests: Python Playwright drives Debian's Chromium through the app as a new user would.

Elements are found by ``elem_id`` (Gradio puts it on the component's wrapper, or on the button
itself). Screenshots land in ``test-artifacts/`` at the repository root. Without
``/usr/bin/chromium`` these tests skip loudly, except with ``CI=true``, where they fail.
"""

from __future__ import annotations

import csv
import io
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_MS = 240_000  # a few iterations; generous because the test machines are small and shared
ALT = "alternate_small"
VIEWS = ("#train-original", "#train-masked", "#train-inpainting", "#train-composite", "#pred-current", "#pred-next",
         "#pred-error")


def _unavailable(reason: str):
    # make test installs the browser first, so a missing one is a broken set-up: fail, never skip
    pytest.fail(f"browser tests cannot run: {reason} (install Debian's chromium: `make browser`)")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        _unavailable(f"{CHROMIUM} is missing")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_server):
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(app_server.url)
    yield page
    context.close()


# -----------------------------------------------------------------------------
# helpers


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def picture(page, elem_id: str) -> np.ndarray:
    """Fetch and decode the picture an image component shows (it must be a PNG)."""
    src = page.locator(f"{elem_id} img").first.get_attribute("src")
    assert src, f"{elem_id} shows no picture"
    response = page.request.get(src)
    assert response.ok
    with Image.open(io.BytesIO(response.body())) as image:
        assert image.format == "PNG", elem_id
        return np.asarray(image.convert("RGB"))


def image_src(page, elem_id: str) -> str | None:
    img = page.locator(f"{elem_id} img")
    return img.first.get_attribute("src") if img.count() else None


def line_points(page, elem_id: str) -> int:
    """Number of points on the visible lines of a native (Vega, SVG) plot (the transparent axis-span
    point left out)."""
    return page.evaluate(f"{LINE_POINTS_JS}({elem_id!r})")


# the same count in the page, for wait_for_function
LINE_POINTS_JS = ("(s => Array.from(document.querySelectorAll(s + ' g.mark-line path'))"
                  ".filter(p => p.getAttribute('stroke') !== 'transparent')"
                  ".reduce((n, p) => n + ((p.getAttribute('d') || '').match(/[ML]/g) || []).length, 0))")


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a dropdown once the page has filled it."""
    expect(page.locator(f"{elem_id} input")).not_to_have_value("", timeout=30_000)  # filled on page load
    page.locator(f"{elem_id} input").click()
    page.get_by_role("option", name=option).click()


FOLDS = ("fold-attention", "fold-analysis", "fold-work")  # sections 6, 7 and 8, closed when the page opens


def unfold(page, *folds: str) -> None:
    """Open the folded sections ``folds`` (all by default), as a user clicks their titles; Gradio
    renders a fold's contents only once it is open."""
    for fold in folds or FOLDS:
        button = page.locator(f"#{fold} > button.label-wrap")
        if "open" not in (button.get_attribute("class") or "").split():
            button.click()
        expect(button).to_have_class(re.compile(r"\bopen\b"))


def choose_and_load(page, name: str = ALT) -> None:
    choose(page, "#session-dropdown", name)
    page.locator("#load-btn").click()
    expect(page.locator("#session-info")).to_contain_text(f"Session: {name}")


def run(page, iterations: int) -> None:
    page.locator("#iterations input").fill(str(iterations))
    page.locator("#run-btn").click()
    expect(page.locator("#progress")).to_contain_text(f"Done: {iterations}/{iterations}", timeout=RUN_TIMEOUT_MS)


def wait_for_pictures(page, elem_id: str = "") -> None:
    """Wait until the pictures of ``elem_id`` (at least one), or every picture of the page, have loaded;
    on a timeout, name the pictures still missing and what their addresses answer.

    Gradio's pictures load lazily: one whose address changed while it was far off screen (the run
    history's, after a run started further down) is not fetched until it is scrolled to, so the
    pictures waited for are switched to eager loading first."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "sel => { const imgs = Array.from(document.querySelectorAll(sel ? sel + ' img' : 'img'));"
            " imgs.forEach(i => { if (i.loading === 'lazy') i.loading = 'eager'; });"
            " return (!sel || imgs.length > 0) && imgs.every(i => !i.src || (i.complete && i.naturalWidth > 0)); }",
            arg=elem_id, timeout=30_000,
        )
    except PlaywrightTimeout:
        missing = page.evaluate(
            "sel => Array.from(document.querySelectorAll(sel ? sel + ' img' : 'img'))"
            ".filter(i => i.src && !(i.complete && i.naturalWidth > 0))"
            ".map(i => ({owner: (i.closest('[id]') || {}).id, src: i.src, complete: i.complete}))", elem_id)
        for m in missing:
            m["status"] = page.request.get(m["src"]).status
        pytest.fail(f"pictures not loaded after 30 s: {missing}")


def show_everything(page, elem_ids=("#frame-image", *VIEWS, "#plot-time", "#attn-image", "#attn-stats")) -> None:
    """Scroll past ``elem_ids`` so every lazily loaded picture is fetched before a screenshot."""
    for elem_id in elem_ids:
        page.locator(elem_id).scroll_into_view_if_needed()
        page.wait_for_timeout(150)
    wait_for_pictures(page)


def wait_for_new_picture(page, elem_id: str, old_src: str | None) -> None:
    page.wait_for_function(
        "([sel, old]) => { const i = document.querySelector(sel + ' img'); return i && i.src && i.src !== old; }",
        arg=[elem_id, old_src or ""], timeout=15_000,
    )


def click_patch(page, elem_id: str, row: int, col: int, patch_px: int) -> None:
    """Click the centre of patch (row, col) of a picture whose patches are ``patch_px`` natural pixels wide,
    wherever and however large the picture is drawn (the object-fit: contain arithmetic of the browser)."""
    img = page.locator(f"{elem_id} img").first
    img.scroll_into_view_if_needed()
    wait_for_pictures(page, elem_id)
    box = img.bounding_box()
    natural_w, natural_h = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    scale = min(box["width"] / natural_w, box["height"] / natural_h)
    left = box["x"] + (box["width"] - natural_w * scale) / 2
    top = box["y"] + (box["height"] - natural_h * scale) / 2
    page.mouse.click(left + (col + 0.5) * patch_px * scale, top + (row + 0.5) * patch_px * scale)


def drag_slider(page, elem_id: str, value: int) -> None:
    """Drag a slider's thumb to ``value`` with the mouse, as a user would: Gradio 6 sends a slider's
    ``release`` event on the range input's pointerup only (arrow keys change the value without it)."""
    track = page.locator(f"{elem_id} input[type=range]")
    track.scroll_into_view_if_needed()
    low, high, now = (float(v) for v in track.evaluate("e => [e.min, e.max, e.value]"))
    box = track.bounding_box()
    thumb = 16  # Chromium's thumb, in CSS pixels: the track runs from its centre at min to its centre at max

    def x(v: float) -> float:
        return box["x"] + thumb / 2 + (v - low) / (high - low) * (box["width"] - thumb)

    y = box["y"] + box["height"] / 2
    page.mouse.move(x(now), y)
    page.mouse.down()
    page.mouse.move(x(value), y, steps=8)
    page.mouse.up()
    expect(track).to_have_value(str(value))


def region_screenshot(page, first, last, path: Path) -> None:
    """Full-resolution screenshot of the page from the top of locator ``first`` to the bottom of ``last``,
    across the width of the app's main column (for sections that have no wrapper element of their own)."""
    top = first.evaluate("e => e.getBoundingClientRect().top + window.scrollY")
    bottom = last.evaluate("e => e.getBoundingClientRect().bottom + window.scrollY")
    left, right = page.locator("#app-title").evaluate(
        "e => { const r = e.closest('.main, .contain, .gradio-container').getBoundingClientRect();"
        " return [r.left + window.scrollX, r.right + window.scrollX]; }")
    page.screenshot(path=path, full_page=True,
                    clip={"x": left, "y": top - 8, "width": right - left, "height": bottom - top + 16})


# -----------------------------------------------------------------------------
# tests


def test_load_scrub_run_and_explore_attention(page):
    choose_and_load(page)
    unfold(page, "fold-attention")
    info = page.locator("#session-info")
    for text in ("Frames: 41", "Actions: 40", "Start:", "End:", "Robot: ToroidalDotRobot", "Action space:"):
        expect(info).to_contain_text(text)
    expect(page.locator("#broken-sessions")).to_contain_text("broken_no_metadata")
    expect(page.locator("#frame-info")).to_contain_text("Frame 0")
    first = picture(page, "#frame-image")
    assert (first.min(axis=2) >= 250).sum() > 100  # the white dot, at 2x

    page.locator("#frame-slider input[type=range]").fill("9")
    expect(page.locator("#frame-info")).to_contain_text("Frame 9")
    expect(page.locator("#jump-number input")).to_have_value("9")  # the Frame number box follows the slider
    expect(page.locator("#frame-info")).to_contain_text("Step: 18 (the recording counts frames and actions in one sequence")
    expect(page.locator("#frame-info")).to_contain_text("Action after it: 1 = move right")
    page.locator("#jump-number input").fill("12")
    page.locator("#jump-btn").click()
    expect(page.locator("#frame-info")).to_contain_text("Frame 12")
    expect(page.locator("#frame-slider input[type=number]")).to_have_value("12")
    assert not np.array_equal(picture(page, "#frame-image"), first)
    page.screenshot(path=ARTIFACTS / "01-session-loaded.png", full_page=True)

    run(page, 5)
    for elem_id in VIEWS:
        assert picture(page, elem_id).max() > 0, f"{elem_id} is black"
    assert picture(page, "#train-original").shape == (224, 688, 3)
    expect(page.locator("#checkpoint-info")).to_contain_text("Saved")
    expect(page.locator("#frame-info")).to_contain_text("Frame 17")  # the replay moved on; the next Run continues
    page.wait_for_function("() => document.querySelectorAll('#plot-time g.mark-line path').length > 0")
    assert line_points(page, "#plot-time") == 5
    assert line_points(page, "#plot-error") >= 3 and line_points(page, "#plot-loss") >= 3
    show_everything(page)
    page.screenshot(path=ARTIFACTS / "02-after-run-full-page.png", full_page=True)

    run(page, 3)  # the graphs grow: the history is kept across runs
    page.wait_for_function(f"() => {LINE_POINTS_JS}('#plot-time') === 8")

    stats = page.locator("#attn-stats")
    expect(stats).to_contain_text("connections")
    before_src, before_stats = image_src(page, "#attn-image"), stats.inner_text()
    page.locator("#attn-aggregation").get_by_text("max", exact=True).click()
    wait_for_new_picture(page, "#attn-image", before_src)
    expect(stats).not_to_have_text(before_stats)
    lines_src, lines_stats = image_src(page, "#attn-image"), stats.inner_text()
    page.locator("#attn-viz-type").get_by_text("Heatmap", exact=True).click()
    wait_for_new_picture(page, "#attn-image", lines_src)
    heatmap = picture(page, "#attn-image")
    assert heatmap.shape[0] > 400 and heatmap.max() > 0  # rows: 196 masked patches, 3 px each
    page.locator("#attn-layer-0 input").uncheck()
    expect(stats).not_to_have_text(lines_stats)
    expect(stats).not_to_contain_text("| L0 |")
    page.locator("#attn-image").scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "03-attention-heatmap.png", full_page=True)
    for head in range(4):
        page.locator(f"#attn-head-{head} input").uncheck()
    expect(stats).to_contain_text("Select at least one attention head")


def test_pick_a_patch_and_analyse_a_frame(page):
    """Click a patch of the predicted frame to see where it looks, then section 7's analyses."""
    out = ARTIFACTS / "pick_a_patch"
    out.mkdir(parents=True, exist_ok=True)
    choose_and_load(page)
    unfold(page)
    run(page, 5)
    assert picture(page, "#pred-canvas").max() > 0
    page.locator("#plot-grad").scroll_into_view_if_needed()
    page.wait_for_function("() => ['#plot-lr', '#plot-grad'].every(s => document.querySelector(s + ' g.mark-line path'))")
    assert line_points(page, "#plot-lr") == 3 and line_points(page, "#plot-grad") == 3  # the 3 iterations that trained

    # section 6: click the centre of patch (4, 9) of the 2x predicted frame (14 x 14 patches of 32 px)
    page.locator("#attn-picker").scroll_into_view_if_needed()
    expect(page.locator("#attn-picker img")).to_have_count(1)
    assert picture(page, "#attn-picker").shape == (448, 448, 3)
    old_src, old_picker = image_src(page, "#patch-image"), image_src(page, "#attn-picker")
    click_patch(page, "#attn-picker", 4, 9, patch_px=32)
    expect(page.locator("#patch-row input")).to_have_value("4")
    expect(page.locator("#patch-col input")).to_have_value("9")
    expect(page.locator("#patch-info")).to_contain_text("Patch (row 4, col 9) of the predicted frame")
    wait_for_new_picture(page, "#patch-image", old_src)
    wait_for_new_picture(page, "#attn-picker", old_picker)
    assert (picture(page, "#attn-picker")[4 * 32, 9 * 32 + 16] == (0, 255, 255)).all()  # the chosen patch is ringed
    patch = picture(page, "#patch-image")
    assert patch.shape[0] >= 224 and np.ptp(patch) > 100 and len(np.unique(patch.reshape(-1, 3), axis=0)) > 20
    wait_for_pictures(page, "#patch-image")
    region_screenshot(page, page.get_by_role("heading", name="One patch: where does it look?"),
                      page.locator("#patch-image"), out / "section6-patch-attention.png")

    # section 7 at frame 9 (the recorded action after it: move right)
    page.locator("#frame-slider input[type=range]").fill("9")
    expect(page.locator("#analysis-frame input")).to_have_value("9")  # follows the slider in the browser
    page.locator("#cf-btn").click()
    cf_info = page.locator("#cf-info")
    expect(cf_info).to_contain_text("the recorded action after frame 9 was move right")
    expect(page.locator("#cf-1")).to_contain_text("Frame 10 if move right (recorded)")
    for elem_id in ("#cf-0", "#cf-1", "#cf-actual"):
        assert picture(page, elem_id).shape == (448, 448, 3), elem_id

    page.locator("#rollout-k input").fill("3")
    page.locator("#rollout-btn").click()
    expect(page.locator("#rollout-info")).to_contain_text("3 steps imagined from frame 9")
    rows = page.locator("#rollout-table [role=grid] [role=row][data-index]")  # Gradio's grid: header row + data rows
    expect(rows).to_have_count(3)
    expect(page.locator("#rollout-table [role=gridcell][data-col='1']")).to_have_text(["10", "11", "12"])  # frame
    assert picture(page, "#rollout-image").max() > 0

    choose(page, "#eval-session", ALT)
    page.locator("#eval-btn").click()
    eval_info = page.locator("#eval-info")
    expect(eval_info).to_contain_text(f"Session {ALT}", timeout=60_000)
    expect(eval_info.locator("table tbody tr td:first-child")).to_have_text(["all", "after stay", "after move right"])
    page.wait_for_function("() => document.querySelectorAll('#eval-plot g.mark-symbol path').length > 0")

    page.locator("#canvas-steps input").fill("5")
    page.locator("#canvas-btn").click()
    expect(page.locator("#canvas-progress")).to_contain_text("Done: 5/5", timeout=RUN_TIMEOUT_MS)
    page.wait_for_function("() => document.querySelectorAll('#canvas-plot g.mark-line path').length > 0")
    assert line_points(page, "#canvas-plot") >= 5

    show_everything(page, ("#cf-0", "#rollout-image", "#eval-plot", "#canvas-plot"))
    region_screenshot(page, page.locator("#fold-analysis > button"),
                      page.locator("#canvas-plot"), out / "section7-analysis.png")


def test_stop_ends_a_long_run(page):
    choose_and_load(page)
    unfold(page, "fold-attention")
    page.locator("#iterations input").fill("200")
    page.locator("#run-btn").click()
    expect(page.locator("#progress")).to_contain_text(re.compile(r"Running: [1-9]\d*/200"), timeout=RUN_TIMEOUT_MS)
    page.locator("#frame-slider input[type=range]").fill("30")  # moved during the run: kept for the next one
    expect(page.locator("#frame-info")).to_contain_text("Frame 30")
    clicked = time.monotonic()
    page.locator("#stop-btn").click()
    expect(page.locator("#progress")).to_contain_text("Stopped:", timeout=30_000)
    assert time.monotonic() - clicked < 30
    done = int(re.search(r"Stopped: (\d+)/200", page.locator("#progress").inner_text()).group(1))
    assert 1 <= done < 100
    expect(page.locator("#frame-slider input[type=number]")).to_have_value("30")
    expect(page.locator("#attn-stats")).to_contain_text("connections")  # finished cleanly: attention captured
    show_everything(page)
    page.screenshot(path=ARTIFACTS / "04-stopped-run.png", full_page=True)
    run(page, 2)  # the model is consistent and the next run works, from the slider's frame
    expect(page.locator("#frame-info")).to_contain_text("Frame 32")
    page.locator("#iterations input").fill("200")
    page.locator("#run-btn").click()
    page.locator("#stop-btn").click()  # right after Run: that run stops, whether or not it had begun
    expect(page.locator("#progress")).to_contain_text(re.compile(r"Stopped: \d+/200"), timeout=60_000)
    assert int(re.search(r"Stopped: (\d+)/200", page.locator("#progress").inner_text()).group(1)) < 10


def test_closing_a_tab_frees_its_model(page, app_server):
    choose_and_load(page)
    run(page, 1)
    marker = "freed the world model of a closed tab"
    time.sleep(2)  # let earlier tabs' clean-up finish so their lines are not counted as ours
    count = app_server.log().count(marker)
    page.close()
    deadline = time.monotonic() + 30
    while app_server.log().count(marker) <= count and time.monotonic() < deadline:
        time.sleep(0.25)
    assert app_server.log().count(marker) == count + 1


def test_record_browse_history_save_and_export(page):
    """Record a session from the page, run on it, look back at an earlier iteration, keep the
    model as a named checkpoint and download the export zip."""
    out = ARTIFACTS / "record_and_export"
    out.mkdir(parents=True, exist_ok=True)
    sessions = page.locator("#session-dropdown input")
    expect(sessions).not_to_have_value("", timeout=30_000)  # the page has listed the sessions: no refresh to come
    unfold(page, "fold-work")
    choose(page, "#record-pattern", "alternate")
    page.locator("#record-steps input").fill("12")
    page.locator("#record-seed input").fill("3")
    page.locator("#record-btn").click()
    expect(page.locator("#record-info")).to_contain_text("Recorded session", timeout=60_000)
    expect(sessions).to_have_value(re.compile(r"^toroidal_dot_alternate_\d{8}_\d{6}_3$"))  # the new one, selected
    name = sessions.input_value()
    expect(page.locator("#record-info")).to_contain_text("13 frames, pattern alternate, seed 3")
    page.locator("#load-btn").click()
    info = page.locator("#session-info")
    expect(info).to_contain_text(f"Session: {name}")
    expect(info).to_contain_text("Frames: 13")
    expect(info).to_contain_text("Pattern: alternate")
    expect(page.locator("#frame-info")).to_contain_text("Frame 0")
    frame0 = picture(page, "#frame-image")

    run(page, 6)
    history = page.locator("#history-slider input[type=range]")
    # the slider's range comes in the same update as "Done", but under load the page may draw it a moment later
    page.wait_for_function("() => { const e = document.querySelector('#history-slider input[type=range]');"
                           " return e && Number(e.max) - Number(e.min) === 5; }", timeout=15_000)
    first, last = (int(v) for v in history.evaluate("e => [e.min, e.max]"))
    assert last - first == 5 and history.input_value() == str(last)  # this run's 6 iterations, at the latest
    target = first + 2  # its third iteration looked at frame 2 (the replay started at frame 0)
    drag_slider(page, "#history-slider", target)
    expect(page.locator("#history-info")).to_contain_text(re.compile(rf"\bIteration {target} \|"))
    wait_for_pictures(page, "#history-current")
    shown = picture(page, "#history-current")
    old_src = image_src(page, "#frame-image")
    page.locator("#frame-slider input[type=range]").fill("2")
    expect(page.locator("#frame-info")).to_contain_text("Frame 2")
    wait_for_new_picture(page, "#frame-image", old_src)
    assert np.array_equal(shown, picture(page, "#frame-image"))  # frame 2, at 2x
    assert not np.array_equal(shown, frame0)  # alternate: stay, move, ...: the dot moved between frames 1 and 2
    for elem_id in ("#history-predicted", "#history-error"):
        assert picture(page, elem_id).shape == shown.shape, elem_id

    page.locator("#ckpt-name textarea").fill("browser-ckpt")
    page.locator("#ckpt-save-btn").click()
    ckpt_info = page.locator("#ckpt-info")
    expect(ckpt_info).to_contain_text("Saved browser-ckpt.pth")
    row = ckpt_info.locator("table tbody tr").filter(has_text="browser-ckpt")
    expect(row.locator("td")).to_have_text(["browser-ckpt", re.compile(r"\d+"), str(last), re.compile(r"\d"), name])
    expect(page.locator("#ckpt-choice input")).to_have_value("browser-ckpt")

    page.locator("#export-btn").click()
    link = page.locator("#export-file a[download]")
    expect(link).to_have_attribute("download", re.compile(r"^cwm_export_step\d+_iteration\d+\.zip$"), timeout=60_000)
    with page.expect_download() as download_info:
        link.click()
    download = download_info.value
    with zipfile.ZipFile(download.path()) as zf:
        names = set(zf.namelist())
        for member in ("train_original.png", "prediction_next.png", "attention.png", "metrics.csv", "config.json",
                       "README.txt"):
            assert member in names, f"{member} missing from {download.suggested_filename}: {sorted(names)}"
        metrics = zf.read("metrics.csv").decode()
        readme = zf.read("README.txt").decode()
    # the tab's metric history is this run's 6 iterations (its model may go on from the shared checkpoint)
    assert len(metrics.splitlines()) == 1 + 6
    assert [int(r["iteration"]) for r in csv.DictReader(io.StringIO(metrics))] == list(range(first, last + 1))
    assert "(6 rows)" in readme and f"session: {name}" in readme

    for elem_id in ("#history-current", "#history-predicted", "#history-error"):
        page.locator(elem_id).scroll_into_view_if_needed()
        wait_for_pictures(page, elem_id)
    region_screenshot(page, page.locator("#fold-work > button"),
                      page.locator("#export-file"), out / "section8.png")


# -----------------------------------------------------------------------------
# the page a new user can trust (issue 21): graphs that can be read, views that follow the model,
# refusals that leave the page as it was


def hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)


def colour_mask(image: np.ndarray, colour: str, tolerance: int = 40) -> np.ndarray:
    """(H, W) True where a pixel is within ``tolerance`` (sum of channel differences) of ``colour``."""
    return np.abs(image.astype(np.int16) - hex_rgb(colour)).sum(axis=2) <= tolerance


def element_pixels(page, elem_id: str) -> np.ndarray:
    """A screenshot of one element as (H, W, 3) uint8, scrolled into view first."""
    page.locator(elem_id).scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    with Image.open(io.BytesIO(page.locator(elem_id).screenshot())) as image:
        return np.asarray(image.convert("RGB"))


def column_runs(columns: np.ndarray) -> int:
    """Number of separate runs of True in a 1-D mask (vertical marks side by side count once)."""
    return int(np.count_nonzero(np.diff(np.concatenate([[0], columns.astype(np.int8)])) == 1))


def test_the_error_graph_shows_model_and_baseline_as_two_readable_lines_and_marks_the_replay_loop(page):
    """On an alternating session the copy-last-frame baseline jumps between 0 and its full error
    every iteration. Both the model's line and the baseline's must be readable: each a line of its
    own colour across the graph (not a block), and the replay's loop to frame 0 marked."""
    from page_outputs import ERROR_COLOURS, LOOP_COLOUR, SERIES_BASELINE_MEAN, SERIES_PREDICTION_MEAN

    out = ARTIFACTS / "trust"
    out.mkdir(parents=True, exist_ok=True)
    choose_and_load(page)
    run(page, 45)  # 41 frames: the replay loops after iteration 41
    page.wait_for_function("() => document.querySelectorAll('#plot-error g.mark-line path').length > 4")
    pixels = element_pixels(page, "#plot-error")
    Image.fromarray(pixels).save(out / "plot-error.png")
    # the data area: where the graph's lines are (the axis labels are grey too)
    left, top, right, bottom = page.evaluate(
        "() => { const b = document.querySelector('#plot-error').getBoundingClientRect();"
        " const r = Array.from(document.querySelectorAll('#plot-error g.mark-line path')).map(p => p.getBoundingClientRect())"
        ".filter(r => r.width > 0 || r.height > 0);"
        " return [Math.min(...r.map(x => x.left)) - b.left, Math.min(...r.map(x => x.top)) - b.top,"
        " Math.max(...r.map(x => x.right)) - b.left, Math.max(...r.map(x => x.bottom)) - b.top]; }")
    pixels = pixels[int(top):int(bottom) + 1, int(left):int(right) + 1]
    model = colour_mask(pixels, ERROR_COLOURS[SERIES_PREDICTION_MEAN])
    baseline = colour_mask(pixels, ERROR_COLOURS[SERIES_BASELINE_MEAN])
    loop = colour_mask(pixels, LOOP_COLOUR)
    width = np.flatnonzero(model.any(axis=0) | baseline.any(axis=0))
    span = width[-1] - width[0] + 1
    # the model's line is drawn over the baseline's: where the model sits at the baseline's mean error
    # (a fresh model predicting black frames does on an alternating session) it covers that line
    for name, mask, seen in (("model", model, model), ("baseline", baseline, baseline | model)):
        columns = mask.any(axis=0)
        assert seen.any(axis=0).sum() >= 0.8 * span, f"the {name} line is hidden in much of the graph"
        assert columns.sum() >= 0.25 * span, f"the {name} line is hardly drawn"
        extent = [np.ptp(np.flatnonzero(mask[:, x])) for x in np.flatnonzero(columns)]
        assert np.median(extent) <= 12, f"the {name} line is a block, not a line (median height {np.median(extent)} px)"
    tall = loop.sum(axis=0) >= 0.5 * np.ptp(np.flatnonzero((model | baseline).any(axis=1)))
    assert column_runs(tall) == 1  # one vertical mark: the loop after iteration 41


def test_views_follow_the_model_after_a_run_a_reset_and_a_checkpoint_load(page):
    """Every view shows what its label says: right after a run the run history shows the run's last
    iteration; after Reset no graph holds a point and no view a picture; after a checkpoint load and a
    new run the run history's pictures and text are those of the iteration its slider reads."""
    choose_and_load(page)
    unfold(page)
    run(page, 5)  # the model may go on from the shared checkpoint: its iterations count from there
    history, slider = page.locator("#history-info"), page.locator("#history-slider input[type=number]")
    last = int(re.search(r"model step \d+, iteration (\d+)", page.locator("#progress").inner_text()).group(1))
    expect(slider).to_have_value(str(last))
    expect(history).to_contain_text(re.compile(rf"\bIteration {last} \|"))
    expect(page.locator("#history-predicted img")).to_have_count(1)
    assert np.array_equal(picture(page, "#history-predicted"), picture(page, "#pred-next"))  # the run's last prediction

    name = f"views-{time.time_ns()}"
    page.locator("#ckpt-name textarea").fill(name)
    page.locator("#ckpt-save-btn").click()
    expect(page.locator("#ckpt-info")).to_contain_text(f"Saved {name}.pth")
    page.locator("#reset-btn").click()
    expect(page.locator("#ckpt-info")).to_contain_text("Reset:")
    for elem_id in ("#plot-error", "#plot-time", "#plot-loss", "#plot-dot", "#plot-lr", "#plot-grad"):
        page.locator(elem_id).scroll_into_view_if_needed()
        page.wait_for_function("s => document.querySelectorAll(s + ' g.mark-line path').length === 0 || "
                               "Array.from(document.querySelectorAll(s + ' g.mark-line path'))"
                               ".every(p => !(p.getAttribute('d') || '').length)", arg=elem_id)
        assert line_points(page, elem_id) == 0, f"{elem_id} still shows the old model's points"
    for elem_id in (*VIEWS, "#pred-canvas", "#attn-image", "#history-current", "#history-predicted", "#history-error"):
        expect(page.locator(f"{elem_id} img")).to_have_count(0)
    expect(history).to_contain_text("No run history yet")

    choose(page, "#ckpt-choice", name)
    page.locator("#ckpt-load-btn").click()
    expect(page.locator("#ckpt-info")).to_contain_text(f"Loaded {name}.pth")
    page.locator("#export-btn").click()  # before a run: the page says what the zip lacks
    expect(page.locator("#export-info")).to_contain_text("Not in the zip yet")
    expect(page.locator("#export-info")).to_contain_text("metrics.csv holds its header only")
    run(page, 3)
    expect(slider).to_have_value(str(last + 3))  # the loaded model's iterations go on from its checkpoint
    expect(history).to_contain_text(re.compile(rf"\bIteration {last + 3} \|"))
    expect(page.locator("#history-predicted img")).to_have_count(1)
    assert np.array_equal(picture(page, "#history-predicted"), picture(page, "#pred-next"))


def settled_text(page, elem_id: str) -> str:
    """The text of an output once its event is over (no progress timer such as "0.1s" left over it)."""
    page.wait_for_function("s => !/^\\s*\\d+(\\.\\d+)?s\\b/.test(document.querySelector(s).innerText)", arg=elem_id)
    return page.locator(elem_id).inner_text()


def first_traceback(log: str) -> str:
    """The first traceback in the app's terminal, from the line before it to the exception it ends
    with (the next timestamped log line), its middle cut: what a failure message should show."""
    start = log.index("Traceback")
    start = log.rfind("\n", 0, log.rfind("\n", 0, start)) + 1  # the line that announced it
    end = re.search(r"\n\d{4}-\d\d-\d\d \d\d:", log[start:])
    block = log[start:start + end.start()] if end else log[start:]
    return block if len(block) < 2500 else block[:500] + "\n[...]\n" + block[-2000:]


def error_badges(page) -> int:
    """Visible elements that say just "Error": the badge Gradio puts over an output whose event failed,
    and the title of an error toast."""
    return page.get_by_text("Error", exact=True).evaluate_all(
        "els => els.filter(e => e.offsetParent !== null && e.getClientRects().length).length")


def test_a_refused_input_leaves_every_output_as_it_was(page, app_server):
    """Frame 999 and a checkpoint name already taken are refused next to the box they were typed in;
    the frame, slider, frame text and checkpoint list stay as they were, with no "Error" badge over
    them, and the page goes on working (the dropdown stays usable through a Reset)."""
    out = ARTIFACTS / "trust"
    out.mkdir(parents=True, exist_ok=True)
    choose_and_load(page)
    unfold(page, "fold-work")
    page.locator("#jump-number input").fill("12")
    page.locator("#jump-btn").click()
    expect(page.locator("#frame-info")).to_contain_text("Frame 12")
    src, info = image_src(page, "#frame-image"), settled_text(page, "#frame-info")

    page.locator("#jump-number input").fill("999")
    page.locator("#jump-btn").click()
    expect(page.locator("#jump-number")).to_contain_text("Frame number must be a whole number from 0 to 40 (got 999)")
    page.wait_for_timeout(1000)  # time for a late update to arrive, were there one
    page.locator("#frame-image").scroll_into_view_if_needed()
    page.screenshot(path=out / "jump-999-refused.png")
    assert error_badges(page) == 0
    assert image_src(page, "#frame-image") == src and page.locator("#frame-info").inner_text() == info
    log = app_server.log()  # the terminal: one line for an ordinary input error, no traceback
    assert log.count("Frame number must be a whole number from 0 to 40 (got 999)") == 1, log[-3000:]
    assert "Traceback" not in log, first_traceback(log)
    expect(page.locator("#frame-slider input[type=number]")).to_have_value("12")

    run(page, 1)
    name = f"refused-{time.time_ns()}"
    page.locator("#ckpt-name textarea").fill(name)
    page.locator("#ckpt-save-btn").click()
    ckpt_info = page.locator("#ckpt-info")
    expect(ckpt_info).to_contain_text(f"Saved {name}.pth")
    table = settled_text(page, "#ckpt-info")
    page.locator("#ckpt-save-btn").click()  # the same name again
    expect(page.locator("#ckpt-name")).to_contain_text(f"a checkpoint named {name} already exists")
    page.wait_for_timeout(1000)
    page.locator("#ckpt-choice").scroll_into_view_if_needed()
    page.screenshot(path=out / "duplicate-checkpoint-refused.png")
    assert error_badges(page) == 0
    assert ckpt_info.inner_text() == table
    expect(page.locator("#ckpt-choice input")).to_have_value(name)
    page.locator("#reset-btn").click()
    expect(ckpt_info).to_contain_text("Reset:")
    choose(page, "#ckpt-choice", name)  # nothing covers the dropdown
    assert error_badges(page) == 0


def test_the_first_page_shows_sessions_run_views_and_graphs_with_the_later_sections_folded(page, app_server):
    """Before any action the page is sessions, run, views and graphs (about 4,000 px at 1500 x 1000,
    not 12,500 of mostly empty boxes); attention, analysis/play/compare and your work are folded under
    their titles and open with a click."""
    out = ARTIFACTS / "trust"
    out.mkdir(parents=True, exist_ok=True)
    expect(page.locator("#session-dropdown input")).not_to_have_value("", timeout=30_000)
    height = page.evaluate("document.documentElement.scrollHeight")
    page.screenshot(path=out / "first-page.png", full_page=True)
    assert height < 5000, f"the first page is {height} px tall"
    # the folder the checkpoint lines name is told once: on the page's foot, and its path in the terminal
    expect(page.locator("#folders-note")).to_contain_text("checkpoints kept in <checkpoints> (outside the project folder")
    log = app_server.log()
    assert f"checkpoints in <checkpoints> = {app_server.saved_root / 'checkpoints' / 'toroidal_dot'}" in log
    assert "share=True" not in log and "Running on local URL" in log  # the app's --share flag, not Gradio's hint
    for fold in FOLDS:
        expect(page.locator(f"#{fold} > button.label-wrap")).not_to_have_class(re.compile(r"\bopen\b"))
    expect(page.locator("#fold-attention > button")).to_contain_text("6. Decoder attention")
    expect(page.locator("#attn-image")).to_have_count(0)  # nothing of a fold is drawn while it is closed
    unfold(page, "fold-attention")
    expect(page.locator("#attn-image")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollHeight") > height


def shown_picture(page, elem_id: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) in CSS pixels of the dark picture an image block shows, read off a
    screenshot of the block (the frames' black background against the page's light one)."""
    page.locator(elem_id).scroll_into_view_if_needed()
    wait_for_pictures(page, elem_id)
    pixels = element_pixels(page, elem_id)
    dark = pixels.astype(np.int16).sum(axis=2) < 60  # (H, W)
    rows, cols = np.flatnonzero(dark.any(axis=1)), np.flatnonzero(dark.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_frames_are_shown_at_their_own_2x_size_with_their_labels_above_them(page):
    """A "(2x)" frame is a 448 px picture shown at 448 CSS px (no stretching, no shrinking), a canvas
    at its 224 px height; each label sits above its picture, never over it."""
    out = ARTIFACTS / "trust"
    out.mkdir(parents=True, exist_ok=True)
    choose_and_load(page)
    run(page, 3)
    unfold(page, "fold-attention")
    for elem_id, size in (("#frame-image", (448, 448)), ("#pred-current", (448, 448)), ("#pred-next", (448, 448)),
                          ("#pred-canvas", (224, 688)), ("#attn-picker", (448, 448))):
        top, left, height, width = shown_picture(page, elem_id)
        assert abs(height - size[0]) <= 2 and abs(width - size[1]) <= 2, (elem_id, height, width)
        block, label = page.locator(elem_id).bounding_box(), page.locator(f"{elem_id} [data-testid=block-label]").bounding_box()
        assert label["y"] + label["height"] - block["y"] <= top + 1, f"the label of {elem_id} covers its picture"
    page.locator("#pred-current").scroll_into_view_if_needed()
    page.screenshot(path=out / "prediction-views.png")
    # the lines view is drawn at least as large as it is shown: shrunk a little, never stretched
    page.locator("#attn-image").scroll_into_view_if_needed()
    wait_for_pictures(page, "#attn-image")
    drawn, shown = page.locator("#attn-image img").evaluate("i => [i.naturalWidth, i.getBoundingClientRect().width]")
    assert drawn >= shown, (drawn, shown)
    expect(page.locator("#attn-quantile input[type=number]")).to_have_value("99.8")


# the x axis's tick labels of a Vega (SVG) graph: [text, x of its anchor, angle, width, height], in the
# graph's own pixels (the width and height before any rotation)
X_LABELS_JS = """sel => {
  const axis = Array.from(document.querySelectorAll(sel + ' g.role-axis'))
    .find(g => (g.getAttribute('aria-label') || '').startsWith('X-axis'));
  return Array.from(axis.querySelectorAll('g.role-axis-label text')).map(t => {
    const box = t.getBBox();
    const m = (t.getAttribute('transform') || '').match(/translate\\(([-\\d.]+),[-\\d.]+\\)(?:\\s*rotate\\(([-\\d.]+)\\))?/);
    return [t.textContent, +m[1], +(m[2] || 0), box.width, box.height];
  });
}"""


DIGIT_HEIGHT = 0.55  # of a text box's height


def label_gaps(labels: list) -> list[float]:
    """Free space in pixels between neighbouring tick labels: along the axis for level labels, across
    the slant for slanted ones (two parallel slanted labels are dx * sin(angle) apart)."""
    labels = sorted(labels, key=lambda label: label[1])
    gaps = []
    for a, b in zip(labels, labels[1:]):
        dx, slant = b[1] - a[1], abs(np.sin(np.radians(a[2])))  # Vega writes -40 degrees as rotate(320)
        # a text box is a line high; digits fill about 55% of it (no descenders, cap height ~0.7 em)
        gaps.append(dx - (a[3] + b[3]) / 2 if slant < 1e-6 else dx * slant - DIGIT_HEIGHT * a[4])
    return gaps


@pytest.mark.parametrize("iterations, width", [(300, 420), (1300, 760), (20000, 420), (20000, 1500)])
def test_tick_labels_of_a_metric_graph_never_run_into_each_other(browser, iterations, width):
    """The page's graph builder on a long run in a narrow window: every pair of neighbouring x labels
    keeps at least 4 px of space between them (level 5-digit labels overlapped at 420 px: "1400016000")."""
    import gradio as gr
    import pandas as pd

    from conftest import free_port
    from page_common import PLOT_HEIGHT, line_plot

    frame = pd.DataFrame({"iteration": np.arange(1, iterations + 1), "value": np.linspace(0, 90, iterations),
                          "series": "model"})
    with gr.Blocks() as demo:
        plot = line_plot("Dot found", "plot", "%", {"model": "#5b4bb7"}, y_lim=[0, 100])
        # as the app sends graphs: a change of height makes Vega lay the axes out for the data (graph_updates)
        demo.load(lambda: gr.update(value=frame, height=PLOT_HEIGHT + 1), None, plot)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    context = browser.new_context(viewport={"width": width, "height": 700})
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}")
        last = str(iterations)
        page.wait_for_function(f"n => {{ try {{ return ({X_LABELS_JS})('#plot').some(l => l[0] === n); }}"
                               " catch (e) { return false; } }", arg=last, timeout=30_000)
        labels = page.evaluate(X_LABELS_JS, "#plot")
        page.locator("#plot").screenshot(path=ARTIFACTS / f"tick-labels-{iterations}-at-{width}px.png")
        gaps = label_gaps(labels)
        assert min(gaps) >= 4, (labels, gaps)
    finally:
        context.close()
        demo.close()


def test_the_evaluation_graph_is_laid_out_when_it_is_first_drawn(page):
    """Right after Evaluate, without scrolling or resizing: the y labels of the evaluation scatter
    lie inside the graph (not clipped at its left edge), its legend names the three series, and its
    x labels keep apart."""
    from page_analysis import EVALUATION_COLOURS

    choose_and_load(page)
    unfold(page, "fold-analysis")
    choose(page, "#eval-session", ALT)
    page.locator("#eval-btn").click()
    expect(page.locator("#eval-info")).to_contain_text(f"Session {ALT}", timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('#eval-plot g.mark-symbol path').length > 0")
    page.wait_for_timeout(500)  # the relayout after the data
    left_of_svg, left_of_labels = page.evaluate(
        "() => { const svg = document.querySelector('#eval-plot svg.marks').getBoundingClientRect();"
        " const axis = Array.from(document.querySelectorAll('#eval-plot g.role-axis'))"
        ".find(g => (g.getAttribute('aria-label') || '').startsWith('Y-axis'));"
        " const r = Array.from(axis.querySelectorAll('g.role-axis-label text')).map(t => t.getBoundingClientRect().left);"
        " return [svg.left, Math.min(...r)]; }")
    assert left_of_labels >= left_of_svg, "the y labels are clipped at the graph's left edge"
    legend = page.locator("#eval-plot g.role-legend g.role-legend-label text").all_text_contents()
    assert sorted(legend) == sorted(EVALUATION_COLOURS)
    assert min(label_gaps(page.evaluate(X_LABELS_JS, "#eval-plot"))) >= 4
