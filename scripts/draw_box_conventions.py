#!/usr/bin/env python
"""Draw docs/images/box-conventions.png: one box on one 1000×750 picture, as each Qwen generation sees the
picture and writes the box (docs/families.md, section 4).

Each panel shows the picture at the size the model receives it, with axes in that family's coordinate system:
relative 0–1000 for Qwen-VL, Qwen2-VL and Qwen3-VL (the same numbers whatever the resize), absolute pixels of
the smart-resized picture for Qwen2.5-VL (numbers that change with max_pixels). The resize is transformers'
own `smart_resize`.

    python scripts/draw_box_conventions.py [--output docs/images/box-conventions.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

W, H = 1000, 750
BOX = (200, 150, 600, 525)  # x1, y1, x2, y2 in the original picture's pixels
ROOT = Path(__file__).resolve().parents[1]


def picture() -> Image.Image:
    image = Image.new("RGB", (W, H), (236, 240, 244))
    pen = ImageDraw.Draw(image)
    pen.rectangle((0, 560, W, H), fill=(200, 214, 190))  # a floor
    pen.ellipse((200, 150, 600, 525), fill=(214, 60, 60))  # the object the box encloses
    pen.ellipse((720, 80, 900, 260), fill=(250, 200, 60))
    return image


def relative(box: tuple[int, int, int, int]) -> list[int]:
    x1, y1, x2, y2 = box
    return [round(x1 / W * 1000), round(y1 / H * 1000), round(x2 / W * 1000), round(y2 / H * 1000)]


def panels() -> list[dict]:
    n = relative(BOX)
    h25, w25 = smart_resize(H, W, factor=28, min_pixels=16 * 28 * 28, max_pixels=576 * 28 * 28)
    a = [round(BOX[0] * w25 / W), round(BOX[1] * h25 / H), round(BOX[2] * w25 / W), round(BOX[3] * h25 / H)]
    h2, w2 = smart_resize(H, W, factor=28, min_pixels=3136, max_pixels=12845056)
    h3, w3 = smart_resize(H, W, factor=32, min_pixels=65536, max_pixels=16777216)
    return [
        {
            "title": "Qwen-VL: sees 448×448 (stretched), [0,1000)",
            "size": (448, 448),
            "scale": (1000, 1000),
            "box": n,
            "text": f"<ref>the ball</ref><box>({n[0]},{n[1]}),({n[2]},{n[3]})</box>",
        },
        {
            "title": f"Qwen2-VL: sees {w2}×{h2}, relative 0–1000",
            "size": (w2, h2),
            "scale": (1000, 1000),
            "box": n,
            "text": f"<|box_start|>({n[0]},{n[1]}),({n[2]},{n[3]})<|box_end|>",
        },
        {
            "title": f"Qwen2.5-VL: sees {w25}×{h25} (max_pixels 451,584), its pixels",
            "size": (w25, h25),
            "scale": (w25, h25),
            "box": a,
            "text": '{"bbox_2d": [' + ", ".join(map(str, a)) + '], "label": "the ball"}',
        },
        {
            "title": f"Qwen3-VL: sees {w3}×{h3}, relative 0–1000",
            "size": (w3, h3),
            "scale": (1000, 1000),
            "box": n,
            "text": '{"bbox_2d": [' + ", ".join(map(str, n)) + '], "label": "the ball"}',
        },
    ]


def draw(output: Path) -> Path:
    source = picture()
    figure = Figure(figsize=(12, 9.6), dpi=100, layout="constrained")
    axes = figure.subplots(2, 2)
    for ax, panel in zip(axes.flat, panels(), strict=True):
        seen = source.resize(panel["size"], Image.Resampling.BICUBIC)
        sx, sy = panel["scale"]
        ax.imshow(seen, extent=(0, sx, sy, 0), aspect="auto")
        x1, y1, x2, y2 = panel["box"]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="#1d4ed8", linewidth=2.5))
        ax.set_xlim(0, sx)
        ax.set_ylim(sy, 0)
        ax.set_title(panel["title"], fontsize=11, loc="left")
        ax.set_xlabel(panel["text"], fontsize=10, family="monospace", color="#1d4ed8")
        ax.tick_params(labelsize=8)
    figure.suptitle(
        "One box, x 200–600 and y 150–525 on a 1000×750 picture, in each generation's answer",
        fontsize=13,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images" / "box-conventions.png")
    print(draw(parser.parse_args().output))
