"""Regenerate the parts of the docs that come from code: the check table in docs/data-format.md and
docs/validation-report.schema.json. Usage: python scripts/gen_docs.py (tests/test_docs.py checks them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qwenvl_cli.data.checks import catalogue_markdown
from qwenvl_cli.schemas import ValidationReport

DOCS = Path(__file__).resolve().parents[1] / "docs"
START, END = "<!-- checks:start -->", "<!-- checks:end -->"


def report_schema() -> str:
    return json.dumps(ValidationReport.model_json_schema(), indent=2, ensure_ascii=False) + "\n"


def with_catalogue(markdown: str) -> str:
    block = f"{START}\n{catalogue_markdown()}\n{END}"
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, markdown, flags=re.S)


def main() -> None:
    page = DOCS / "data-format.md"
    page.write_text(with_catalogue(page.read_text("utf-8")), "utf-8")
    (DOCS / "validation-report.schema.json").write_text(report_schema(), "utf-8")


if __name__ == "__main__":
    main()
