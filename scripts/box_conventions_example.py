"""Numbers for families.md: one box on one 1000x750 picture in each family's convention, computed with the
smart_resize that transformers 5.25 ships (transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py).

Run: . /work/main/.venv/bin/activate && python worked_example.py
"""

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

W, H = 1000, 750  # picture width x height in pixels
BOX = (200, 150, 600, 525)  # x1, y1, x2, y2 in original pixels


def rel1000(box, w, h):
    x1, y1, x2, y2 = box
    return [round(x1 / w * 1000), round(y1 / h * 1000), round(x2 / w * 1000), round(y2 / h * 1000)]


def to_resized(box, w, h, rw, rh):
    x1, y1, x2, y2 = box
    return [round(x1 * rw / w), round(y1 * rh / h), round(x2 * rw / w), round(y2 * rh / h)]


def tokens(rw, rh, patch, merge=2):
    return (rh // patch) * (rw // patch) // merge**2


print(f"picture {W}x{H} (WxH), box {BOX}")
n = rel1000(BOX, W, H)
print(f"v1 / Qwen2-VL / Qwen3-VL relative 0-1000: {n}")

budgets = {
    "transformers class default (min 56*56, max 28*28*1280)": (56 * 56, 28 * 28 * 1280),
    "Qwen2.5-VL-7B-Instruct preprocessor_config / qwen-vl-utils (min 4*28*28, max 16384*28*28)": (3136, 12845056),
    "qwen-vl-finetune argument.py default (min 16*28*28, max 576*28*28)": (16 * 28 * 28, 576 * 28 * 28),
    "qwen-vl-finetune scripts/sft*.sh (min 784, max 50176)": (784, 50176),
}
for name, (lo, hi) in budgets.items():
    rh, rw = smart_resize(H, W, factor=28, min_pixels=lo, max_pixels=hi)
    a = to_resized(BOX, W, H, rw, rh)
    back = [round(a[0] * W / rw), round(a[1] * H / rh), round(a[2] * W / rw), round(a[3] * H / rh)]
    print(
        f"Qwen2.5-VL @ {name}: resized {rw}x{rh}, {tokens(rw, rh, 14)} picture tokens, "
        f"bbox_2d {a}, back to original {back}, as 0-1000 {rel1000(a, rw, rh)}"
    )

for name, (lo, hi) in {
    "Qwen3-VL preprocessor_config (shortest 65536, longest 16777216)": (65536, 16777216),
    "Qwen3-VL README example (256*32*32 .. 1280*32*32)": (256 * 32 * 32, 1280 * 32 * 32),
}.items():
    rh, rw = smart_resize(H, W, factor=32, min_pixels=lo, max_pixels=hi)
    print(f"Qwen3-VL @ {name}: resized {rw}x{rh}, {tokens(rw, rh, 16)} picture tokens; box stays {n}")

rh, rw = smart_resize(H, W, factor=28, min_pixels=3136, max_pixels=12845056)
print(
    f"Qwen2-VL @ Qwen2-VL-7B-Instruct preprocessor_config: resized {rw}x{rh}, {tokens(rw, rh, 14)} tokens; box stays {n}"  # noqa: E501
)
print(f"Qwen-VL v1: fixed 448x448, 256 tokens (+ <img></img>); box stays {n}")
