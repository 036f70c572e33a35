"""Layer 4: the example workflows in headless Chromium with the real ComfyUI frontend and server.

Each example is opened the way a user opens it (Templates dialog > QuantLoRA > its card), must load
with no missing node types, must give the committed API twin through the frontend's own
app.graphToPrompt(), and the committed file must be what the UI itself saves (app.graph.serialize()).
Then, as a user would, the size and steps are made small for this CPU; that graph, saved by the UI,
is loaded again and queued from the page; its images are checked on the server's disk, and saving
the graph after the run gives the same graph again (nodes, links, widget values).
"""
import json
import os

import pytest
from PIL import Image

from harness.server import PACK_DIR_NAME
from test_example_workflows import NAMES, SIZE, STEPS, read

pytestmark = [pytest.mark.server, pytest.mark.browser]
TITLES = json.load(open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "web", "templates.json")))

from harness.browser import DIALOG, comfy_page

SETUP = """() => {
    const {app} = window;
    const {api} = window.comfyAPI.api;
    window.__t = {missing: null, queued: [], executed: []};
    app.registerExtension({name: 'quantlora.test.workflows',
        afterConfigureGraph(missing) { window.__t.missing = missing.map(m => typeof m === 'string' ? m : m.type); }});
    const queue = api.queuePrompt.bind(api);
    api.queuePrompt = async (...args) => { const r = await queue(...args); window.__t.queued.push(r); return r; };
    api.addEventListener('executed', (e) => window.__t.executed.push(String(e.detail.display_node ?? e.detail.node)));
}"""

SHRINK = """([size, steps, tag]) => {
    for (const n of window.app.graph.nodes) for (const w of n.widgets ?? []) {
        if (n.type === 'EmptySD3LatentImage' && (w.name === 'width' || w.name === 'height')) w.value = size;
        else if (w.name === 'steps') w.value = steps;
        else if (n.type === 'SaveImage' && w.name === 'filename_prefix') w.value = tag + '/' + w.value.replaceAll('/', '-');
    }
    window.app.graph.setDirtyCanvas(true, true);
}"""


def serialize(page) -> dict:
    """What the UI saves: app.graph.serialize() as JSON text (as the frontend writes it)."""
    return json.loads(page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))


def _node_part(node: dict) -> dict:
    # Output slots that link nowhere come from the running ComfyUI's node definition, not from the
    # workflow: v0.33's SaveImage has an IMAGE output that 0.3.75's had not, so the UI of each
    # version saves the same example with or without it. The links (compared too) carry every
    # connection, so unlinked slots are left out of the comparison.
    outputs = [o for o in node.get("outputs") or [] if o.get("links")]
    return {**node, "outputs": outputs}


def graph_part(ui: dict) -> dict:
    """The graph itself: nodes (with their widget values) and links; not the view (extra.ds)."""
    return {"nodes": sorted(map(_node_part, ui["nodes"]), key=lambda n: n["id"]), "links": sorted(ui["links"]),
            "groups": ui.get("groups", []), "last_node_id": ui.get("last_node_id"), "last_link_id": ui.get("last_link_id")}


@pytest.fixture(scope="module")
def page(server):
    with comfy_page(server.url) as pg:
        pg.evaluate(SETUP)
        yield pg


def open_from_templates(page, name: str):
    """Templates dialog (the sidebar's Templates) > the pack's category (under Extensions in frontend
    1.48) > the workflow's card."""
    page.evaluate("() => { window.__t.missing = null; }")
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.locator(DIALOG)
    dialog.get_by_text(PACK_DIR_NAME, exact=True).first.click(timeout=30_000)
    # the card shows the title from web/templates.json (web/templates.js), not the file name
    dialog.get_by_text(TITLES[name]["title"], exact=True).first.click(timeout=10_000)
    page.wait_for_function("() => window.__t.missing !== null", timeout=30_000)
    page.wait_for_function("(sel) => !document.querySelector(sel)", arg=DIALOG, timeout=10_000)


@pytest.mark.no_demo_models
def test_frontend_lists_the_examples(page):
    """The frontend's own call behind the Templates dialog lists every example under the pack."""
    listed = page.evaluate("async () => await window.comfyAPI.api.api.getWorkflowTemplates()")
    assert set(NAMES) <= set(listed[PACK_DIR_NAME])


@pytest.mark.parametrize("name", NAMES)
def test_example_loads_queues_and_round_trips(page, server, name):
    committed = read(name)
    open_from_templates(page, name)
    t = page.evaluate("() => window.__t")
    assert t["missing"] == [], f"missing node types: {t['missing']}"
    types = page.evaluate("() => window.app.graph.nodes.map(n => [n.type, n.type in LiteGraph.registered_node_types])")
    assert all(ok for _, ok in types) and len(types) == len(committed["nodes"]), types

    # the committed file is the UI's own save, and its API twin is what the frontend makes of it
    assert graph_part(serialize(page)) == graph_part(committed)
    prompt = json.loads(page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).output)"))
    assert prompt == read(name, ".api.json"), f"{name}.api.json differs from the frontend's graphToPrompt()"

    # small and quick on this CPU, then saved by the UI
    tag = f"browser-{name}"
    page.evaluate(SHRINK, [SIZE, STEPS, tag])
    saved = serialize(page)
    # load the saved workflow, queue it from the page, save again
    page.evaluate("async ([g, n]) => { await window.app.loadGraphData(g, true, true, n); }", [saved, name + "-saved"])
    before = len(page.evaluate("() => window.__t.queued"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")  # what the Run button does
    queued = page.evaluate("() => window.__t.queued")
    assert len(queued) == before + 1 and not queued[-1].get("node_errors"), queued[-1]
    entry = server.wait(queued[-1]["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]

    api = read(name, ".api.json")
    saves = [nid for nid, n in api.items() if n["class_type"] == "SaveImage"]
    for nid in saves:
        (img,) = entry["outputs"][nid]["images"]
        assert img["subfolder"] == tag
        path = os.path.join(server.base, "output", tag, img["filename"])
        with Image.open(path) as im:
            assert im.size[1] == SIZE and len(set(im.getdata())) > 10
    page.wait_for_function("(ids) => ids.every(id => window.__t.executed.includes(id))", arg=saves, timeout=30_000)

    after = serialize(page)
    assert graph_part(after) == graph_part(saved)  # load, run, save: the same graph
    assert not page.errors, page.errors
