"""One live cluster with its consoles, and one headless Chromium, for every console test.

Both are session-scoped and every test here is in the xdist group ``console``, so
``make test`` starts them once, on one worker. Chromium and its driver come from Debian's
packages (``apt-get install chromium chromium-driver``); when they are not installed the
browser tests are skipped with that reason, never silently.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.console import LiveConsole

pytestmark = pytest.mark.xdist_group("console")

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)


def _which(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name) or (
            f"/usr/lib/chromium/{name}" if Path(f"/usr/lib/chromium/{name}").exists() else None
        )
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveConsole]:
    host = LiveConsole(tmp_path_factory.mktemp("console")).start()
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    browser, driver = _which(CHROMIUM), _which(DRIVER)
    if browser is None or driver is None:
        pytest.skip(
            "browser tests need Debian's chromium and chromium-driver "
            f"(apt-get install chromium chromium-driver); missing: "
            f"{'chromium' if browser is None else 'chromedriver'}"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must download nothing
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield chrome
    finally:
        chrome.quit()
