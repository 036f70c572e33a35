"""The real ComfyUI frontend in Debian's headless Chromium, driven by Playwright (never `playwright install`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

import pytest

from .server import PACK_DIR_NAME

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]


# A modal dialog: reka-ui's role=dialog in frontend 1.48 (ComfyUI v0.33: Templates, settings, missing
# models...), PrimeVue's .p-dialog in the older frontends (1.32, ComfyUI 0.3.75).
DIALOG = "[role=dialog], .p-dialog"
DIALOG_CLOSE = ("[role=dialog] button[aria-label='Close dialog']:visible, "
                ".p-dialog button:has(i.pi-times):visible")


def open_dialogs(pg) -> int:
    return pg.locator(DIALOG).count()


def close_overlays(pg, wait_s: float = 15):
    """A fresh user (the server keeps settings per user: a fresh base directory) gets the Templates
    dialog over the canvas once the app is up (about 1 s later; Escape does not close it in every
    version: its close button does). Older frontends also put a 'Nodes 2.0' banner across the top."""
    try:
        pg.wait_for_selector(DIALOG, timeout=wait_s * 1000)
    except Exception:
        pass
    for _ in range(5):
        if not open_dialogs(pg):
            break
        close = pg.locator(DIALOG_CLOSE)
        if close.count():
            close.last.click()
        else:
            pg.keyboard.press("Escape")
        time.sleep(0.4)
    assert not open_dialogs(pg), "a dialog over the canvas did not close: " + pg.locator(DIALOG).first.inner_text()[:300]
    pg.evaluate("""() => { for (const b of document.querySelectorAll('button')) {
        const r = b.getBoundingClientRect();
        if (r.top < 40 && r.height > 0 && b.querySelector("i[class*='lucide--x']")) b.click(); } }""")


def _server_setting(url: str, key: str):
    """A user setting as the server stores it (GET /api/settings/<key>), None when unknown."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/api/settings/{key}", timeout=10) as r:
            return json.loads(r.read() or b"null")
    except Exception:  # noqa: BLE001 - only a hint for how long to wait
        return None


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
                # console errors the filter picks, and every console error raised from the pack's own
                # web files (served under /extensions/<pack folder>/)
                def on_console(m):
                    if m.type == "error" and (console_filter(m.text)
                                              or f"/extensions/{PACK_DIR_NAME}/" in (m.location or {}).get("url", "")):
                        pg.errors.append(m.text)

                pg.on("console", on_console)
            # The Templates dialog opens for a user who has not seen it yet (a server-side setting):
            # wait for it only then, briefly otherwise.
            seen = _server_setting(url, "Comfy.TutorialCompleted") is True
            pg.goto(url, wait_until="domcontentloaded")
            pg.wait_for_function("() => window.app && window.app.graph && document.querySelector('canvas')",
                                 timeout=60_000)
            close_overlays(pg, wait_s=3 if seen else 15)
            yield pg
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
