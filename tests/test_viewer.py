"""The HTML heatmap viewer: one self-contained file, escaped untrusted prompt, interactive in Chromium."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffxattn.browser import chromium, chromium_available, load, screenshot, SKIP_REASON
from diffxattn.viewer import write_viewer

WORDS = ["a", "red", "circle", "left", "of", "a", "blue", "square"]
MALICIOUS = 'a <script>alert(1)</script> "quote" & ../etc <img src=x onerror="window.__pwned=1"> </script><script>window.__pwned=1</script>'
MALICIOUS_WORDS = MALICIOUS.split(" ")


def two_blobs() -> Image.Image:
    """32x32: a red disc on the left, a blue square on the right."""
    image = Image.new("RGB", (32, 32), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse([3, 10, 15, 22], fill=(220, 40, 40))
    draw.rectangle([19, 11, 28, 20], fill=(40, 70, 220))
    return image


def blob_maps(n_bins: int = 4, side: int = 16) -> np.ndarray:
    """(S, W, side, side): "red"/"circle" peak on the left blob, "blue"/"square" on the right one,
    the rest is diffuse; blobs sharpen and the object words gain share over the bins."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(0)
    maps = np.empty((n_bins, len(WORDS), side, side))
    for s in range(n_bins):
        sigma = 0.3 - 0.06 * s
        left = np.exp(-((xx - 0.28) ** 2 + (yy - 0.5) ** 2) / (2 * sigma**2))
        right = np.exp(-((xx - 0.75) ** 2 + (yy - 0.5) ** 2) / (2 * sigma**2))
        for w in range(len(WORDS)):
            maps[s, w] = 0.2 + 0.1 * rng.random((side, side))
        maps[s, 1] += (1 + s) * left
        maps[s, 2] += (1 + 0.5 * s) * left
        maps[s, 6] += (1 + s) * right
        maps[s, 7] += (1 + 0.5 * s) * right
    return maps


def data_block(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


@pytest.fixture
def viewer_html(tmp_path):
    maps = blob_maps()
    layer_maps = maps.sum(0)[None].repeat(3, 0) * np.array([0.2, 1.0, 0.5])[:, None, None, None]
    layer_maps[0, :, :, :8] += 2.0  # layer 0 attends to the left half for every word
    return write_viewer(tmp_path / "viewer.html", prompt="a red circle left of a blue square",
                        image=two_blobs(), words=WORDS, maps=maps, steps=[0, 10, 20, 30],
                        layers=["down.0", "mid", "up.1"], layer_maps=layer_maps)


@pytest.fixture
def malicious_html(tmp_path):
    maps = np.random.default_rng(1).random((2, len(MALICIOUS_WORDS), 8, 8))
    return write_viewer(tmp_path / "evil.html", prompt=MALICIOUS, image=two_blobs(), words=MALICIOUS_WORDS,
                        maps=maps, title=MALICIOUS)


def test_page_is_one_file_with_no_network_references(viewer_html):
    page = viewer_html.read_text(encoding="utf-8")
    assert "default-src 'none'" in page
    outside_csp = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    for needle in ("http://", "https://", 'src="//', "<link"):
        assert needle not in outside_csp
    assert re.search(r'<img id="raw" [^>]*src="data:image/png;base64,', page)


def test_data_block_round_trips_words_and_maps(viewer_html):
    data = data_block(viewer_html.read_text(encoding="utf-8"))
    assert data["words"] == WORDS
    assert data["steps"] == [0, 10, 20, 30]
    assert data["layers"] == ["down.0", "mid", "up.1"]
    np.testing.assert_allclose(np.array(data["maps"]), blob_maps(), atol=5e-5)
    assert np.array(data["layer_maps"]).shape == (3, len(WORDS), 16, 16)


def test_malicious_prompt_is_escaped_in_data_and_title(malicious_html):
    page = malicious_html.read_text(encoding="utf-8")
    assert "<script>alert" not in page and "<script>window.__pwned" not in page
    assert "<img src=x" not in page
    assert page.count("</script>") == 2  # the data block and the viewer's own script
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in page
    assert "\\u0026" in page
    assert "<title>a &lt;script&gt;alert(1)&lt;/script&gt; &quot;quote&quot; &amp;" in page
    data = data_block(page)
    assert data["prompt"] == MALICIOUS and data["words"] == MALICIOUS_WORDS


def test_line_separators_are_escaped(tmp_path):
    path = write_viewer(tmp_path / "v.html", prompt="a\u2028b\u2029", image=two_blobs(), words=["a\u2028b"],
                        maps=np.ones((1, 1, 4, 4)))
    page = path.read_text(encoding="utf-8")
    assert "\u2028" not in page and "\u2029" not in page
    assert data_block(page)["prompt"] == "a\u2028b\u2029"


def test_rejects_maps_that_do_not_match_the_words(tmp_path):
    with pytest.raises(ValueError, match="3 word maps but there are 8 words"):
        write_viewer(tmp_path / "v.html", prompt="x", image=two_blobs(), words=WORDS, maps=np.ones((1, 3, 4, 4)))


# --- in headless Chromium ------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(not chromium_available(), reason=SKIP_REASON)


@pytest.fixture(scope="module")
def driver():
    pytest.importorskip("selenium", reason="selenium not installed (pip install -e .[test])")
    with chromium() as d:
        yield d


def overlay_pixels(driver) -> str:
    return driver.execute_script("return document.getElementById('overlay').toDataURL()")


def state(driver) -> dict:
    return driver.execute_script("return window.viewerState")


@needs_chromium
def test_clicking_a_word_chip_selects_it_and_changes_the_overlay(driver, viewer_html):
    load(driver, viewer_html)
    chips = driver.find_elements("css selector", "#words .chip")
    chips[6].click()  # "blue": right blob
    before = overlay_pixels(driver)
    chips[2].click()  # "circle": left blob
    assert state(driver)["word"] == 2
    assert driver.find_element("id", "overlay").get_attribute("data-word") == "2"
    assert "selected" in chips[2].get_attribute("class").split()
    assert overlay_pixels(driver) != before


@needs_chromium
def test_overlay_is_hottest_on_the_selected_words_blob(driver, viewer_html):
    load(driver, viewer_html)
    pixel = "return Array.from(document.getElementById('overlay').getContext('2d').getImageData(arguments[0], 192, 1, 1).data)"
    driver.find_elements("css selector", "#words .chip")[1].click()  # "red"
    left, right = driver.execute_script(pixel, 108), driver.execute_script(pixel, 290)
    # turbo: hot = red-ish, cold = blue-ish; the image under both points is a saturated blob
    assert left[0] - left[2] > right[0] - right[2] + 50


@needs_chromium
def test_opacity_slider_changes_overlay_pixels(driver, viewer_html):
    load(driver, viewer_html)
    before = overlay_pixels(driver)
    driver.find_element("id", "opacity").send_keys("\ue011")  # Keys.HOME: opacity 0
    assert state(driver)["opacity"] == 0
    assert overlay_pixels(driver) != before
    raw = driver.execute_script(  # at opacity 0 the overlay is just the image
        "const c = document.getElementById('overlay'); return Array.from(c.getContext('2d')"
        ".getImageData(108, 192, 1, 1).data)")
    assert raw[:3] == [220, 40, 40]


@needs_chromium
def test_step_slider_changes_the_shown_map(driver, viewer_html):
    load(driver, viewer_html)
    assert state(driver)["step"] == 3  # default: all steps summed
    all_steps = overlay_pixels(driver)
    slider = driver.find_element("id", "step")
    slider.send_keys("\ue011")  # Keys.HOME
    assert state(driver)["step"] == 0
    first_bin = overlay_pixels(driver)
    assert first_bin != all_steps
    slider.send_keys("\ue014")  # Keys.RIGHT: bins 0..1 summed
    cumulative = overlay_pixels(driver)
    driver.find_element("id", "cumulative").click()  # bin 1 alone
    assert overlay_pixels(driver) not in (cumulative, first_bin)
    assert "step 10" in driver.find_element("id", "caption").text


@needs_chromium
def test_layer_toggle_slides_over_layers(driver, viewer_html):
    load(driver, viewer_html)
    steps_view = overlay_pixels(driver)
    driver.find_element("css selector", "input[name=mode][value=layers]").click()
    assert state(driver)["mode"] == "layers"
    assert driver.find_element("id", "step").get_attribute("max") == "2"
    assert overlay_pixels(driver) != steps_view
    driver.find_element("id", "step").send_keys("\ue011")
    assert "down.0" in driver.find_element("id", "caption").text


@needs_chromium
def test_chart_plots_each_words_share_and_highlights_the_selection(driver, viewer_html):
    load(driver, viewer_html)
    maps = blob_maps()
    totals = maps.sum(axis=(2, 3))  # (S, W)
    expected = (totals / totals.sum(1, keepdims=True)).T  # (W, S)
    np.testing.assert_allclose(driver.execute_script("return shares"), expected, atol=1e-3)
    lines = driver.find_elements("css selector", "#chart polyline")
    assert len(lines) == len(WORDS)
    driver.find_elements("css selector", "#legend span")[7].click()
    selected = driver.find_elements("css selector", "#chart polyline.selected")
    assert [e.get_attribute("data-word") for e in selected] == ["7"]


@needs_chromium
def test_malicious_prompt_runs_no_script_and_shows_literal_words(driver, malicious_html):
    load(driver, malicious_html)
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    chips = driver.execute_script(
        "return Array.from(document.querySelectorAll('#words .chip'), e => e.textContent)")
    assert chips == MALICIOUS_WORDS
    assert driver.execute_script("return document.getElementById('prompt').textContent") == MALICIOUS
    assert driver.title == MALICIOUS
    assert driver.execute_script("return document.querySelectorAll('img').length") == 1
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0


@needs_chromium
def test_screenshot_writes_a_png_of_the_page(viewer_html, tmp_path):
    pytest.importorskip("selenium")
    png = screenshot(viewer_html, tmp_path / "viewer.png")
    with Image.open(png) as shot:
        assert shot.width == 1280 and shot.height > 600
