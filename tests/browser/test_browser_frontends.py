"""Layer 4 on both frontends: v0.33's (1.48, the session server) and ComfyUI 0.3.75 with its pinned
frontend 1.32.9 (a second server, started once for this module; tests/browser/frontends.py).

Checked on each, as a user sees it:
- the per-node VRAM badge is drawn by both node renderers: the LiteGraph canvas (pixels of the badge's
  colour above the node in a screenshot) and "Nodes 2.0", the Vue renderer (the badge's text in the
  node's DOM); it survives a re-run where everything is cached (execution_start), and a record without
  a GPU gives no badge;
- the VRAM widget covers none of the frontend's own UI (side toolbar, an open sidebar, the Logs panel,
  the action bar, zoom controls, minimap, a toast) at 1400x900 and 1920x1080, follows the canvas
  panel when the Logs panel opens, can be dragged and remembers its place;
- the Templates dialog shows the pack's examples with their titles, descriptions and thumbnails.
The badge records are sent to the page as the server would send them (the quantlora.vram.node event):
this CPU machine has no GPU figures to show (tests/browser/test_browser_vram.py runs the real events)."""
import io
import json
import os
import tempfile
import time

import pytest

from frontends import OldComfyServer, old_frontend_root
from harness.browser import DIALOG, comfy_page
from harness.server import PACK_DIR_NAME

pytestmark = [pytest.mark.server, pytest.mark.browser, pytest.mark.no_demo_models]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = "flux-nf4-lora"
BADGE_RGB = (0x1F, 0x5F, 0xBF)  # web/vram_widget.js BADGE_BG
WIDGET = "#quantlora-vram"
SIZES = [(1400, 900), (1920, 1080)]


@pytest.fixture(scope="module", params=["current", "0.3.75"])
def fe_server(request, tmp_path_factory):
    if request.param == "current":
        yield request.getfixturevalue("server")
        return
    static, why = old_frontend_root()
    if not static:
        pytest.fail(f"0.3.75's frontend: {why}", pytrace=False)
    srv = OldComfyServer(str(tmp_path_factory.mktemp("comfy-old-fe")), static).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(fe_server):
    with comfy_page(fe_server.url, console_filter=lambda text: "quantlora" in text.lower()) as pg:
        pg.wait_for_selector(WIDGET, state="visible", timeout=30_000)
        pg.fe_version = pg.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
        yield pg


def load_example(page, name=EXAMPLE):
    wf = json.load(open(os.path.join(ROOT, "example_workflows", f"{name}.json")))
    page.evaluate("async ([g, n]) => { await window.app.loadGraphData(g, true, true, n); }", [wf, name])
    return wf


def send(page, event, detail):
    page.evaluate("""([t, d]) => { const {api} = window.comfyAPI.api;
        api.dispatchEvent(new CustomEvent(t, {detail: d})); }""", [event, detail])


def record(node_id, peak=3 * 1024 ** 3, gpu=True):
    return {"prompt_id": "test", "node": str(node_id), "display_node": str(node_id), "gpu": gpu,
            "peak_allocated": peak if gpu else 0, "peak_reserved": peak if gpu else 0, "devices": [],
            "seconds": 1.0, "host_rss": 0}


def badge_texts(page):
    return page.evaluate("""() => Object.fromEntries(window.app.graph.nodes.map(n => [String(n.id),
        (n.badges || []).filter(b => b.quantloraVram).map(b => b().text).filter(Boolean)]).filter(([, t]) => t.length))""")


def badge_pixels(page, node_id) -> int:
    """Pixels of the badge colour in the screenshot, over the node's title row and above it."""
    from PIL import Image

    box = page.evaluate("""(id) => { const c = window.app.canvas, n = window.app.graph.getNodeById(id);
        const r = c.canvas.getBoundingClientRect(), s = c.ds.scale, th = LiteGraph.NODE_TITLE_HEIGHT;
        const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - th - 40]);
        return [r.left + x, r.top + y, n.size[0] * s, (th + 40) * s]; }""", node_id)
    png = page.screenshot(clip={"x": max(0, box[0]), "y": max(0, box[1]), "width": box[2], "height": box[3]})
    im = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(1 for p in im.getdata() if all(abs(a - b) <= 12 for a, b in zip(p, BADGE_RGB)))


def show_node(page, node_id):
    page.evaluate("""async (id) => { const {app} = window;
        await app.extensionManager.setting.set('Comfy.Minimap.Visible', false);
        app.canvas.ds.scale = 1.0; app.canvas.centerOnNode(app.graph.getNodeById(id));
        app.graph.setDirtyCanvas(true, true); }""", node_id)
    time.sleep(0.6)


def test_badges_in_both_renderers(page):
    wf = load_example(page)
    hot = next(n["id"] for n in wf["nodes"] if n["type"] == "LoRAHotswap")
    other = next(n["id"] for n in wf["nodes"] if n["type"] == "KSampler")
    show_node(page, hot)
    assert badge_pixels(page, hot) == 0

    # LiteGraph canvas
    send(page, "quantlora.vram.node", record(hot))
    send(page, "quantlora.vram.node", record(other, gpu=False))  # nothing to say: no badge
    assert badge_texts(page) == {str(hot): ["VRAM peak 3.0 GB"]}
    time.sleep(0.5)
    assert badge_pixels(page, hot) > 100, "the badge is not drawn on the canvas"
    # a re-run where everything is cached: the last figures stay
    send(page, "execution_start", {"prompt_id": "test2", "timestamp": 0})
    send(page, "execution_cached", {"prompt_id": "test2", "nodes": [str(n["id"]) for n in wf["nodes"]]})
    time.sleep(0.3)
    assert badge_texts(page) == {str(hot): ["VRAM peak 3.0 GB"]}
    assert badge_pixels(page, hot) > 100

    # Nodes 2.0 (the Vue node renderer)
    page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true); }")
    try:
        sel = f"[data-node-id='{hot}']"
        page.wait_for_selector(sel, timeout=20_000)
        page.wait_for_function("(s) => document.querySelector(s).innerText.includes('VRAM peak 3.0 GB')", arg=sel,
                               timeout=10_000)
        # a new figure reaches the Vue node too (no re-creation of the node)
        send(page, "quantlora.vram.node", record(hot, peak=512 * 1024 ** 2))
        page.wait_for_function("(s) => document.querySelector(s).innerText.includes('VRAM peak 512 MB')", arg=sel,
                               timeout=10_000)
        badge = page.locator(sel).get_by_text("VRAM peak 512 MB", exact=True).first
        assert badge.is_visible()
        bg = badge.evaluate("(el) => getComputedStyle(el).backgroundColor")
        assert bg.replace(" ", "") == "rgb({},{},{})".format(*BADGE_RGB), bg
        assert "VRAM" not in page.locator(f"[data-node-id='{other}']").inner_text()
    finally:
        page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false); }")
    assert not page.errors, page.errors


# the frontend's own UI the widget must not cover; "open" ones are opened by the test
FRONTEND_UI = [".side-tool-bar-container", ".actionbar", ".actionbar-container", ".p-buttongroup",
               ".minimap-main-container", ".p-toast-message", ".comfyui-body-bottom", ".bottom-panel",
               ".side-bar-panel", ".sidebar-content-container", ".subgraph-breadcrumb", "[role=dialog]",
               ".p-splitterpanel:not(.graph-canvas-panel):not(.p-splitterpanel-nested)"]


def overlaps(page):
    return page.evaluate("""([w, sels]) => {
        const me = document.querySelector(w).getBoundingClientRect(), out = [];
        for (const s of sels) for (const el of document.querySelectorAll(s)) {
            if (el.contains(document.querySelector(w))) continue;
            const r = el.getBoundingClientRect();
            if (r.width < 2 || r.height < 2 || getComputedStyle(el).visibility === 'hidden') continue;
            const ix = Math.min(me.right, r.right) - Math.max(me.left, r.left);
            const iy = Math.min(me.bottom, r.bottom) - Math.max(me.top, r.top);
            if (ix > 0 && iy > 0) out.push([s, String(el.className).slice(0, 60), Math.round(r.left), Math.round(r.top),
                                             Math.round(r.width), Math.round(r.height)]);
        }
        const inWindow = me.left >= 0 && me.top >= 0 && me.right <= innerWidth && me.bottom <= innerHeight;
        return {out, inWindow, rect: [me.left, me.top, me.width, me.height]}; }""", [WIDGET, FRONTEND_UI])


def toggle_logs(page):
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.Terminal.ToggleLogsTab')"
                  ".catch(() => window.app.extensionManager.command.execute('Workspace.ToggleBottomPanel')); }")
    time.sleep(0.8)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_widget_covers_no_frontend_ui(page, size):
    page.set_viewport_size({"width": size[0], "height": size[1]})
    page.evaluate("() => localStorage.removeItem('quantlora.vram.position')")
    page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', true); }")
    page.evaluate("() => window.app.extensionManager.toast.add({severity: 'info', summary: 'QuantLoRA test toast', "
                  "detail: 'a toast', life: 8000})")
    time.sleep(0.8)
    r = overlaps(page)
    assert r["inWindow"] and not r["out"], r
    before = r["rect"]
    # the Logs panel opens: the widget moves up with the canvas panel, covering nothing
    toggle_logs(page)
    try:
        r = overlaps(page)
        assert r["inWindow"] and not r["out"], r
        assert r["rect"][1] < before[1] - 50, (before, r["rect"])
        # an open sidebar (node library)
        page.evaluate("async () => { await window.app.extensionManager.command.execute("
                      "'Workspace.ToggleSidebarTab.node-library'); }")
        time.sleep(0.8)
        r = overlaps(page)
        assert r["inWindow"] and not r["out"], r
        page.evaluate("async () => { await window.app.extensionManager.command.execute("
                      "'Workspace.ToggleSidebarTab.node-library'); }")
    finally:
        toggle_logs(page)
    assert not page.errors, page.errors


def test_widget_moves_and_remembers(page):
    page.set_viewport_size({"width": 1400, "height": 900})
    page.evaluate("() => localStorage.removeItem('quantlora.vram.position')")
    page.evaluate("() => window.dispatchEvent(new Event('resize'))")
    box = page.locator(WIDGET).bounding_box()
    x, y = box["x"] + 20, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 150, y - 200, steps=8)
    page.mouse.up()
    moved = page.locator(WIDGET).bounding_box()
    assert abs(moved["x"] - box["x"] - 150) <= 2 and abs(moved["y"] - box["y"] + 200) <= 2, (box, moved)
    saved = page.evaluate("() => JSON.parse(localStorage.getItem('quantlora.vram.position'))")
    assert saved == {"dx": 150, "dy": -200}
    page.evaluate("() => localStorage.removeItem('quantlora.vram.position')")


def test_templates_titles_thumbnails_zoom(page):
    """The Templates dialog shows each example with its title, description and own thumbnail; opened,
    it is at a zoom where node text is drawn."""
    meta = json.load(open(os.path.join(ROOT, "web", "templates.json")))
    page.set_viewport_size({"width": 1400, "height": 900})
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.locator(DIALOG)
    dialog.get_by_text(PACK_DIR_NAME, exact=True).first.click(timeout=30_000)
    for info in meta.values():
        dialog.get_by_text(info["title"], exact=True).first.wait_for(timeout=10_000)
        assert dialog.get_by_text(info["description"], exact=True).first.is_visible()
    imgs = page.evaluate("""(titles) => [...document.querySelectorAll('img')].filter(i => titles.includes(i.alt))
        .map(i => [i.alt, i.naturalWidth])""", [m["title"] for m in meta.values()])
    assert sorted(a for a, _ in imgs) == sorted(m["title"] for m in meta.values()) and all(w > 0 for _, w in imgs), imgs
    page.keyboard.press("Escape")
    page.locator("[role=dialog] button[aria-label='Close dialog']:visible, .p-dialog button:has(i.pi-times):visible") \
        .first.click(timeout=5_000) if page.locator(DIALOG).count() else None
    for name in meta:
        load_example(page, name)
        assert page.evaluate("() => window.app.canvas.ds.scale") >= 0.75, name
