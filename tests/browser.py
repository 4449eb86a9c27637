"""Headless Chromium through Selenium and Debian's chromedriver, for the dashboard tests and screenshot.

``scripts/test.sh`` installs ``chromium`` and ``chromium-driver`` when they are missing and it runs
as root; elsewhere :func:`find_chromium` says what is missing, and the tests skip with that reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from selenium import webdriver

# No sandbox (root in a container), no GPU, and nothing that reaches the network on its own.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def find_chromium() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or why they cannot be had."""
    browser = os.environ.get("VITCACHE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("VITCACHE_CHROMEDRIVER") or shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path)
    return f"{missing} not installed (scripts/test.sh installs Debian's chromium and chromium-driver as root)"


def start_chromium(profile_dir: Path, width: int = 1400, height: int = 1000) -> webdriver.Chrome:
    """A headless Chromium with a fresh profile in ``profile_dir``; the browser console is kept for get_log."""
    found = find_chromium()
    if isinstance(found, str):
        raise RuntimeError(found)
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
