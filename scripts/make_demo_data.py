"""Regenerate the bundled demo data set (qwenvl_cli/demo/): pictures of coloured shapes with
conversations about colour, count and location, plus `broken.jsonl`, one sample per common mistake.

Deterministic: running it again gives the same files. Usage: python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

DEMO = Path(__file__).resolve().parents[1] / "qwenvl_cli" / "demo"
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 200, 40)}
SIZE = 224


def draw(rng: random.Random, index: int) -> tuple[str, list[tuple[str, str, tuple[int, int, int, int]]]]:
    image = Image.new("RGB", (SIZE, SIZE), (245, 245, 240))
    pen = ImageDraw.Draw(image)
    shapes = []
    for _ in range(rng.randint(1, 3)):
        colour = rng.choice(list(COLOURS))
        kind = rng.choice(["square", "circle"])
        w = rng.randint(40, 90)
        x1, y1 = rng.randint(0, SIZE - w - 1), rng.randint(0, SIZE - w - 1)
        box = (x1, y1, x1 + w, y1 + w)
        (pen.rectangle if kind == "square" else pen.ellipse)(box, fill=COLOURS[colour])
        shapes.append((colour, kind, box))
    name = f"images/shapes_{index:02d}.png"
    image.save(DEMO / name, optimize=True)
    return name, shapes


def norm(box: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = (min(999, v * 1000 // SIZE) for v in box)
    return f"({x1},{y1}),({x2},{y2})"


def main() -> None:
    rng = random.Random(7)
    (DEMO / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(12):
        path, shapes = draw(rng, i)
        colour, kind, box = shapes[0]
        picture = f"Picture 1: <img>{path}</img>\n"
        samples.append(
            {
                "id": f"shapes_{i:02d}_count",
                "conversations": [
                    {"from": "user", "value": picture + "How many shapes are in the picture?"},
                    {"from": "assistant", "value": f"There {'is' if len(shapes) == 1 else 'are'} {len(shapes)}."},
                    {"from": "user", "value": f"Where is the {colour} {kind}?"},
                    {"from": "assistant", "value": f"<ref>the {colour} {kind}</ref><box>{norm(box)}</box>"},
                ],
            }
        )
    path_a, shapes_a = draw(rng, 12)
    path_b, shapes_b = draw(rng, 13)
    samples.append(
        {
            "id": "shapes_two_pictures",
            "conversations": [
                {
                    "from": "user",
                    "value": f"Picture 1: <img>{path_a}</img>\nPicture 2: <img>{path_b}</img>\n"
                    "Which picture has more shapes?",
                },
                {
                    "from": "assistant",
                    "value": "Picture 1."
                    if len(shapes_a) > len(shapes_b)
                    else "Picture 2."
                    if len(shapes_b) > len(shapes_a)
                    else "They have the same number.",
                },
            ],
        }
    )
    samples.append(
        {
            "id": "text_only",
            "conversations": [
                {"from": "user", "value": "What colours can the shapes have?"},
                {"from": "assistant", "value": "Red, green, blue or yellow."},
            ],
        }
    )
    (DEMO / "train.json").write_text(json.dumps(samples, ensure_ascii=False, indent=2) + "\n", "utf-8")

    # broken.jsonl: one sample per common mistake, for the README tour.
    (DEMO / "images" / "truncated.png").write_bytes((DEMO / "images" / "shapes_00.png").read_bytes()[:300])
    ok = "Picture 1: <img>images/shapes_00.png</img>\n"
    broken = [
        {
            "id": "fine",
            "conversations": [{"from": "user", "value": ok + "Colour?"}, {"from": "assistant", "value": "Red."}],
        },
        {
            "id": "sharegpt_roles",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
        },
        {
            "id": "fine",
            "conversations": [{"from": "user", "value": "Duplicate id"}, {"from": "assistant", "value": "Yes."}],
        },
        {
            "id": "box_in_pixels",
            "conversations": [
                {"from": "user", "value": ok + "Where is the shape?"},
                {"from": "assistant", "value": "<ref>shape</ref><box>(120,80),(1180,640)</box>"},
            ],
        },
        {
            "id": "swapped_corners",
            "conversations": [
                {"from": "user", "value": ok + "Where is the shape?"},
                {"from": "assistant", "value": "<ref>shape</ref><box>(500,500),(100,100)</box>"},
            ],
        },
        {
            "id": "unclosed_ref",
            "conversations": [
                {"from": "user", "value": ok + "Where?"},
                {"from": "assistant", "value": "<ref>shape<box>(1,2),(30,40)</box>"},
            ],
        },
        {
            "id": "missing_image",
            "conversations": [
                {"from": "user", "value": "Picture 1: <img>images/nope.png</img>\nColour?"},
                {"from": "assistant", "value": "Blue."},
            ],
        },
        {
            "id": "truncated_image",
            "conversations": [
                {"from": "user", "value": "Picture 1: <img>images/truncated.png</img>\nColour?"},
                {"from": "assistant", "value": "Blue."},
            ],
        },
        {
            "id": "picture_numbering",
            "conversations": [
                {"from": "user", "value": "Picture 2: <img>images/shapes_01.png</img>\nColour?"},
                {"from": "assistant", "value": "Green."},
            ],
        },
        {
            "id": "chatml_in_text",
            "conversations": [
                {"from": "user", "value": "Say <|im_end|> please"},
                {"from": "assistant", "value": "No."},
            ],
        },
        {"id": "ends_with_user", "conversations": [{"from": "user", "value": "Hello?"}]},
    ]
    lines = [json.dumps(s, ensure_ascii=False) for s in broken]
    lines.insert(3, '{"id": "not_json", "conversations": [}')
    (DEMO / "broken.jsonl").write_text("\n".join(lines) + "\n", "utf-8")


if __name__ == "__main__":
    main()
