"""The VRAM widget's server side: two routes and three websocket events on ComfyUI's PromptServer.

Routes (under the pack's prefix; also reachable as /api/quantlora/..., as ComfyUI mirrors routes):
  GET  /quantlora/vram        -> memory.vram.snapshot(): devices, host RAM, peaks, current/last prompt
  POST /quantlora/vram/reset  -> resets the peak ("since last reset") and returns a fresh snapshot
Any other method on either path answers 405 (nodes/routes.py read_only_route).
Neither reads anything from the request (no path, no file, no body); responses are bounded
(memory.vram caps devices, per-node records and name lengths). Memory is read in a worker
thread (asyncio.to_thread), so the event loop never waits on the GPU driver.

Events (PromptServer.send_sync):
  quantlora.vram         the snapshot, broadcast: once when the queue becomes busy, about once a
                         second while it stays busy, once more when it goes idle; never at idle.
  quantlora.vram.node    {prompt_id, node, display_node, gpu, peak_allocated, peak_reserved,
                          devices: [{index, peak_allocated, peak_reserved}], seconds, host_rss}
                         to the client that queued the prompt, when a node's execution ends.
  quantlora.vram.prompt  {prompt_id, running: false, status, gpu, peak_allocated, peak_reserved,
                          devices, nodes: {node_id: {peak_allocated, peak_reserved}}, ...}
                         to the same client when the prompt ends.

How per-node peaks are captured. ComfyUI 0.3.75 has no public per-node execution hook for
extensions: on_prompt handlers see the graph when it is POSTed, not when it runs, and the
progress-handler registry is rebuilt for each prompt inside the executor. What every node
execution does go through is PromptServer.send_sync: the executor sends "execution_start",
then "executing" {node} as each node begins (from the worker thread, just before the node
runs), and "execution_success" / "execution_error" / "execution_interrupted" and "executing"
{node: null} at the end. So this module wraps the instance's send_sync (one transparent
wrapper, installed once, that always forwards the call unchanged and never raises): each
"executing" closes the previous node's window and opens the next (memory.vram.PeakTracker
folds torch's max_memory_allocated/reserved and resets that mark at each boundary). Limits:
ComfyUI sends "executing" only for prompts queued with a client_id (the UI always sends one),
and cached nodes do not execute, so they get no record.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..memory import vram

EVENT = "quantlora.vram"
NODE_EVENT = "quantlora.vram.node"
PROMPT_EVENT = "quantlora.vram.prompt"
BUSY_PERIOD_S = 1.0
MIN_GAP_S = 0.5  # never two snapshots closer than this (prompt starts force one)

log = logging.getLogger("quantlora.vram")
_service = None


class VramService:
    def __init__(self, server, tracker: vram.PeakTracker | None = None):
        self.server = server
        self.tracker = tracker or vram.PeakTracker()
        self.loop = server.loop
        self._wake = asyncio.Event()
        self._push_now = False
        self._idle_sent = True  # the idle snapshot goes out once per busy spell (a prompt's end pokes twice)
        self._status = None
        self._task = None
        self._errors = 0
        self._send = server.send_sync  # the original, for our own events

    # -- install --
    def install(self) -> None:
        from .routes import read_only_route

        r = self.server.routes
        read_only_route(r, "/quantlora/vram", get=self.get_vram)  # any other method: 405
        read_only_route(r, "/quantlora/vram/reset", post=self.post_reset)
        self._wrap_send_sync()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._task = self.loop.create_task(self._pump())
        else:
            self.loop.call_soon_threadsafe(self._start_pump)

    def _start_pump(self):
        self._task = self.loop.create_task(self._pump())

    def _wrap_send_sync(self):
        original = self._send
        if getattr(original, "_quantlora_vram", False):
            return

        def send_sync(event, data, sid=None, *args, **kwargs):
            try:
                self._observe(event, data, sid)
            except Exception:  # never let the widget break execution
                self._errors += 1
                if self._errors <= 3:
                    log.exception("QuantLoRA VRAM tracking failed on %r", event)
            return original(event, data, sid, *args, **kwargs)

        send_sync._quantlora_vram = True
        self.server.send_sync = send_sync

    # -- routes --
    async def get_vram(self, request: web.Request) -> web.Response:
        return await self._respond()

    async def post_reset(self, request: web.Request) -> web.Response:
        try:
            await asyncio.to_thread(self.tracker.reset)
        except Exception as e:
            return web.json_response({"error": f"reset failed: {type(e).__name__}"}, status=503)
        return await self._respond()

    async def _respond(self) -> web.Response:
        try:
            data = await asyncio.to_thread(vram.snapshot, self.tracker)
        except Exception as e:
            return web.json_response({"error": f"memory read failed: {type(e).__name__}"}, status=503)
        return web.json_response(data, headers={"Cache-Control": "no-store"})

    # -- execution events (worker thread, or loop thread for "status") --
    def _observe(self, event, data, sid):
        if not isinstance(event, str) or not isinstance(data, dict):
            return
        if event == "status":
            remaining = (data.get("status") or {}).get("exec_info", {}).get("queue_remaining", 0)
            if remaining:
                self._poke()
        elif event == "execution_start":
            self._status = None
            self._emit(self.tracker.begin_prompt(data.get("prompt_id")), sid)
            self._push_now = True  # a snapshot naming this prompt at once, even if it runs < 1 s
            self._idle_sent = False
            self._poke()
        elif event == "executing":
            node = data.get("node")
            if node is None:
                self._emit(self.tracker.end_prompt(self._status or "success"), sid)
                self._poke()
            else:
                rec = self.tracker.begin_node(str(node), data.get("display_node"), data.get("prompt_id"))
                if rec is not None:
                    self._emit([("node", rec)], sid)
        elif event in ("execution_success", "execution_interrupted"):
            self._status = "success" if event == "execution_success" else "interrupted"
            self._emit(self.tracker.end_prompt(self._status), sid)
            self._poke()
        elif event == "execution_error":
            self._status = "error"
            rec = self.tracker.end_node()
            if rec is not None:
                self._emit([("node", rec)], sid)

    def _emit(self, records, sid):
        for kind, rec in records:
            self._send(NODE_EVENT if kind == "node" else PROMPT_EVENT, rec, sid)

    def _poke(self):
        self.loop.call_soon_threadsafe(self._wake.set)

    # -- periodic event --
    def _busy(self) -> bool:
        if self.tracker.running():
            return True
        try:
            return self.server.prompt_queue.get_tasks_remaining() > 0
        except Exception:
            return False

    async def _push(self):
        try:
            data = await asyncio.to_thread(vram.snapshot, self.tracker)
        except Exception:
            return
        self._send(EVENT, data, None)

    async def _pump(self):
        loop = self.loop
        while True:
            await self._wake.wait()          # idle: no wake-ups at all until the queue gets work
            self._wake.clear()
            if not self._busy():
                # a prompt that ended before the pump saw it busy still gets its one snapshot; a late
                # poke (execution_success, then "executing" {node: null}) after the idle one gets none
                if not self._idle_sent:
                    self._idle_sent = True
                    await self._push()
                continue
            self._idle_sent = False
            next_at, last = loop.time(), -1.0
            while True:
                now = loop.time()
                if now >= next_at or (self._push_now and now - last >= MIN_GAP_S):
                    self._push_now = False
                    await self._push()
                    last = loop.time()
                    next_at = last + BUSY_PERIOD_S
                try:  # pokes (node/prompt boundaries) only matter when the queue went idle
                    await asyncio.wait_for(self._wake.wait(), max(next_at - loop.time(), 0))
                    self._wake.clear()
                except asyncio.TimeoutError:
                    pass
                if not self._busy():
                    break
            self._idle_sent = True
            await self._push()  # the idle numbers, once


def register() -> VramService | None:
    """Installs the routes, the send_sync wrapper and the periodic task once; None when no
    PromptServer instance exists (the pack imported outside a running ComfyUI)."""
    global _service
    if _service is None:
        try:
            from server import PromptServer
        except ImportError:
            return None
        instance = getattr(PromptServer, "instance", None)
        if instance is None:
            return None
        _service = VramService(instance)
        _service.install()
    return _service
