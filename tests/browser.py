"""Debian's Chromium, headless, driven by selenium, for the dashboard's browser test and benchmark.

The browser resolves no name but loopback (``--host-resolver-rules``) and runs no background
service of its own (updates, sync, metrics): the only traffic it makes is to the page under test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver",)
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1650",
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-first-run",
         "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--no-pings")


def find(candidates: tuple[str, ...], name: str) -> str | None:
    return next((path for path in candidates if os.access(path, os.X_OK)), shutil.which(name))


def missing() -> str | None:
    """What is missing for a browser test, or None when Chromium and its driver are here."""
    if find(CHROMIUM, "chromium") is None:
        return "Chromium is not installed (Debian: apt-get install chromium chromium-driver)"
    if find(CHROMEDRIVER, "chromedriver") is None:
        return "ChromeDriver is not installed (Debian: apt-get install chromium-driver)"
    return None


def chromium():
    """A headless Chromium under selenium, with a profile folder of its own (removed on quit)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find(CHROMIUM, "chromium")
    profile = tempfile.mkdtemp(prefix="twinioc-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(find(CHROMEDRIVER, "chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    quit_ = driver.quit

    def quit_and_clean():
        try:
            quit_()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_clean
    return driver


# JavaScript run in the page: what a plotted graph shows (its full data: numpy arrays arrive base64-coded)
GRAPH_DATA = """
const graph = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
if (!graph || !graph._fullData) return null;
return graph._fullData.map(trace => ({name: trace.name, x: Array.from(trace.x || []), y: Array.from(trace.y || []),
                                       text: Array.isArray(trace.text) ? trace.text : []}));
"""
RESOURCES = "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href]);"


def graph_data(driver, id: str) -> list[dict] | None:
    return driver.execute_script(GRAPH_DATA, id)


def wait_for(condition, timeout: float, period: float = 0.05):
    """Poll *condition* until it returns something true; that value, or None after *timeout* s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(period)
    return None


def screenshot(driver, folder: Path | None, name: str) -> None:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(folder / f"{name}.png"))


def click_tab(driver, label: str, timeout: float = 20.0) -> None:
    """Click the tab *label*, once the page has drawn it."""
    from selenium.webdriver.common.by import By

    where = f"//div[contains(@class,'tab') and normalize-space()='{label}']"
    found = wait_for(lambda: driver.find_elements(By.XPATH, where), timeout)
    assert found, f"no tab {label!r} on the page"
    found[0].click()
