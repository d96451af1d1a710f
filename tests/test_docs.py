"""The docs that are generated from code stay in step with it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from qwenvl_cli.data.checks import CHECKS

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
gen_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_docs)


def test_check_table_matches_catalogue():
    page = (ROOT / "docs" / "data-format.md").read_text("utf-8")
    assert gen_docs.with_catalogue(page) == page, "run: python scripts/gen_docs.py"
    for code in CHECKS:
        assert f"| `{code}` |" in page


def test_report_schema_is_current():
    on_disk = (ROOT / "docs" / "validation-report.schema.json").read_text("utf-8")
    assert on_disk == gen_docs.report_schema(), "run: python scripts/gen_docs.py"
    assert "findings" in json.loads(on_disk)["properties"]
