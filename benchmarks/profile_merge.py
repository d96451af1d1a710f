"""Merge `qwenvl profile` JSON files (one per method, as benchmarks/gpu_profile_7b.sh writes them) into one
result, and write it as JSON, Markdown and a PNG chart.

    python benchmarks/profile_merge.py gpu-profile/profile-*.json --output benchmarks/results/profile-h100-7b.json \\
        --markdown docs/profile-h100-7b.md --plot docs/images/profile-h100-7b.png

Cells of the same method and length keep the first file's; baseline cells and ratios are taken as they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl_cli.profile import ProfileResult
from qwenvl_cli.render.profile import profile_markdown, profile_png


def merge(results: list[ProfileResult]) -> ProfileResult:
    first = results[0]
    cells, baseline, ratios = [], [], []
    for result in results:
        for cell in result.cells:
            if not any(c.method == cell.method and c.length == cell.length for c in cells):
                cells.append(cell)
        baseline += result.baseline_cells
        ratios += result.ratios
    methods = list(dict.fromkeys(m for r in results for m in r.methods))
    lengths = sorted({n for r in results for n in r.lengths})
    notes = list(dict.fromkeys(n for r in results for n in r.notes))
    return first.model_copy(
        update={
            "methods": methods,
            "lengths": lengths,
            "cells": cells,
            "baseline_cells": baseline,
            "ratios": ratios,
            "notes": notes,
            "baseline": "upstream" if baseline else None,
            "total_seconds": round(sum(r.total_seconds for r in results), 1),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    merged = merge([ProfileResult.model_validate_json(path.read_text("utf-8")) for path in args.files])
    args.output.write_text(merged.model_dump_json(indent=2) + "\n", "utf-8")
    if args.markdown:
        args.markdown.write_text(profile_markdown(merged), "utf-8")
    if args.plot:
        profile_png(merged, args.plot)
    print(f"merged {len(args.files)} files: {len(merged.cells)} cells, {len(merged.baseline_cells)} baseline cells")


if __name__ == "__main__":
    main()
