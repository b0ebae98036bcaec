"""Opening a report.html in Debian's headless Chromium (driven by Playwright): it renders,
logs no console error, every image decodes, and each named section is there and visible.

CI installs Chromium (`.ci/run`); elsewhere the check is skipped with the reason, never
passed silently.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# the flags a closed network needs (no background fetches), root needs (no sandbox)
_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    if Path(CHROMIUM).is_file():
        return
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)")


def check_report(report: Path, sections: Sequence[str], *, absent: Sequence[str] = ()) -> str:
    """Open ``report`` and check it; returns the page's visible text."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=_ARGS)
        try:
            page = browser.new_page()
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning")
                    else None
                ),
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(report.resolve().as_uri(), wait_until="load")
            assert page.title().startswith("fedpriv report"), page.title()
            for section in sections:
                element = page.query_selector(f"#{section}")
                assert element is not None, f"section #{section} is missing from {report}"
                assert element.is_visible(), f"section #{section} is not visible"
            for section in absent:
                assert page.query_selector(f"#{section}") is None, f"#{section} should be absent"
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                ".map(i => i.alt)"
            )
            assert broken == [], f"images that did not decode: {broken}"
            text = str(page.inner_text("body"))
        finally:
            browser.close()
    assert problems == [], problems
    return text
