"""The whole journey in a real headless Chromium: upload, train, follow the job, find the adapter, generate."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import write_images

pytestmark = pytest.mark.e2e

TRAIN_STEPS = 6
GEN_STEPS = 2
JOB_TIMEOUT_MS = 180_000
CANCELLED_STEPS = 500  # long enough that the cancel always lands first


def open_tab(page: Page, label: str) -> None:
    page.get_by_role("tab", name=label, exact=True).click()


def fill_train_form(page: Page, files: list[Path], name: str, trigger: str, steps: int, rank: int) -> None:
    page.locator("#train-files input[type=file]").set_input_files([str(f) for f in files])
    for f in files:  # the upload finished once every file is listed with its link
        expect(page.locator(f'#train-files a[href$="/{f.name}"]')).to_have_count(1)
    page.locator("#train-name textarea").fill(name)
    page.locator("#train-trigger textarea").fill(trigger)
    page.locator("#train-steps input[type=number]").fill(str(steps))
    page.locator("#train-rank input[type=number]").fill(str(rank))
    page.locator("#train-rank input[type=number]").blur()


def pick_option(page: Page, elem_id: str, text: str) -> None:
    """Open a Gradio dropdown and click the option with this text."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=re.compile(re.escape(text))).first.click()


def test_corrupt_file_is_named_and_good_file_kept(page: Page, tmp_path: Path, screenshots: Path) -> None:
    good = write_images(tmp_path / "good", 1, captions=False)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    fill_train_form(page, [*good, bad], name="e2e-partial", trigger="qpz", steps=CANCELLED_STEPS, rank=4)
    page.locator("#train-submit").click()

    status = page.locator("#train-status")
    expect(status).to_contain_text("Queued", timeout=60_000)
    expect(status).to_contain_text("train e2e-partial")
    expect(status).to_contain_text("1 image(s)")
    expect(status).to_contain_text("bad.png")
    page.screenshot(path=str(screenshots / "0-train-rejected-file.png"), full_page=True)

    open_tab(page, "Jobs")
    row = page.locator("#jobs-table tr", has_text="train e2e-partial")
    expect(row).to_be_visible()
    expect(row).to_contain_text(re.compile(r"queued|running"))
    pick_option(page, "jobs-selected", "train e2e-partial")
    page.locator("#jobs-cancel").click()
    expect(row).to_contain_text("cancelled", timeout=60_000)


def test_train_find_and_generate(page: Page, tmp_path: Path, screenshots: Path) -> None:
    name = "e2e-disc"
    images = write_images(tmp_path / "upload", 3, captions=False)
    fill_train_form(page, images, name=name, trigger="zqx", steps=TRAIN_STEPS, rank=4)
    page.locator("#train-submit").click()

    status = page.locator("#train-status")
    expect(status).to_contain_text("Queued", timeout=60_000)
    expect(status).to_contain_text(f"train {name}")
    expect(status).to_contain_text("3 image(s)")
    page.screenshot(path=str(screenshots / "1-train-queued.png"), full_page=True)

    open_tab(page, "Jobs")
    row = page.locator("#jobs-table tr", has_text=f"train {name}")
    expect(row).to_contain_text("succeeded", timeout=JOB_TIMEOUT_MS)
    expect(row).to_contain_text(f"{TRAIN_STEPS}/{TRAIN_STEPS}")
    page.screenshot(path=str(screenshots / "2-jobs-succeeded.png"), full_page=True)

    open_tab(page, "Gallery")
    page.locator("#gallery-refresh").click()
    cards = page.locator("#gallery-cards")
    expect(cards).to_contain_text(name)
    page.screenshot(path=str(screenshots / "3-gallery-cards.png"), full_page=True)
    cards.locator("button", has_text=name).first.click()
    detail = page.locator("#gallery-detail")
    expect(detail).to_contain_text(name)
    expect(detail).to_contain_text("lora")
    expect(detail).to_contain_text("rank 4")
    expect(detail).to_contain_text(f"steps {TRAIN_STEPS}")
    expect(detail).to_contain_text("zqx")
    expect(page.locator("#gallery-download")).to_be_visible()
    page.screenshot(path=str(screenshots / "4-gallery-detail.png"), full_page=True)

    open_tab(page, "Generate")
    pick_option(page, "gen-adapter-0", name)
    page.locator("#gen-prompt textarea").fill("a photo of zqx disc")
    steps = page.locator("#gen-steps input[type=number]")
    steps.fill(str(GEN_STEPS))
    steps.blur()
    page.locator("#gen-submit").click()
    expect(page.locator("#gen-result img")).to_have_attribute("src", re.compile(r".+"), timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#gen-status")).to_contain_text("1 adapter(s)")
    expect(page.locator("#gen-history img").first).to_be_visible()
    page.screenshot(path=str(screenshots / "5-generated.png"), full_page=True)


def test_composer_settings_follow_the_composer(page: Page, screenshots: Path) -> None:
    open_tab(page, "Generate")
    page.locator("#gen-composer-settings").get_by_text("Composer settings").click()
    expect(page.locator("#gen-setting-normalize")).to_be_visible()  # merge's settings
    expect(page.locator("#gen-setting-interval")).to_have_count(0)
    expect(page.locator("#gen-concept-0")).to_be_hidden()
    expect(page.locator("#gen-regions")).to_be_hidden()

    pick_option(page, "gen-composer", "switch")
    expect(page.locator("#gen-setting-interval input[type=number]")).to_have_value("5")  # the documented default
    expect(page.locator("#gen-setting-order")).to_be_visible()
    expect(page.locator("#gen-setting-normalize")).to_have_count(0)
    expect(page.locator("#gen-composer-settings")).to_contain_text("Steps each adapter stays active")  # help text

    pick_option(page, "gen-composer", "clora")
    expect(page.locator("#gen-setting-concepts")).to_be_visible()
    expect(page.locator("#gen-setting-overlap")).to_be_visible()
    expect(page.locator("#gen-concept-0")).to_be_visible()
    expect(page.locator("#gen-regions")).to_be_visible()
    page.screenshot(path=str(screenshots / "6-composer-settings.png"), full_page=True)
