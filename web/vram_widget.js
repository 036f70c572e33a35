// QuantLoRA VRAM widget: a compact bar (used/total, torch allocated/reserved, the run's peak),
// coloured by memory pressure, with a details tooltip, and a peak-VRAM badge on each node that
// executes on a GPU. Uses the frontend's public extension API: app.registerExtension,
// api.addEventListener / api.fetchApi, extension settings, node.badges. Server side: nodes/vram_routes.py.
//
// Placement: the bottom-left of the graph canvas panel, right of the canvas info text (the area the frontend leaves to the
// canvas: it shrinks when the sidebar or the Logs panel opens, and the zoom controls, minimap and
// toasts sit on the right), so it covers none of the frontend's own UI. Drag it to move it; the
// place is remembered (localStorage), double-click resets the peak.
//
// Badges: node.badges holds a badge the LiteGraph canvas draws; the Vue node renderer ("Nodes 2.0")
// reads the same list, but only re-reads it when the graph signals a node property change
// (graph.trigger("node:property:changed"): "badges" in frontend 1.48, a same-value "title" in 1.32).
// A badge stays until the node executes again (a re-run where everything is cached keeps them);
// without a GPU there is nothing to say, so no badge.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXT = "QuantLoRA.VRAMWidget";
const SET_ENABLED = "QuantLoRA.VRAM.Enabled";
const SET_REFRESH = "QuantLoRA.VRAM.RefreshSeconds";
const ROUTE = "/quantlora/vram";
const GUARD = Symbol.for("quantlora.vram.widget");
const POS_KEY = "quantlora.vram.position";  // {dx, dy}: offset from the default place, in px
const MARGIN = 10;

const state = {
  enabled: true,
  refreshS: 5,
  el: null,
  timer: null,
  last: null,          // last snapshot
  lastAt: 0,           // when it arrived (ms)
  updates: 0,
  runPeak: null,       // {prompt_id, peak_allocated, peak_reserved, running, gpu}
  badged: new Set(),   // node ids carrying our badge
  offset: { dx: 0, dy: 0 },
  panel: null,         // the element the widget is placed against
  observer: null,
};

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
function fmt(b) {
  if (b == null || !Number.isFinite(b)) return "?";
  return b >= GiB ? `${(b / GiB).toFixed(1)} GB` : `${Math.round(b / MiB)} MB`;
}
function gb(b) {
  return b == null || !Number.isFinite(b) ? "?" : (b / GiB).toFixed(1);
}

const COLORS = { low: "#3fa34d", mid: "#d9a21b", high: "#d6453d", none: "#777" };

function pressure(snap) {
  let ratio = null;
  if (snap.gpu) {
    for (const d of snap.devices) {
      const used = d.used ?? d.reserved;
      if (d.total) ratio = Math.max(ratio ?? 0, used / d.total);
    }
  } else if (snap.host && snap.host.total) {
    ratio = snap.host.used / snap.host.total;
  }
  if (ratio == null) return ["none", null];
  return [ratio < 0.7 ? "low" : ratio < 0.9 ? "mid" : "high", ratio];
}

function mount() {
  if (state.el) return state.el;
  const el = document.createElement("div");
  el.id = "quantlora-vram";
  el.setAttribute("role", "status");
  Object.assign(el.style, {
    position: "fixed", left: "70px", top: "calc(100% - 40px)", zIndex: "1000", touchAction: "none",
    display: "flex", alignItems: "center", gap: "8px", padding: "3px 10px 3px 6px",
    font: "12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace", color: "#e8e8e8",
    background: "rgba(24,24,27,0.88)", border: "1px solid #444", borderRadius: "6px",
    boxShadow: "0 1px 4px rgba(0,0,0,0.4)", cursor: "move", userSelect: "none", whiteSpace: "nowrap",
  });
  const meter = document.createElement("div");
  meter.className = "quantlora-vram-meter";
  Object.assign(meter.style, { width: "46px", height: "8px", background: "#333", borderRadius: "3px", overflow: "hidden" });
  const fill = document.createElement("div");
  fill.className = "quantlora-vram-fill";
  Object.assign(fill.style, { height: "100%", width: "0%", background: COLORS.none, transition: "width .3s" });
  meter.appendChild(fill);
  const text = document.createElement("span");
  text.className = "quantlora-vram-text";
  text.textContent = "VRAM …";
  el.append(meter, text);
  // Double-click resets the peak (POST /quantlora/vram/reset).
  el.addEventListener("dblclick", async () => {
    try {
      const r = await api.fetchApi(`${ROUTE}/reset`, { method: "POST" });
      if (r.ok) render(await r.json(), "reset");
    } catch (e) { /* offline: ignore */ }
  });
  dragHandlers(el);
  document.body.appendChild(el);
  state.el = el;
  try {
    const o = JSON.parse(localStorage.getItem(POS_KEY) || "null");
    if (o && Number.isFinite(o.dx) && Number.isFinite(o.dy)) state.offset = { dx: o.dx, dy: o.dy };
  } catch (e) { /* no storage: default place */ }
  window.addEventListener("resize", place);
  place();
  return el;
}

// ---- placement ----
function anchorRect() {
  let p = state.panel;
  if (!p || !p.isConnected) {
    p = document.querySelector(".graph-canvas-panel");
    if (p !== state.panel) {
      state.observer?.disconnect();
      state.panel = p;
      if (p && typeof ResizeObserver === "function") {
        state.observer = new ResizeObserver(() => place());
        state.observer.observe(p);
      }
    }
  }
  const r = p?.getBoundingClientRect();
  if (r && r.width > 0 && r.height > 0) return r;
  // no canvas panel (another frontend layout): the window, past the side toolbar
  return { left: 60, top: 0, right: window.innerWidth, bottom: window.innerHeight };
}

function place() {
  const el = state.el;
  if (!el || el.style.display === "none") return;
  const r = anchorRect();
  const w = el.offsetWidth, h = el.offsetHeight;
  const clamp = (v, lo, hi) => Math.max(lo, Math.min(v, Math.max(lo, hi)));
  const x = clamp(r.left + 120 + state.offset.dx, 0, window.innerWidth - w);
  const y = clamp(r.bottom - MARGIN - h + state.offset.dy, 0, window.innerHeight - h);
  el.style.left = `${Math.round(x)}px`;
  el.style.top = `${Math.round(y)}px`;
  el.dataset.offset = `${Math.round(state.offset.dx)},${Math.round(state.offset.dy)}`;
}

function dragHandlers(el) {
  let drag = null;
  el.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    drag = { x: e.clientX, y: e.clientY, dx: state.offset.dx, dy: state.offset.dy, moved: false };
    el.setPointerCapture?.(e.pointerId);
  });
  el.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const mx = e.clientX - drag.x, my = e.clientY - drag.y;
    if (!drag.moved && Math.abs(mx) + Math.abs(my) < 4) return;
    drag.moved = true;
    state.offset = { dx: drag.dx + mx, dy: drag.dy + my };
    place();
  });
  const end = (e) => {
    if (!drag) return;
    if (drag.moved) {
      try { localStorage.setItem(POS_KEY, JSON.stringify(state.offset)); } catch (err) { /* not kept */ }
    }
    drag = null;
    el.releasePointerCapture?.(e.pointerId);
  };
  el.addEventListener("pointerup", end);
  el.addEventListener("pointercancel", end);
}

function render(snap, source) {
  if (!snap || typeof snap !== "object" || !Array.isArray(snap.devices)) return;
  state.last = snap;
  state.lastAt = Date.now();
  state.updates += 1;
  if (snap.prompt) {
    state.runPeak = snap.prompt;
  }
  if (!state.enabled || !state.el) return;
  const el = state.el;
  const [level, ratio] = pressure(snap);
  const run = state.runPeak;
  let line;
  if (snap.gpu) {
    // Several GPUs: sum for used/total, the largest device for the peak.
    const sum = (k) => snap.devices.reduce((a, d) => a + (d[k] ?? 0), 0);
    const used = snap.devices.every((d) => d.used != null) ? sum("used") : null;
    const peak = run ? run.peak_allocated : Math.max(...snap.devices.map((d) => d.peak_allocated));
    line = `VRAM ${gb(used)}/${gb(sum("total"))} GB · alloc ${gb(sum("allocated"))} / res ${gb(sum("reserved"))}` +
      ` · peak ${gb(peak)}`;
  } else {
    const h = snap.host || {};
    line = `no GPU · RAM ${gb(h.used)}/${gb(h.total)} GB` + (run ? ` · run ${run.running ? "running" : run.status || "done"}` : "");
  }
  el.querySelector(".quantlora-vram-text").textContent = line;
  const fill = el.querySelector(".quantlora-vram-fill");
  fill.style.width = ratio == null ? "0%" : `${Math.min(100, Math.round(ratio * 100))}%`;
  fill.style.background = COLORS[level];
  el.style.borderColor = COLORS[level];
  el.title = tooltip(snap);
  el.dataset.gpu = String(!!snap.gpu);
  el.dataset.pressure = level;
  el.dataset.source = source;
  el.dataset.updates = String(state.updates);
  el.dataset.time = String(snap.time);
  el.dataset.devices = String(snap.devices.length);
  el.dataset.total = String(snap.gpu ? snap.devices.reduce((a, d) => a + d.total, 0) : (snap.host?.total ?? ""));
  place();
}

function tooltip(snap) {
  const lines = [`QuantLoRA VRAM (${snap.backend})`];
  if (!snap.gpu) lines.push(snap.message || "no GPU");
  for (const d of snap.devices) {
    lines.push(`GPU ${d.index}: ${d.name}`,
      `  used ${fmt(d.used)} of ${fmt(d.total)} (free ${fmt(d.free)})`,
      `  torch allocated ${fmt(d.allocated)}, reserved ${fmt(d.reserved)}`,
      `  peak since reset: allocated ${fmt(d.peak_allocated)}, reserved ${fmt(d.peak_reserved)}`);
  }
  const h = snap.host || {};
  lines.push(`Host RAM: used ${fmt(h.used)} of ${fmt(h.total)}, ComfyUI process ${fmt(h.process_rss)}`);
  const p = state.runPeak;
  if (p) {
    lines.push(`Run ${String(p.prompt_id).slice(0, 8)} (${p.running ? "running" : p.status || "done"}): ` +
      (p.gpu ? `peak allocated ${fmt(p.peak_allocated)}, reserved ${fmt(p.peak_reserved)}` : "no GPU"));
  }
  lines.push("Drag: move (the place is remembered) · Double-click: reset the peak");
  return lines.join("\n");
}

// ---- one timer, only while enabled and the page is visible ----
function stopTimer() {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
}
function schedule(ms) {
  stopTimer();
  if (!state.enabled || document.hidden) return;
  state.timer = setTimeout(tick, ms);
}
async function tick() {
  state.timer = null;
  if (!state.enabled || document.hidden) return;
  const periodMs = state.refreshS * 1000;
  // The server pushes events while a prompt runs: no fetch when one arrived recently.
  if (Date.now() - state.lastAt >= periodMs * 0.9) {
    try {
      const r = await api.fetchApi(ROUTE, { cache: "no-store" });
      if (r.ok) render(await r.json(), "route");
    } catch (e) { /* server restarting: try again next period */ }
  }
  schedule(periodMs);
}

// ---- per-node badges ----
// What LGraphBadge has: own fields are the ones the Vue renderer's NodeBadge takes as props (text,
// fgColor, bgColor: the rest would land on its element as attributes); the canvas's draw/getWidth
// and the pack's figures live on the prototype / as non-enumerable fields.
class VramBadge {
  constructor(text, bgColor, rec) {
    this.text = text;
    this.fgColor = "#fff";
    this.bgColor = bgColor;
    Object.defineProperties(this, {
      peak: { value: rec.peak_allocated }, gpu: { value: !!rec.gpu }, record: { value: rec },
    });
  }
  get visible() { return true; }
  get fontSize() { return 11; }
  get padding() { return 5; }
  get height() { return 18; }
  get cornerRadius() { return 4; }
  getWidth(ctx) {
    if (!this.text) return 0;
    const f = ctx.font;
    ctx.font = `${this.fontSize}px sans-serif`;
    const w = ctx.measureText(this.text).width + this.padding * 2;
    ctx.font = f;
    return w;
  }
  draw(ctx, x, y) {
    if (!this.text) return;
    const { font, fillStyle, textBaseline, textAlign } = ctx;
    ctx.font = `${this.fontSize}px sans-serif`;
    const w = this.getWidth(ctx);
    ctx.fillStyle = this.bgColor;
    ctx.beginPath();
    ctx.roundRect ? ctx.roundRect(x, y, w, this.height, this.cornerRadius) : ctx.rect(x, y, w, this.height);
    ctx.fill();
    ctx.fillStyle = this.fgColor;
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    ctx.fillText(this.text, x + this.padding, y + this.height / 2 + 1);
    Object.assign(ctx, { font, fillStyle, textBaseline, textAlign });
  }
}

const BADGE_BG = "#1f5fbf";
const REV = "quantloraVramBadgeRevision";
const EMPTY = new VramBadge("", "transparent", { peak_allocated: null, gpu: false });
const records = new WeakMap();  // node -> the VramBadge it shows

// A record worth a badge: a GPU figure. Without a GPU every node would say the same "no GPU".
function worthBadge(rec) {
  return !!rec && rec.gpu === true && Number.isFinite(rec.peak_allocated) && rec.peak_allocated > 0;
}

// Each node gets one badge slot when it is created: a function both renderers call to get the badge.
// The Vue renderer calls it inside a computed property and reads the badge list it captured when the
// node was mounted; reading a property of a reactive object the frontend hands to extensions
// (app.extensionManager, a Pinia store) makes that computed depend on it, so bumping that property
// re-evaluates the slots: new figures appear without re-creating the node.
function slotFor(node) {
  const fn = () => {
    void app.extensionManager?.[REV];
    return (state.enabled && records.get(node)) || EMPTY;
  };
  fn.quantloraVram = true;
  return fn;
}

function ensureSlot(node) {
  node.badges ??= [];
  if (!node.badges.some((b) => b.quantloraVram)) node.badges.push(slotFor(node));
}

function findNode(id) {
  const g = app.graph;
  if (!g || id == null) return null;
  return g.getNodeById(id) ?? (Number.isFinite(+id) ? g.getNodeById(+id) : null);
}

function changed(node) {
  const em = app.extensionManager;
  if (em) {
    try { em[REV] = (em[REV] || 0) + 1; } catch (e) { /* not extensible: the canvas still redraws */ }
  }
  const g = node?.graph ?? app.graph;
  if (node) {
    try {
      g?.trigger?.("node:property:changed", { type: "node:property:changed", nodeId: node.id, property: "badges",
        oldValue: node.badges, newValue: node.badges });
    } catch (e) { /* a frontend without the event */ }
  }
  app.graph?.setDirtyCanvas(true, true);
}

function setBadge(rec) {
  if (!state.enabled || !worthBadge(rec)) return;
  const node = findNode(rec.display_node ?? rec.node);
  if (!node) return;
  ensureSlot(node);
  records.set(node, new VramBadge(`VRAM peak ${fmt(rec.peak_allocated)}`, BADGE_BG, rec));
  state.badged.add(node.id);
  changed(node);
}

function clearBadges() {
  for (const id of state.badged) {
    const node = findNode(id);
    if (node) records.delete(node);
  }
  state.badged.clear();
  changed(null);
}

function apply() {
  if (!state.el) return;
  state.el.style.display = state.enabled ? "flex" : "none";
  if (state.enabled) {
    place();
    if (state.last) render(state.last, state.el.dataset.source || "route");
    schedule(0);
  } else {
    stopTimer();
    clearBadges();
  }
}

if (!globalThis[GUARD]) {
  // The pack's web folder can be served under two names (WEB_DIRECTORY and pyproject's
  // [tool.comfy] web): register once.
  globalThis[GUARD] = true;
  app.registerExtension({
    name: EXT,
    settings: [
      {
        id: SET_ENABLED, category: ["QuantLoRA", "VRAM widget", "Enabled"], name: "Show the VRAM widget",
        tooltip: "GPU memory bar and per-node peak VRAM badges", type: "boolean", defaultValue: true,
        onChange: (v) => { state.enabled = v !== false; apply(); },
      },
      {
        id: SET_REFRESH, category: ["QuantLoRA", "VRAM widget", "Refresh"],
        name: "VRAM widget refresh interval when idle (seconds)",
        tooltip: "While a prompt runs the server pushes numbers about once a second", type: "slider",
        attrs: { min: 1, max: 60, step: 1 }, defaultValue: 5,
        onChange: (v) => { state.refreshS = Math.max(1, Number(v) || 5); if (state.el) schedule(state.refreshS * 1000); },
      },
    ],
    nodeCreated(node) {
      ensureSlot(node);
    },
    async setup() {
      const s = app.extensionManager?.setting;
      if (s) {
        state.enabled = s.get(SET_ENABLED) !== false;
        state.refreshS = Math.max(1, Number(s.get(SET_REFRESH)) || 5);
      }
      mount();
      api.addEventListener("quantlora.vram", ({ detail }) => render(detail, "event"));
      api.addEventListener("quantlora.vram.node", ({ detail }) => setBadge(detail));
      api.addEventListener("quantlora.vram.prompt", ({ detail }) => {
        state.runPeak = detail;
        if (state.last) render(state.last, "prompt");
      });
      document.addEventListener("visibilitychange", () => (document.hidden ? stopTimer() : schedule(0)));
      apply();
    },
  });
}
