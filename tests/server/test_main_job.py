"""The README's main-job command, as a user runs it: scripts/run_main.sh (set-up, demo models, a real
ComfyUI server with the pack, example workflow (a) through the client). --exit stops it after the
image; --models adds a user's folder, whose FLUX candidates it names. Checked: exit status 0, the UI
address answers while the job runs (it printed it), and the image path it prints is a PNG of the
requested size."""
import os
import re
import subprocess

import pytest
from PIL import Image

from quantlora.tools.serve import free_port

pytestmark = pytest.mark.server
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_main_job_prints_ui_and_saves_the_image(comfy, tmp_path):
    from quantlora.tools import demo_models as dm

    user_models = tmp_path / "my-models"
    (user_models / "diffusion_models").mkdir(parents=True)
    dm.write_bfl(str(user_models / "diffusion_models" / "my-flux.safetensors"), dm.flux_bfl_state_dict(seed=3))
    port = free_port()
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_main.sh"), "--exit", "--port", str(port),
                        "--base", str(tmp_path / "base"), "--models", str(user_models), "--size", "128", "--steps", "2"],
                       capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    out = r.stdout
    assert r.returncode == 0, (out + r.stderr)[-4000:]
    assert "RANDOM WEIGHTS" in out  # said plainly
    assert "my-flux.safetensors" in out  # the user's folder was searched
    assert re.search(rf"UI: http://127\.0\.0\.1:{port}\b", out), out
    saved = re.findall(r"Image saved in [\d.]+ s: (.+\.png)", out)
    assert len(saved) == 1, out
    path = saved[0].strip()
    assert path.startswith(str(tmp_path / "base" / "output")) and os.path.isfile(path)
    with Image.open(path) as im:
        assert im.size == (128, 128)
