"""A real headless browser for the UI tests: Debian's chromium driven by Playwright, local servers
started on a free port, screenshots kept under test-artifacts/."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
PAGE_TIMEOUT_S = 60

# Playwright's own browser downloads cannot be fetched here: it drives the system chromium.
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")


def chromium_executable() -> str:
    """The system chromium's path ($CHROMIUM wins); fails the test, naming the install step, if
    there is none. Not a skip: CI must run the browser tests."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        if not os.access(explicit, os.X_OK):
            pytest.fail(f"$CHROMIUM={explicit} is not an executable file", pytrace=False)
        return explicit
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no chromium on PATH: run `make system-deps` (as root: apt-get install chromium), "
                "or point $CHROMIUM at a chromium binary", pytrace=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@contextlib.contextmanager
def served(command: Sequence[str], *, ready_url: str, log_path: Path, cwd: Path | None = None,
           env: dict[str, str] | None = None, timeout_s: float = 120) -> Iterator[subprocess.Popen]:
    """Runs `command` (a server) until the block ends, once `ready_url` answers 200.

    Yields the process. Its output goes to `log_path`. Raises RuntimeError, with the log's tail,
    if the server exits or does not answer within `timeout_s`. The server and every process it
    started (its own process group) are stopped when the block ends, however it ends.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(ready_url):
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode} before {ready_url} answered:\n"
                                   f"{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} did not answer within {timeout_s:.0f} s:\n{_log_tail(log_path)}")
            time.sleep(0.5)
        yield proc
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    # start_new_session made the server the leader of its own group: its workers go with it.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived their leader
    proc.wait()


@contextlib.contextmanager
def browser_page(*, init_script: str | None = None, width: int = 1600, height: int = 1000) -> Iterator:
    """A Playwright page in headless system chromium, closed when the block ends.

    `init_script` runs in every document before the page's own scripts (e.g. to preset
    localStorage). Every wait on the page defaults to PAGE_TIMEOUT_S.
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--headless=new", "--disable-dev-shm-usage"])
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.set_default_timeout(PAGE_TIMEOUT_S * 1000)
            if init_script:
                context.add_init_script(init_script)
            yield context.new_page()
        finally:
            browser.close()


def screenshot_path(group: str, name: str) -> Path:
    """test-artifacts/<group>/<name>.png, its folder created."""
    path = ARTIFACTS_DIR / group / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def screenshot_after(page, group: str, name: str) -> Iterator[Path]:
    """Screenshots `page` when the block ends, also when a check in it failed (then the picture
    shows what the browser had instead). Yields the screenshot's path."""
    path = screenshot_path(group, name)
    try:
        yield path
    finally:
        page.screenshot(path=str(path))


def wait_visible(locator) -> None:
    """Waits until `locator` matches a visible element; AssertionError after PAGE_TIMEOUT_S."""
    from playwright.sync_api import expect

    expect(locator.first).to_be_visible(timeout=PAGE_TIMEOUT_S * 1000)


def open_page(page, url: str, *texts: str) -> None:
    """Goes to `url` and waits until each of `texts` is visible (exact, whitespace-normalised
    text of some element). Raises AssertionError naming the missing text after PAGE_TIMEOUT_S.
    The page is loaded afresh: going to another hash route of a single-page app keeps the last
    route's elements until it re-renders, and a text found there would prove nothing."""
    page.goto("about:blank")
    page.goto(url)
    for text in texts:
        wait_visible(page.get_by_text(text, exact=True))
