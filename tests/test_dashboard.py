"""The dashboard in a real browser (Debian's headless Chromium under selenium), served by a real
``twinioc web`` on the session's ideal MLS twin over real CA: the page loads, the orbit graph shows
what the BPMs read, a steerer put over CA moves the plotted orbit within 3 s (and as pyAT says it
should), a BBA started from the page ends in its result plot, the comparisons draw, and no request
leaves the service's own address.

Where Chromium is missing the test skips, except where ``TWINIOC_REQUIRE_BROWSER`` is set (CI and
``make test`` set it): there it fails. ``TWINIOC_SCREENSHOTS=folder`` keeps a screenshot of each view
(``make screenshots`` writes the README's).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import browser
import epics
import numpy as np
import pytest
from conftest import MLS_PREFIX
from twinioc.dashboard.views import default_parameters
from twinioc.studies.machine import MachineLayout
from web import WebProcess, epics_env, wait_done

SHOTS = Path(os.environ["TWINIOC_SCREENSHOTS"]) if os.environ.get("TWINIOC_SCREENSHOTS") else None
STEERER = "HS1P2K1RP"
STEP_A = 0.5
MLS = MachineLayout.load("mls", MLS_PREFIX)
BBA = default_parameters(MLS, "bba") | {"steps": 3}  # the form's default quadrupole, fewer points


@pytest.fixture(scope="module")
def driver():
    why = browser.missing()
    if why:
        if os.environ.get("TWINIOC_REQUIRE_BROWSER"):
            pytest.fail(f"the browser test must run here (TWINIOC_REQUIRE_BROWSER is set): {why}")
        pytest.skip(why)
    chromium = browser.chromium()
    yield chromium
    chromium.quit()


@pytest.fixture(scope="module")
def page(driver, mls_web):
    driver.get(mls_web.url)
    driver.execute_script("performance.setResourceTimingBufferSize(100000);")
    yield driver
    assert_only_local(driver, mls_web.url)


def assert_only_local(driver, url: str) -> None:
    """Every resource the page loaded came from the service itself (and the timings start again)."""
    loaded = driver.execute_script(browser.RESOURCES)
    foreign = [name for name in loaded if not name.startswith(url + "/") and name != url]
    assert not foreign, foreign
    driver.execute_script("performance.clearResourceTimings();")


def plotted(driver, id: str) -> dict[str, dict]:
    """The traces of graph *id* by name (several of one name: the first, per plane the rows' order)."""
    traces = browser.graph_data(driver, id) or []
    named: dict[str, list] = {}
    for trace in traces:
        named.setdefault(trace["name"], []).append(trace)
    return named


def plotted_orbit(driver) -> tuple[np.ndarray, np.ndarray] | None:
    """The plotted readings (x, y), put back into the tables' BPM order by each point's BPM name."""
    readings = plotted(driver, "orbit").get("BPM readings")
    if not readings or len(readings) != 2 or not len(readings[0]["y"]):
        return None
    where = {name: i for i, name in enumerate(readings[0]["text"])}
    order = [where[name] for name in MLS.orbit.bpms]
    return np.array(readings[0]["y"], float)[order], np.array(readings[1]["y"], float)[order]


def test_the_page_and_its_files_come_from_the_service(mls_web):
    """Over plain HTTP: the page at /, every file it names relative to the service (no CDN), and a
    path under /api that the API does not have stays a JSON 404 (the page does not swallow it)."""
    import re

    with mls_web.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        named = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert named and all(link.startswith("/") and not link.startswith("//") for link in named), named
        assert all(client.get(link).status_code == 200 for link in named if link.endswith(".js"))
        missing = client.get("/api/nothing-here")
        assert missing.status_code == 404 and "no such API path" in missing.json()["detail"]


def test_page_shows_the_live_machine(page, mls_web):
    """The orbit graph holds the readings and the twin's true orbit, equal to what CA serves; the
    tune diagram's working point is the twin's tune."""
    orbit = browser.wait_for(lambda: plotted_orbit(page), 30)
    assert orbit is not None, "the orbit graph shows no data"
    names = plotted(page, "orbit")
    assert "model (true orbit)" in names and len(names["BPM readings"][0]["y"]) == 28
    served = np.array(epics.caget(f"{MLS_PREFIX}ORBIT:X", timeout=5), float)
    assert np.allclose(browser.wait_for(lambda: plotted_orbit(page), 5)[0], served, atol=2e-4)
    point = plotted(page, "tunes")["working point"][0]
    tune_x = epics.caget(f"{MLS_PREFIX}TUNE:X", timeout=5)
    assert abs(point["x"][0] - tune_x) < 1e-3, (point, tune_x)
    assert browser.wait_for(lambda: plotted(page, "history").get("current (mA)"), 10)
    assert browser.wait_for(lambda: plotted(page, "beam-sizes").get("σx"), 10)


def test_a_steerer_put_moves_the_plotted_orbit(page, mls):
    """caput of a steerer: the plotted horizontal orbit changes within 3 s, by pyAT's response."""
    setpoint = MLS.converter(STEERER).setpoint
    before = browser.wait_for(lambda: plotted_orbit(page), 10)
    original = epics.caget(setpoint, timeout=5)
    try:
        assert epics.caput(setpoint, original + STEP_A, wait=True, timeout=5)
        put_at = time.monotonic()
        moved = browser.wait_for(lambda: (o := plotted_orbit(page)) is not None
                                 and np.max(np.abs(o[0] - before[0])) > 0.05 and o, 3.0, period=0.02)
        latency = time.monotonic() - put_at
        assert moved, "the plotted orbit did not change within 3 s of the put"
        time.sleep(1.0)  # the whole change, not its first publication
        change = plotted_orbit(page)[0] - before[0]
        expected = mls.orbit_response([STEERER])[:28, 0] * STEP_A * 1e3  # mm
        assert np.corrcoef(change, expected)[0, 1] > 0.99 and abs(np.ptp(change) / np.ptp(expected) - 1) < 0.05, \
            (change, expected)
        print(f"caput -> plotted orbit: {latency:.2f} s")
        browser.screenshot(page, SHOTS, "live")  # the orbit with the steerer's kick
    finally:
        epics.caput(setpoint, original, wait=True, timeout=5)


def test_a_beam_loss_shows_its_banner_with_the_reason(page):
    """The cavity voltage below the energy loss: the banner says the beam is lost and why; the voltage
    back, top-up fills again and the banner goes."""
    from selenium.webdriver.common.by import By

    browser.click_tab(page, "Live")
    voltage = MLS.converter("PAHRP").setpoint
    nominal = epics.caget(voltage, timeout=5)
    banner = lambda: page.find_element(By.ID, "beam-lost-banner")  # noqa: E731
    try:
        assert epics.caput(voltage, 5.0, wait=True, timeout=5)
        shown = browser.wait_for(lambda: banner().is_displayed() and banner().text, 5)
        reason = epics.caget(f"{MLS_PREFIX}BEAM:LOST:REASON", as_string=True, timeout=5)
        assert shown and "BEAM LOST" in shown and reason and reason in shown, (shown, reason)
        browser.screenshot(page, SHOTS, "beam-lost")
    finally:
        epics.caput(voltage, nominal, wait=True, timeout=5)
    assert browser.wait_for(lambda: not banner().is_displayed(), 10), banner().text


def choose(driver, dropdown: str, text: str) -> None:
    """Pick the option holding *text* in Dash's dropdown *dropdown*: open it, search, click."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, dropdown).click()
    search = browser.wait_for(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, "input.dash-dropdown-search")
                                       if e.is_displayed()], 5)
    assert search, f"{dropdown} does not open"
    search[0].send_keys(text)
    option = browser.wait_for(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, "[role=option]")
                                       if text in e.text and e.is_displayed()], 5)
    assert option, f"{dropdown} has no option {text}"
    option[0].click()


def test_a_bba_started_from_the_page_shows_its_result(page, mls_web):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.click_tab(page, "Measurements")
    form = browser.wait_for(lambda: page.find_elements(By.ID, "measurement-parameters"), 10)
    assert form, "no measurement form"
    form[0].send_keys(Keys.CONTROL, "a")
    form[0].send_keys(json.dumps(BBA))
    page.find_element(By.ID, "start-measurement").click()
    message = browser.wait_for(lambda: "queued" in (t := page.find_element(By.ID, "start-message").text) and t, 15)
    assert message, page.find_element(By.ID, "start-message").text
    id = message.split()[1]
    with mls_web.client() as client:
        record = wait_done(client, id, timeout=120)
    assert record["status"] == "done", record
    traces = browser.wait_for(lambda: (t := plotted(page, "result-plot")) and "fit x" in t and t, 10)
    assert traces and "response y" in traces, traces
    # the plotted zero crossing is the result's (the dotted line), and its fit line the record's
    shapes = page.execute_script("return document.querySelector('#result-plot .js-plotly-plot').layout.shapes"
                                 ".map(s => s.x0);")
    assert np.allclose(sorted(shapes), sorted(np.array(record["result"]["crossing_um"]) / 1e3), atol=1e-9)
    scan = record["raw"]["x"]
    fit = traces["fit x"][0]
    assert np.allclose(fit["y"], scan["fit_slope"] * np.array(fit["x"]) + scan["fit_intercept_mm"])
    time.sleep(0.5)
    browser.screenshot(page, SHOTS, "measurements")


def test_the_comparisons_draw(page, mls_web):
    from selenium.webdriver.common.by import By

    with mls_web.client() as client:  # two BBAs of one quadrupole, to compare
        first, second = (client.post("/api/measurements", json={"kind": "bba", **BBA, "planes": ["x"]}).json()["id"]
                         for _ in range(2))
        assert wait_done(client, second, timeout=120)["status"] == "done"
    browser.click_tab(page, "Compare")
    browser.wait_for(lambda: page.find_elements(By.ID, "state-name"), 10)
    assert browser.wait_for(lambda: plotted(page, "compare-orbit").get("now − model"), 10)
    page.find_element(By.ID, "state-name").send_keys("before")
    page.find_element(By.ID, "save-state").click()
    assert browser.wait_for(lambda: "saved before" in page.find_element(By.ID, "save-message").text, 10)
    page.find_element(By.XPATH, "//input[@value='saved']").click()
    shown = browser.wait_for(lambda: plotted(page, "compare-orbit").get("now − before"), 10)
    assert shown
    choose(page, "compare-a", first)
    choose(page, "compare-b", second)
    traces = browser.wait_for(lambda: (t := plotted(page, "compare-result")) and f"{second} fit x" in t and t, 15)
    assert traces and "fit x" in traces, traces
    time.sleep(0.5)
    browser.screenshot(page, SHOTS, "compare")


def test_with_a_token_the_page_works_and_its_form_needs_the_token(page, mls_web, tmp_path):
    """A service with a token: the page's own requests pass (its live views draw), but its form
    starts nothing without the token, and with it starts the measurement."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    assert_only_local(page, mls_web.url)  # what this module's service served, before leaving it
    with WebProcess("mls", epics_env(), tmp_path, MLS_PREFIX, "--token", "s3cret") as guarded:
        try:
            page.get(guarded.url)
            assert browser.wait_for(lambda: plotted_orbit(page), 30), "no orbit with a token"
            browser.click_tab(page, "Measurements")
            form = browser.wait_for(lambda: page.find_elements(By.ID, "measurement-parameters"), 10)
            form[0].send_keys(Keys.CONTROL, "a")
            form[0].send_keys(json.dumps(BBA | {"planes": ["x"]}))
            message = lambda: page.find_element(By.ID, "start-message").text  # noqa: E731
            page.find_element(By.ID, "start-measurement").click()
            assert browser.wait_for(lambda: "needs its token" in message(), 10), message()
            page.find_element(By.ID, "measurement-token").send_keys("s3cret")
            page.find_element(By.ID, "start-measurement").click()
            assert browser.wait_for(lambda: "queued" in message(), 10), message()
            with guarded.client() as client:
                assert wait_done(client, message().split()[1], timeout=120)["status"] == "done"
            assert_only_local(page, guarded.url)
        finally:
            page.get(mls_web.url)  # back to the module's service, which the page's teardown checks
