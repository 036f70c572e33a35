"""A real ComfyUI server (the harness tree) with this pack in custom_nodes, for end-to-end tests.

The implementation lives in tools/serve.py, shared with the main job (scripts/run_main.sh)."""
from quantlora.tools.serve import (COMFY, COMFY_VERSION, PACK_DIR_NAME, ROOT, STUBS, ComfyServer,  # noqa: F401
                                   PromptError, comfy_version, execution_error, free_port, reset_base,
                                   validation_errors, version_tuple)
