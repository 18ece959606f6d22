"""Browser test of Play: a user drives the model with the Move button and reads the per-step table
(Chromium through Playwright, with ``test_browser``'s fixtures and helpers)."""

from __future__ import annotations

import pytest

from test_browser import (  # noqa: F401
    ARTIFACTS,
    browser,
    choose_and_load,
    error_badges,
    expect,
    image_src,
    page,
    picture,
    region_screenshot,
    unfold,
)

pytestmark = pytest.mark.browser


def test_press_move_three_times_and_read_the_table(page):
    choose_and_load(page)
    unfold(page, "fold-analysis")
    page.locator("#frame-slider input[type=range]").fill("4")
    expect(page.locator("#analysis-frame input")).to_have_value("4")
    page.locator("#play-reset-btn").click()
    info = page.locator("#play-info")
    expect(info).to_contain_text("Playing from frame 4")
    expect(info).to_contain_text("0 of at most 50 steps")
    for pressed in (1, 2, 3):  # each press waits for the one before: the table must grow by one row
        page.locator("#play-move-btn").click()
        expect(info).to_contain_text(f"{pressed} of at most 50 steps ({'1' * pressed})")
    rows = page.locator("#play-table [role=grid] [role=row][data-index]")  # Gradio's grid: header row + data rows
    expect(rows).to_have_count(3)
    expect(page.locator("#play-table [role=gridcell][data-col='1']")).to_have_text(["5", "6", "7"])  # frame
    expect(page.locator("#play-table [role=gridcell][data-col='2']")).to_have_text(["move right"] * 3)
    expect(page.locator("#play-truth")).to_contain_text("True frame 7 (simulated)")
    assert picture(page, "#play-truth").shape == (448, 448, 3) and picture(page, "#play-truth").max() == 255  # the dot
    assert picture(page, "#play-strip").shape == (3 * 224 + 8, 4 * 224 + 3 * 4, 3)  # frames 4-7
    out = ARTIFACTS / "play"
    out.mkdir(parents=True, exist_ok=True)
    region_screenshot(page, page.get_by_role("heading", name="Play the model", exact=False),
                      page.locator("#play-info"), out / "section7-play.png")

    # a refused action string is answered under its box; the play's pictures, table and text stay
    text, truth = info.inner_text(), image_src(page, "#play-truth")
    page.locator("#play-actions textarea").fill("12")
    page.locator("#play-actions textarea").press("Enter")
    expect(page.locator("#play-actions")).to_contain_text("Actions must be 1-50 characters")
    page.wait_for_timeout(1000)  # time for a late update to arrive, were there one
    assert error_badges(page) == 0
    assert info.inner_text() == text and image_src(page, "#play-truth") == truth
    expect(rows).to_have_count(3)
