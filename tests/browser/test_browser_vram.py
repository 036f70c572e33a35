"""Layer 4: the VRAM widget in headless Chromium with the real ComfyUI frontend and server.

Without CUDA (this CPU machine) the widget says "no GPU" and shows host RAM, its numbers are
compared with the route's host figures instead of the devices', and no node gets a badge (a badge
says a node's peak VRAM; tests/browser/test_browser_frontends.py checks both renderers draw one). On a CUDA/ROCm machine the same tests compare the
device totals and expect "VRAM peak ..." badges.
"""
import random
import os
import time

import pytest

from graphs import loader, txt2img
from test_server_vram import RUN_SIZE, RUN_STEPS

pytestmark = [pytest.mark.server, pytest.mark.browser]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Saved where CI keeps artifacts (git-ignored); docs/vram-widget.png in the README is a copy of one.
SCREENSHOT = os.path.join(os.environ.get("QUANTLORA_ARTIFACTS", os.path.join(ROOT, "test-artifacts")), "vram-widget.png")
from harness.browser import comfy_page
WIDGET = "#quantlora-vram"


def numbered(graph: dict) -> tuple[dict, dict]:
    """The API graph with numeric node ids (as the UI makes them), and the old -> new id map."""
    ids = {k: str(i) for i, k in enumerate(graph, start=1)}
    out = {}
    for k, node in graph.items():
        inputs = {n: ([ids[v[0]], v[1]] if isinstance(v, list) else v) for n, v in node["inputs"].items()}
        out[ids[k]] = {**node, "inputs": inputs, "_meta": {"title": k}}
    return out, ids


@pytest.fixture(scope="module")
def page(server):
    with comfy_page(server.url, console_filter=lambda text: "quantlora" in text.lower()) as pg:
        pg.wait_for_selector(WIDGET, state="visible", timeout=30_000)
        pg.wait_for_function(f"() => document.querySelector('{WIDGET}').dataset.updates >= 1", timeout=30_000)
        yield pg


def route(page):
    return page.evaluate("async () => (await fetch('/api/quantlora/vram', {cache: 'no-store'})).json()")


def widget(page):
    return page.evaluate(f"""() => {{ const el = document.querySelector('{WIDGET}');
        return {{ text: el.innerText, title: el.title, visible: getComputedStyle(el).display !== 'none' && el.getBoundingClientRect().width > 0,
                 ...el.dataset }}; }}""")


@pytest.mark.no_demo_models
def test_widget_appears_and_matches_route(page):
    w, r = widget(page), route(page)
    assert w["visible"]
    assert w["gpu"] == str(r["gpu"]).lower()
    assert int(w["devices"]) == len(r["devices"])
    if r["gpu"]:
        total = sum(d["total"] for d in r["devices"])
        assert int(w["total"]) == total
        assert w["text"].startswith("VRAM ") and f"/{total / 1024 ** 3:.1f} GB" in w["text"]
        assert "alloc" in w["text"] and "res" in w["text"] and "peak" in w["text"]
        for d in r["devices"]:
            assert d["name"] in w["title"]
    else:  # without CUDA: host RAM and "no GPU"
        assert int(w["total"]) == r["host"]["total"]
        assert w["text"].startswith("no GPU") and f"/{r['host']['total'] / 1024 ** 3:.1f} GB" in w["text"]
        assert r["message"] in w["title"]
    assert w["pressure"] in ("low", "mid", "high")
    assert "Host RAM" in w["title"]
    assert not page.errors, page.errors


def test_updates_while_running_and_node_badge(page, server):
    graph, ids = numbered(txt2img(loader(), seed=random.randrange(10 ** 12), steps=RUN_STEPS, size=RUN_SIZE,
                                  prefix="vram-browser"))
    sample = ids["sample"]
    page.evaluate("""() => {
        const {api} = window.comfyAPI.api;
        window.__vram = {renders: [], start: null, end: null};
        const el = document.querySelector('#quantlora-vram');
        new MutationObserver(() => window.__vram.renders.push(
            {t: Date.now(), source: el.dataset.source, time: el.dataset.time, text: el.innerText}))
          .observe(el, {attributes: true, attributeFilter: ['data-updates']});
        api.addEventListener('execution_start', () => { window.__vram.start = Date.now(); });
        api.addEventListener('execution_success', () => { window.__vram.end = Date.now(); });
    }""")
    page.evaluate("async (g) => { await window.app.loadApiJson(g, 'vram-test.json'); await window.app.queuePrompt(0, 1); }",
                  graph)
    page.wait_for_function("() => window.__vram.end", timeout=300_000)
    time.sleep(0.5)  # the prompt's last node record follows execution_success
    log = page.evaluate("() => window.__vram")
    during = [x for x in log["renders"] if x["source"] == "event" and log["start"] <= x["t"] <= log["end"]]
    assert during, log
    assert len({x["time"] for x in during}) == len(during)  # each is a new server reading
    run_s = (log["end"] - log["start"]) / 1000
    assert len(during) >= min(2, int(run_s)), (run_s, during)  # about once a second while it runs
    assert any("running" in x["text"] for x in during)

    badges = page.evaluate("""() => window.app.graph.nodes.flatMap(n => (n.badges || [])
        .filter(b => b.quantloraVram && b().text).map(b => ({id: String(n.id), text: b().text, peak: b().peak})))""")
    by_id = {b["id"]: b for b in badges}
    r = route(page)
    nodes = r["prompt"]["nodes"]
    if r["gpu"]:  # a badge on the nodes that executed and used VRAM
        assert sample in by_id, badges
        assert set(by_id) == {nid for nid, n in nodes.items() if n["peak_allocated"] > 0}
        for nid, b in by_id.items():
            assert b["peak"] == nodes[nid]["peak_allocated"] and b["text"].startswith("VRAM peak ")
    else:  # without a GPU there is nothing to say: no badge (not "VRAM: no GPU" on every node)
        assert nodes and not badges, badges
    assert not page.errors, page.errors

    # the README's picture: the graph fitted to the canvas, badges drawn, the widget at the bottom
    page.evaluate("""async (id) => {
        const {app} = window;
        await app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 1);  // titles at any zoom
        await app.extensionManager.setting.set('Comfy.Minimap.Visible', false);
        app.canvas.ds.scale = 0.8;
        app.canvas.centerOnNode(app.graph.getNodeById(id));
        app.graph.setDirtyCanvas(true, true); }""", sample)
    page.mouse.move(700, 700)
    time.sleep(1.0)
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    page.screenshot(path=SCREENSHOT)
    assert os.path.getsize(SCREENSHOT) > 10_000


@pytest.mark.no_demo_models
def test_setting_hides_widget_and_badges(page):
    set_ = "async (v) => { await window.app.extensionManager.setting.set('QuantLoRA.VRAM.Enabled', v); }"
    page.evaluate(set_, False)
    page.wait_for_selector(WIDGET, state="hidden", timeout=5_000)
    assert page.evaluate("() => window.app.graph.nodes.every(n => !(n.badges || []).some(b => b.quantloraVram && b().text))")
    before = widget(page)["updates"]
    time.sleep(1.5)
    assert widget(page)["updates"] == before  # the timer stopped with it
    page.evaluate(set_, True)
    page.wait_for_selector(WIDGET, state="visible", timeout=5_000)
    page.wait_for_function(f"(n) => +document.querySelector('{WIDGET}').dataset.updates > n", arg=int(before),
                           timeout=10_000)
    # the refresh interval setting is registered with its bounds
    assert page.evaluate("() => window.app.extensionManager.setting.get('QuantLoRA.VRAM.RefreshSeconds')") == 5
