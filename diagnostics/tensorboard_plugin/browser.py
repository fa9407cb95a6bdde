"""TensorBoard and headless Chromium for the dashboard's browser test and benchmark.

    with serve_tensorboard(logdir) as url, chromium() as driver:
        frame = open_depth_tab(driver, url)        # the Depth tab's iframe, its three views drawn

`serve_tensorboard` runs the `tensorboard` command a user runs (`python -m tensorboard.main`, plugins
found through their entry points) on a free loopback port and waits until the Depth plugin reports
data. `chromium` drives Debian's Chromium through its ChromeDriver (packages chromium and
chromium-driver, `make browser`) with Selenium; as root and offline it needs the flags below and a
fresh profile. Nothing is fetched from outside the machine: TensorBoard serves its frontend itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diagnostics.tensorboard_plugin.metadata import PLUGIN_NAME

CHROMIUM = os.environ.get("DEPTHLAB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DEPTHLAB_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1")
VIEWS = ("heatmap", "profile", "timeline")


class BrowserUnavailable(RuntimeError):
    """Chromium, its driver or Selenium is missing (install: `make browser`)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        return json.loads(response.read())


@contextlib.contextmanager
def serve_tensorboard(logdir: str | Path, *, timeout: float = 60.0, extra_args: tuple[str, ...] = (),
                      wait_for_depth: bool = True) -> Iterator[str]:
    """`tensorboard --logdir LOGDIR` on 127.0.0.1; yields its URL once the Depth plugin is active (or, without
    `wait_for_depth`, once TensorBoard answers)."""
    port = free_port()
    log = tempfile.TemporaryFile()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port), "--reload_interval", "1", *extra_args]
    env = {**os.environ, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"tensorboard exited with {proc.returncode}:\n{log.read().decode()[-3000:]}")
            try:
                listing = get_json(f"{url}/data/plugins_listing")
                if PLUGIN_NAME not in listing:
                    raise RuntimeError("TensorBoard has no Depth plugin: its entry point is not installed "
                                       "(setup.cfg [options.entry_points] tensorboard_plugins; pip install -e .)")
                if listing[PLUGIN_NAME]["enabled"] or not wait_for_depth:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"TensorBoard at {url} showed no depth data within {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium (Selenium WebDriver) with a fresh profile, closed on exit."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        raise BrowserUnavailable("Selenium is not installed (pip install -e '.[dev]')") from error
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            raise BrowserUnavailable(f"{path} not found: install Debian's chromium and chromium-driver (make browser)")
    profile = tempfile.mkdtemp(prefix="depthlab-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def depth_frame(driver: Any, timeout: float = 30.0) -> Any:
    """The iframe TensorBoard shows the Depth plugin in (the top document must be current)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "iframe[src*='plugin_entry.html']")))


def wait_for_views(driver: Any, timeout: float = 30.0) -> dict[str, float]:
    """Inside the Depth iframe: wait until the three views are drawn; their times (ms since the iframe's start)."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = "return document.body && ['heatmapDrawn','profileDrawn','timelineDrawn']" \
             ".every(k => k in document.body.dataset) ? window.depthDashboard : null"
    state = WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))
    return state


def open_depth_tab(driver: Any, url: str, timeout: float = 60.0) -> Any:
    """Load TensorBoard on the Depth tab and switch into its iframe once the views are drawn."""
    driver.get(f"{url}/#{PLUGIN_NAME}")
    frame = depth_frame(driver, timeout)
    driver.switch_to.frame(frame)
    wait_for_views(driver, timeout)
    return frame
