"""Debian's Chromium, driven by Playwright (launched by path: browser downloads are impossible here)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from playwright.sync_api import Browser, sync_playwright

# What the environment doc says Chromium needs here: no sandbox as root, and no background calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    """The path of Debian's Chromium."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "the browser tests need Debian's chromium (apt-get install chromium; .ci/run installs it)"
    return found


@contextlib.contextmanager
def launched_chromium() -> Iterator[Browser]:
    """A headless Chromium for the block."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
