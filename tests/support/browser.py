"""Headless Chromium driven by Selenium, for the customer pages as a buyer's browser shows them.

Debian's ``chromium`` and ``chromium-driver`` packages (``make test`` and ``.ci/run``
install them); the driver is named explicitly, so Selenium Manager never downloads
anything. :func:`why_no_browser` says why a browser cannot run here (the tests skip
with that reason, unless ``REQUIRE_BROWSER`` is set: then they fail).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

os.environ.setdefault("SE_OFFLINE", "true")
os.environ.setdefault("SE_AVOID_STATS", "true")

CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"

DESKTOP = (1280, 800)
PHONE = (375, 740)


def why_no_browser() -> str | None:
    """None when a browser can be started, else the reason in one line."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not CHROMIUM or not os.access(CHROMIUM, os.X_OK):
        return f"chromium is not installed ({INSTALL})"
    if not CHROMEDRIVER or not os.access(CHROMEDRIVER, os.X_OK):
        return f"chromedriver is not installed ({INSTALL})"
    try:
        subprocess.run([CHROMEDRIVER, "--version"], capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        return f"chromedriver does not run: {err}"
    return None


def start_browser(profile: Path) -> Any:
    """A headless Chromium (root-safe flags) with its own profile directory."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-color-profile=srgb",
        f"--user-data-dir={profile}",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def viewport(driver: Any, width: int, height: int, *, phone: bool = False) -> None:
    """An exact viewport (a window narrower than 500 px cannot be asked for by flag)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": phone},
    )


def settle(driver: Any, width: int) -> None:
    """Wait (2 s at most) until the page is laid out at ``width``: two animation frames after
    the viewport reports it."""
    driver.execute_async_script(
        """
        const [width, done] = arguments;
        const started = performance.now();
        (function check() {
            if (window.innerWidth === width || performance.now() - started > 2000) {
                requestAnimationFrame(() => requestAnimationFrame(() => done(window.innerWidth)));
            } else {
                setTimeout(check, 20);
            }
        })();
        """,
        width,
    )


def reset_viewport(driver: Any) -> None:
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def overflow(driver: Any) -> int:
    """How many CSS pixels the page is wider than its viewport (0: no sideways scrolling)."""
    return int(driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth"))


def full_page_png(driver: Any, path: Path) -> None:
    """The whole page, not just the viewport, as a PNG."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def screenshots(driver: Any, folder: Path, name: str) -> list[Path]:
    """The page now open, at 1280 px and at 375 px wide (a phone): ``<name>-desktop.png`` and
    ``<name>-phone.png``. Each width must fit without sideways scrolling."""
    made = []
    for suffix, (width, height), phone in (("desktop", DESKTOP, False), ("phone", PHONE, True)):
        viewport(driver, width, height, phone=phone)
        try:
            settle(driver, width)
            assert overflow(driver) <= 0, f"{name} scrolls sideways at {width} px"
            path = folder / f"{name}-{suffix}.png"
            full_page_png(driver, path)
            made.append(path)
        finally:
            reset_viewport(driver)
    return made
