"""The bundled demo data set: pictures of coloured shapes with colour, count and grounding questions.

`broken.jsonl` beside it holds one sample per common mistake (see the README's tour).
Regenerate both with `python scripts/make_demo_data.py`.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_DATA = DEMO_DIR / "train.json"
DEMO_BROKEN = DEMO_DIR / "broken.jsonl"
