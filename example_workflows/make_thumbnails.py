"""Draws the Templates dialog thumbnails (<name>.jpg): title, one-line description and the pipeline
of each example, in its own colour. Titles and descriptions: web/templates.json.
Run: .venv/bin/python example_workflows/make_thumbnails.py"""
import json
import os
import textwrap

from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
META = json.load(open(os.path.join(HERE, "..", "web", "templates.json")))
PIPES = {
    "flux-nf4-lora": ("#2e7d5b", ["Flux loader\nNF4 4-bit", "LoRA\nhot-swap", "KSampler", "image"]),
    "flux-fp8-compile-lora-hotswap": ("#8a4fbf", ["Flux loader\nfp8 + compile", "LoRA slots\nno recompile", "KSampler", "image"]),
    "flux-low-vram-fp8-offload": ("#c0612b", ["Flux loader", "FP8 cast\nlayerwise", "KSampler\nCPU offload", "image"]),
    "flux-lora-ab-compare": ("#2b6cb0", ["Flux loader\nquantized", "LoRA A | LoRA B", "2 x KSampler\nsame seed", "A | B"]),
}
W, H = 512, 384


def font(size, bold=False):
    for name in (("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"),):
        for d in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu"):
            p = os.path.join(d, name)
            if os.path.exists(p):
                return ImageFont.truetype(p, size)
    return ImageFont.load_default()


def draw(name):
    color, steps = PIPES[name]
    meta = META[name]
    im = Image.new("RGB", (W, H), "#1b1d22")
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, W, 10], fill=color)
    y = 28
    for line in textwrap.wrap(meta["title"], 26):
        d.text((24, y), line, font=font(28, True), fill="#ffffff")
        y += 36
    y += 6
    for line in textwrap.wrap(meta["description"], 46)[:3]:
        d.text((24, y), line, font=font(16), fill="#c8c8d0")
        y += 22
    # the pipeline, left to right
    top, bh, n = 260, 76, len(steps)
    gap = 22
    bw = (W - 48 - gap * (n - 1)) // n
    for i, s in enumerate(steps):
        x = 24 + i * (bw + gap)
        d.rounded_rectangle([x, top, x + bw, top + bh], radius=10, fill="#2a2d35", outline=color, width=3)
        lines = s.split("\n")
        f = font(13, True)
        ty = top + bh / 2 - 9 * len(lines)
        for ln in lines:
            tw = d.textlength(ln, font=f)
            d.text((x + (bw - tw) / 2, ty), ln, font=f, fill="#ffffff")
            ty += 18
        if i < n - 1:
            ax = x + bw + 3
            d.polygon([(ax, top + bh / 2 - 7), (ax + gap - 6, top + bh / 2), (ax, top + bh / 2 + 7)], fill=color)
    d.text((24, H - 30), "QuantLoRA", font=font(14, True), fill=color)
    im.save(os.path.join(HERE, f"{name}.jpg"), quality=88)


if __name__ == "__main__":
    for name in PIPES:
        draw(name)
