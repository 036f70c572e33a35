"""A real ComfyUI server (the harness tree) with this pack in custom_nodes, for end-to-end tests.

The implementation lives in tools/serve.py, shared with the main job (scripts/run_main.sh)."""
from quantlora.tools.serve import (COMFY, PACK_DIR_NAME, ROOT, STUBS, ComfyServer, PromptError,  # noqa: F401
                                   execution_error, free_port, reset_base)
