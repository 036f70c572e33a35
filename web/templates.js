// QuantLoRA: titles and one-line descriptions for the pack's cards in the Templates dialog.
// The frontend lists a custom node pack's example_workflows/<name>.json under the pack with the file
// name as the title and as the description (frontends 1.32-1.48 read no metadata for them), next to
// the <name>.jpg thumbnail. This puts the title and description from templates.json on the cards it
// recognises by their thumbnail's address (.../workflow_templates/<pack>/<name>.jpg); the file name
// stays in the card's tooltip.
const META_URL = new URL("./templates.json", import.meta.url);
const GUARD = Symbol.for("quantlora.templates");

function textNodes(root) {
  const out = [];
  const walk = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  while (walk.nextNode()) out.push(walk.currentNode);
  return out;
}

function decorate(meta) {
  for (const [name, info] of Object.entries(meta)) {
    const plain = name.replace(/[-_]/g, " ").trim();
    const imgs = [...document.querySelectorAll("img")].filter((img) => img.alt === name ||
      new RegExp(`workflow_templates/[^/]+/${name}\\.(jpg|jpeg|webp|png)`).test(img.getAttribute("src") || ""));
    for (const img of imgs) {
      img.alt = info.title;
      // the card: the frontend's own test id (1.48), else the nearest ancestor holding the file name
      let card = img.closest(`[data-testid="template-workflow-${name}"]`);
      if (!card) {
        card = img.parentElement;
        for (let k = 0; card && k < 8 && !textNodes(card).some((t) => t.data.trim() === name); k++) card = card.parentElement;
      }
      if (!card || card.dataset.quantloraTemplate === name) continue;
      let title = null, described = false;
      for (const t of textNodes(card)) {
        const v = t.data.trim();
        if (v === name && !title) { t.data = info.title; title = t.parentElement; }
        else if (v === plain || v === name) { t.data = info.description; described = true; }
      }
      if (!title) continue;
      if (title.title === name) title.title = info.title;
      if (!described) {
        const p = document.createElement("p");
        p.className = "quantlora-template-description";
        p.textContent = info.description;
        Object.assign(p.style, { margin: "2px 0 0", fontSize: "12px", lineHeight: "1.35", opacity: "0.75",
          whiteSpace: "normal" });
        title.insertAdjacentElement("afterend", p);
      }
      card.dataset.quantloraTemplate = name;
      card.title = `${info.title}\n${info.description}\n(${name}.json)`;
    }
  }
}

if (!globalThis[GUARD]) {
  globalThis[GUARD] = true;
  fetch(META_URL).then((r) => (r.ok ? r.json() : {})).then((meta) => {
    let queued = false;
    const run = () => { queued = false; try { decorate(meta); } catch (e) { /* leave the cards as they are */ } };
    new MutationObserver(() => { if (!queued) { queued = true; requestAnimationFrame(run); } })
      .observe(document.body, { childList: true, subtree: true });
  }).catch(() => { /* no metadata: the frontend's own titles */ });
}
