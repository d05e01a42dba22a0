"""Headless Chromium (through Selenium) for checking and screenshotting HTML reports.

Needs the `selenium` package and Debian's `chromium` and `chromium-driver` (`make test` installs them
where it can). Used by the report test and by `docs/` screenshots, never by the main job itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import LayerlabError


def headless_chromium(width: int = 1200, height: int = 2000):
    """A Selenium driver for the system's Chromium, or a LayerlabError saying what to install."""
    try:
        from selenium import webdriver
    except ImportError:
        raise LayerlabError("selenium is not installed: pip install selenium") from None
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        raise LayerlabError("headless Chromium is missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.binary_location = binary
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def inspect_report(html: str | Path, screenshot: str | Path | None = None, width: int = 1200) -> dict:
    """Open `html`: which images loaded, how many table rows it shows; optionally save a full-page PNG."""
    driver = headless_chromium(width)
    try:
        driver.get(Path(html).resolve().as_uri())
        images = driver.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        rows = driver.execute_script("return document.querySelectorAll('table tbody tr').length")
        if screenshot is not None:
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(width, height)
            driver.save_screenshot(str(screenshot))
        return {"images": images, "table_rows": rows}
    finally:
        driver.quit()


if __name__ == "__main__":  # python -m layerlab.analysis.browser REPORT.html SCREENSHOT.png
    import sys

    print(inspect_report(sys.argv[1], sys.argv[2]))
