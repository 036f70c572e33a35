"""Command line for the headless client: `python -m client` from the pack folder, or `quantlora-run`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import ClientError, Progress, WorkflowError, apply_overrides, describe_nodes, load_workflow, run_workflow
from .progress import _Bar

EPILOG = """\
NODE is a node id, a node title (_meta.title) or a class_type that occurs once. VALUE is read as
JSON when it parses (numbers, true/false, null, lists, "quoted strings"), else as a plain string.

exit status: 0 done; 1 the server rejected the prompt (validation) or it failed while running
(the server's message is printed); 2 bad workflow file, override or arguments; 3 timeout (the
prompt is taken off the queue / interrupted); 4 the server could not be reached; 130 Ctrl-C.

Downloaded file paths are printed on stdout, one per line; progress and errors go to stderr."""


def _headers(items) -> dict:
    headers = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise WorkflowError(f"--header {item!r}: expected 'Name: value'")
        headers[key.strip()] = value.strip()
    return headers


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="quantlora-run", description="Run a ComfyUI workflow (API format) on a ComfyUI server, show its "
        "progress and download its outputs.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", help="API-format workflow JSON (ComfyUI: Export (API)); for a UI-format file "
                    "its twin <name>.api.json is used when present")
    ap.add_argument("--url", default=os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188"),
                    help="ComfyUI server URL (default: $COMFYUI_URL or http://127.0.0.1:8188)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.input=VALUE",
                    help="override an input (repeatable)")
    ap.add_argument("--out", default="outputs", help="folder for the downloaded outputs (default: ./outputs)")
    ap.add_argument("--no-download", action="store_true", help="do not download the outputs")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the whole run (default: 600)")
    ap.add_argument("--header", action="append", default=[], metavar="'Name: value'",
                    help="extra HTTP header for every request, e.g. 'Authorization: Bearer ...' (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the workflow's nodes and inputs (after overrides) and exit")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the paths")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    ap.add_argument("-v", "--verbose", action="store_true", help="on an execution error, print the server's traceback")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = sys.stderr
    bar = _Bar(err, quiet=args.quiet)
    try:
        if args.list:
            graph, path = load_workflow(args.workflow)
            graph = apply_overrides(graph, args.overrides)
            print(describe_nodes(graph))
            for nid, node in graph.items():
                for name, value in (node.get("inputs") or {}).items():
                    shown = "<link>" if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) else json.dumps(value)
                    print(f"    {nid}.{name} = {shown[:120]}")
            return 0
        _, path = load_workflow(args.workflow)
        if path and os.path.abspath(path) != os.path.abspath(args.workflow) and not args.quiet:
            print(f"{args.workflow} is a UI-format workflow: running its API twin {path}", file=err)
        start = time.monotonic()
        result = run_workflow(args.url, path or args.workflow, args.overrides,
                              out_dir=None if args.no_download else args.out, timeout=args.timeout,
                              progress=bar, headers=_headers(args.header))
    except KeyboardInterrupt:
        print("\ninterrupted: the prompt was taken off the queue / interrupted", file=err)
        return 130
    except ClientError as e:
        bar(Progress("done"))
        print(f"error: {e}", file=err)
        data = getattr(e, "data", None)
        if args.verbose and data and data.get("traceback"):
            print("".join(data["traceback"]).rstrip(), file=err)
        return e.exit_code
    if args.json:
        print(json.dumps({"prompt_id": result.prompt_id, "outputs": result.outputs,
                          "node_outputs": result.node_outputs}, indent=2))
    else:
        for p in result.outputs:
            print(p)
    if not args.quiet:
        print(f"done in {time.monotonic() - start:.1f}s: prompt {result.prompt_id}, "
              f"{len(result.outputs)} file(s)" + ("" if args.no_download else f" in {args.out}"), file=err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
