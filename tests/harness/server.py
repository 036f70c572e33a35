"""A real ComfyUI server (the harness tree) with this pack in custom_nodes, for end-to-end tests.

The implementation lives in tools/serve.py, shared with the main job (scripts/run_main.sh)."""
from quantlora.tools.serve import (COMFY, COMFY_VERSION, PACK_DIR_NAME, ROOT, STUBS, ComfyServer,  # noqa: F401
                                   PromptError, comfy_version, execution_error, free_port, reset_base,
                                   validation_errors, version_tuple)


def fresh_names(src: str, prefix: str, count: int) -> list[str]:
    """`count` more names for the model file `src`, next to it, so each reference prompt is a fresh load
    (ComfyUI and the pack cache a model by its name). Hard links, not copies: 18 copies of the 1 GB demo
    model filled a CI disk. Safe because nothing in the pack keys a model by inode or writes to its file
    (tests/server/test_server_lora.py checks the file is unchanged after its merges); copies where links are refused."""
    import os
    import shutil
    folder = os.path.dirname(src)
    names = []
    for i in range(count):
        name = f"{prefix}-{i}.safetensors"
        dst = os.path.join(folder, name)
        if not os.path.exists(dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy(src, dst)
        names.append(name)
    return names
