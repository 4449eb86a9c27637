"""The dashboard in headless Chromium: it loads, its charts draw, and its numbers follow real traffic."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from selenium.webdriver.common.by import By
from vitcache.client import Video, VitCacheClient

from vitcache.config import VitcacheConfig

from .browser import find_chromium, start_chromium
from .conftest import png_bytes
from .test_video import clip_frames, encode_clip

CHARTS = ("chart-hit-ratio", "chart-throughput", "chart-latency", "chart-stages", "chart-l1", "chart-batch")
L1_HIT_RATIO_RGB = (0x0E, 0x9F, 0x6E)  # the "L1" series colour in dashboard.js (drawn over "overall")
VIDEOS_RGB = (0x7C, 0x3A, 0xED)  # the video series' colour in dashboard.js


@pytest.fixture
def browser(tmp_path):  # type: ignore[no-untyped-def]
    found = find_chromium()
    if isinstance(found, str):
        pytest.skip(found)
    driver = start_chromium(tmp_path / "chromium-profile")
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 20.0) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def pixels_near(driver, chart_id: str, rgb: tuple[int, int, int], tolerance: int = 40) -> int:  # type: ignore[no-untyped-def]
    """How many pixels of the chart's canvas are within ``tolerance`` of ``rgb`` (and opaque)."""
    return driver.execute_script(
        """
        const [id, r, g, b, tol] = arguments;
        const canvas = document.querySelector(`#${id} canvas`);
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < data.length; i += 4) {
          const distance = Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b);
          if (data[i + 3] > 200 && distance < tol) n++;
        }
        return n;
        """,
        chart_id,
        *rgb,
        tolerance,
    )


@pytest.fixture
def dashboard_server(start_server_thread, encoder, redis_server) -> Iterator:  # type: ignore[no-untyped-def]
    yield start_server_thread(VitcacheConfig.of(redis_url=redis_server.url, metrics_port=0), encoder)


def test_dashboard_loads_draws_and_follows_traffic(browser, dashboard_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = dashboard_server.running.metrics_port
    browser.get(f"http://127.0.0.1:{port}/?interval=250&window=30")
    wait_for(lambda: int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-polls")) >= 2, "two polls")

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    assert text("tile-images-total").startswith("0 total")
    assert text("tile-hit-ratio") == "-"  # nothing answered yet
    assert text("tile-redis") == "connected"
    for chart in CHARTS:
        size = browser.execute_script(
            "const c = document.querySelector(`#${arguments[0]} canvas`); return c && [c.width, c.height];", chart
        )
        assert size and size[0] > 200 and size[1] > 100, chart
    assert pixels_near(browser, "chart-hit-ratio", L1_HIT_RATIO_RGB) == 0  # no data, no line

    images = [png_bytes(56, 56, 100 + i) for i in range(4)]
    with VitCacheClient(dashboard_server.target) as client:
        client.encode(images)  # 4 computed (after 4 hash-first NOT_FOUND)
        client.encode(images)  # 4 from L1
    wait_for(lambda: text("tile-hit-ratio") == "50.0 %", "the hit ratio tile to show 4 of 8 from L1")
    assert text("tile-hit-tiers") == "L1 50.0 % · L2 0.0 %"
    # 4 computed + 4 L1; the 4 hash-first NOT_FOUND rounds are lookups, neither images nor errors.
    assert text("tile-images-total").startswith("8 total") and text("tile-images-total").endswith("4 digests not found")
    assert text("tile-requests-total") == "3 total"
    assert text("tile-p99").endswith(" ms") and text("tile-p99") != "-"
    assert text("tile-l1-fill").endswith(" %") and "4 entries" in text("tile-l1-detail")
    assert "NOT_FOUND" not in text("table-errors") and "none" in text("table-errors")
    assert "forward" in text("table-latency")
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    wait_for(lambda: pixels_near(browser, "chart-hit-ratio", L1_HIT_RATIO_RGB) > 20, "the L1 hit ratio line")
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe


def test_dashboard_token_from_fragment_or_form(browser, start_server_thread, encoder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With tokens on, the page gets one from /#token=... (which leaves the address bar) or asks for it."""
    (tmp_path / "tokens").write_text("alice-token alice\n")
    (tmp_path / "metrics-tokens").write_text("scrape-token\n")
    server = start_server_thread(
        VitcacheConfig.of(
            auth_token_file=str(tmp_path / "tokens"),
            metrics_token_file=str(tmp_path / "metrics-tokens"),
            metrics_port=0,
        ),
        encoder,
    )
    base = f"http://127.0.0.1:{server.running.metrics_port}/?interval=250"

    def polls() -> int:
        return int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-polls"))

    def status() -> str:
        return browser.find_element(By.ID, "status").text

    browser.get(base + "#token=scrape-token")
    wait_for(lambda: polls() >= 2, "two polls with the fragment's token")
    assert browser.execute_script("return location.hash") == ""  # the token left the address bar
    assert not browser.find_element(By.ID, "token-form").is_displayed()

    browser.execute_script("sessionStorage.clear()")
    browser.get(base)
    form = wait_for(lambda: browser.find_element(By.ID, "token-form").is_displayed(), "the token form")
    assert form and polls() == 0 and "wants a metrics token" in status()
    token_input = browser.find_element(By.ID, "token-input")
    token_input.send_keys("alice-token\n")  # a tenant's token sees no server-wide numbers
    wait_for(lambda: "bound to a tenant" in status(), "the refusal of a tenant's token")
    assert polls() == 0
    token_input.send_keys("scrape-token\n")
    wait_for(lambda: polls() >= 1, "a poll with the typed token")
    wait_for(lambda: not browser.find_element(By.ID, "token-form").is_displayed(), "the form to hide")
    assert encoder.family in browser.find_element(By.ID, "model").text


def test_dashboard_shows_videos_once_there_are_some(browser, dashboard_server) -> None:  # type: ignore[no-untyped-def]
    """An image-only server's page has no video series or line; after a clip (computed, then from L1) the
    tile counts it and the video rate and hit ratio are drawn."""
    port = dashboard_server.running.metrics_port
    browser.get(f"http://127.0.0.1:{port}/?interval=250&window=30")

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def shown(chart: str) -> list[bool]:
        return browser.execute_script("return plots[arguments[0]].series.slice(1).map((s) => s.show)", chart)

    with VitCacheClient(dashboard_server.target) as client:
        client.encode([png_bytes(56, 56, 200), png_bytes(56, 84, 201)])
    wait_for(lambda: text("tile-images-total").startswith("2 total"), "two images counted")
    assert text("tile-videos") == "" and shown("chart-throughput") == [True, True, False, True, True]
    assert shown("chart-hit-ratio") == [True, True, True, False]

    clip = Video(encode_clip(clip_frames(6, 56, 56)))
    with VitCacheClient(dashboard_server.target) as client:
        client.encode([clip])[0].raise_for_error()
        client.encode([clip])[0].raise_for_error()
    wait_for(lambda: text("tile-videos").startswith("of them 2 videos · hit ratio 50.0 %"), "the video tile")
    assert text("tile-images-total").startswith("4 total") and all(shown("chart-throughput"))
    wait_for(lambda: pixels_near(browser, "chart-throughput", VIDEOS_RGB) > 20, "the videos/s line")
    wait_for(lambda: pixels_near(browser, "chart-hit-ratio", VIDEOS_RGB) > 20, "the video hit ratio line")
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe
