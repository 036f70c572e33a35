"""nodes/vram_routes.py's periodic `quantlora.vram` event, driven on its own event loop with the
execution events ComfyUI's executor sends (through the same _observe the send_sync wrapper calls):
one snapshot when a prompt starts, about one a second while it runs, exactly one when the queue goes
idle, none at idle. The end of a prompt pokes twice (execution_success, then "executing" {node: null});
the second poke once produced a second idle snapshot (a real server test caught it, timing-dependent).
The real-server check of the same contract: tests/server/test_server_vram.py."""
import asyncio

from quantlora.nodes import vram_routes


class Recorder:
    """What the service needs of ComfyUI's PromptServer: its loop, send_sync and the queue's size."""

    def __init__(self, loop):
        self.loop, self.sent, self.remaining = loop, [], 0
        self.prompt_queue = self

    def send_sync(self, event, data, sid=None):
        self.sent.append(event)

    def get_tasks_remaining(self):
        return self.remaining


def snapshots(server):
    return server.sent.count(vram_routes.EVENT)


async def scenario(run_s: float, settle_s: float = 1.0):
    loop = asyncio.get_running_loop()
    server = Recorder(loop)
    svc = vram_routes.VramService(server)
    task = loop.create_task(svc._pump())
    await asyncio.sleep(0.05)
    assert snapshots(server) == 0  # idle: nothing
    svc._observe("execution_start", {"prompt_id": "p"}, "sid")
    await asyncio.sleep(run_s)
    during = snapshots(server)
    svc._observe("execution_success", {"prompt_id": "p"}, "sid")
    svc._observe("executing", {"node": None, "prompt_id": "p"}, "sid")
    await asyncio.sleep(settle_s)
    after = snapshots(server) - during
    svc._poke()  # a stray wake-up at idle (a "status" event, say)
    await asyncio.sleep(settle_s)
    task.cancel()
    return during, after, snapshots(server) - during - after, server.sent


def test_one_idle_snapshot_after_a_prompt():
    during, after, later, sent = asyncio.run(scenario(run_s=1.3))
    assert 1 <= during <= 2, sent  # at once, then about a second later
    assert after == 1 and later == 0, sent
    assert sent.count(vram_routes.PROMPT_EVENT) == 1  # the prompt record, once, though both end events came


def test_a_prompt_shorter_than_the_pump_still_gets_one_snapshot():
    during, after, later, sent = asyncio.run(scenario(run_s=0.0))
    assert during + after == 1 and later == 0, sent
