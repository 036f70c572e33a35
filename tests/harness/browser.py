"""The real ComfyUI frontend in Debian's headless Chromium, driven by Playwright (never `playwright install`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]


def close_overlays(pg, wait_s: float = 15):
    """A fresh profile opens the Templates dialog over the canvas (Escape does not close it: its
    close button does), and a 'Nodes 2.0' banner across the top."""
    try:
        pg.wait_for_selector(".p-dialog", timeout=wait_s * 1000)
    except Exception:
        pass
    for _ in range(5):
        if not pg.locator(".p-dialog").count():
            break
        close = pg.locator(".p-dialog button:has(i.pi-times):visible")
        if close.count():
            close.last.click()
        else:
            pg.keyboard.press("Escape")
        time.sleep(0.4)
    assert not pg.locator(".p-dialog").count(), "a dialog over the canvas did not close"
    pg.evaluate("""() => { for (const b of document.querySelectorAll('button')) {
        const r = b.getBoundingClientRect();
        if (r.top < 40 && r.height > 0 && b.querySelector("i[class*='lucide--x']")) b.click(); } }""")


@contextlib.contextmanager
def comfy_page(url: str, console_filter=None):
    """A page with the app loaded and overlays closed; page errors collect in `page.errors`."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="quantlora-chromium-")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                       viewport={"width": 1400, "height": 860})
            pg = ctx.new_page()
            pg.errors = []
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            if console_filter:
                pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" and console_filter(m.text) else None)
            pg.goto(url, wait_until="domcontentloaded")
            pg.wait_for_function("() => window.app && window.app.graph && document.querySelector('canvas')",
                                 timeout=60_000)
            close_overlays(pg)
            yield pg
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
