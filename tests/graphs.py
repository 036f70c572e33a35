"""API-format graphs the server tests post: stock ComfyUI nodes around the pack's nodes."""
from quantlora.tools.demo_models import DEMO_CLIP, DEMO_FLUX


def txt2img(model_node: dict, seed: int = 1, steps: int = 2, size: int = 64, prefix: str = "quantlora-test",
            decode: bool = True) -> dict:
    """model_node: the nodes that make the MODEL, ending in id "model" (output 0)."""
    g = dict(model_node)
    g.update({
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": DEMO_CLIP, "type": "stable_diffusion"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["clip", 0]}},
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 3.5}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["guided", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
    })
    if decode:
        g.update({
            "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "taef1"}},
            "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
            "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
        })
    return g


def loader(model_name: str = DEMO_FLUX, quantization: str = "none", compute_dtype: str = "auto") -> dict:
    return {"model": {"class_type": "QuantizedFluxLoader",
                      "inputs": {"model_name": model_name, "quantization": quantization, "compute_dtype": compute_dtype}}}
