"""HTTP routes the pack adds under its own prefix (/quantlora/...). Each feature registers here.

Contract (tests/test_routes_contract.py): every route is read-only except POST
/quantlora/vram/reset; any other method on a pack path answers 405 with an Allow header; no
handler reads the query string, the body or a path from the request; every response is a small
bounded JSON document (well under 64 KB).

  GET  /quantlora/vram        the VRAM widget's snapshot (nodes/vram_routes.py)
  POST /quantlora/vram/reset  resets the widget's peak, returns a snapshot
  GET  /quantlora/stats       the pack's long-lived state: LoRA cache entries/capacity/parses,
                              models with hot-swap slots, how many hold an active LoRA set, swaps
"""
from __future__ import annotations

_registered = False


def read_only_route(routes, path: str, get=None, post=None) -> None:
    """Register `get` (GET, and HEAD through aiohttp) and/or `post` on `path`, then a catch-all that
    answers 405 for every other method, so no other route (ComfyUI's static files) serves it.
    The three are added one after another: aiohttp puts them on one resource."""
    from aiohttp import web

    allowed = [m for m, h in (("GET", get), ("POST", post)) if h is not None]
    if get is not None:
        allowed.append("HEAD")
        routes.get(path)(get)
    if post is not None:
        routes.post(path)(post)

    async def not_allowed(request):
        raise web.HTTPMethodNotAllowed(request.method, allowed)

    routes.route("*", path)(not_allowed)


async def get_stats(request):
    from aiohttp import web

    from . import runtime

    return web.json_response(runtime.stats(), headers={"Cache-Control": "no-store"})


def register() -> None:
    global _registered
    if _registered:
        return
    from . import vram_routes

    # None: no PromptServer yet (nodes imported outside a running ComfyUI); try again later.
    service = vram_routes.register()
    if service is not None:
        read_only_route(service.server.routes, "/quantlora/stats", get=get_stats)
        _registered = True
