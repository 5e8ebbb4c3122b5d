"""Headless Chromium for driving and screenshotting HTML pages (Debian chromium + chromedriver, via selenium).

Nothing here goes online: the driver binary is given explicitly so selenium-manager never runs, and
Chromium's background networking, component updates and sync are switched off.

    with open_page("viewer.html") as driver:
        driver.execute_script("return window.viewerState")
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SKIP_REASON = f"headless Chromium not installed ({CHROMIUM}); apt-get install chromium chromium-driver"
CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",  # tests run as root in containers
    "--disable-gpu",
    "--disable-dev-shm-usage",  # /dev/shm is tiny in containers
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_available() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 1000):
    """A headless Chromium webdriver with a throwaway profile, closed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="diffxattn-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in CHROME_ARGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()


# Ready once loaded; pages that expose window.viewerState are ready when it says so.
READY_JS = "return document.readyState === 'complete' && (!window.viewerState || window.viewerState.ready)"


def load(driver, path: str | os.PathLike, *, ready_js: str = READY_JS, timeout: float = 10.0):
    """Open a local HTML file and wait until ``ready_js`` returns true."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(path).resolve().as_uri())
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(ready_js))
    return driver


@contextlib.contextmanager
def open_page(path: str | os.PathLike, **kwargs):
    """Launch Chromium, open ``path`` and wait until it is ready; yields the driver."""
    with chromium() as driver:
        yield load(driver, path, **kwargs)


def screenshot(path_html: str | os.PathLike, path_png: str | os.PathLike, *, width: int = 1280) -> Path:
    """Save a PNG of the whole page at ``path_html`` (the window grows to the page's height)."""
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    with chromium(width=width) as driver:
        load(driver, path_html)
        # The window includes (emulated) browser chrome: grow it until the viewport holds the page.
        for _ in range(3):
            page_h, view_h, outer_h = driver.execute_script(
                "return [document.documentElement.scrollHeight, window.innerHeight, window.outerHeight]")
            if view_h >= page_h:
                break
            driver.set_window_size(width, page_h + outer_h - view_h)
        driver.save_screenshot(str(path_png))
    return path_png
