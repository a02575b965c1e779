"""bench/report.py: the docs' tables are the JSON results, and the check catches a stale one."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
report = sys.modules["bench_report"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(report)


def test_committed_docs_match_the_results():
    stale = report.run(check=True)
    assert stale == [], f"tables stale in {stale}: run `python bench/report.py`"


def test_every_table_is_in_the_docs_and_every_results_file_has_a_table():
    placed = {m[2] for doc in report.DOCS for m in report.MARKER.finditer((ROOT / doc).read_text())}
    assert set(report.TABLES) <= placed, f"in no doc: {set(report.TABLES) - placed}"
    covered = {f.name for t in report.TABLES.values() for pat in t.sources
               for f in (ROOT / report.RESULTS).glob(pat)}
    assert {f.name for f in (ROOT / report.RESULTS).glob("*.json")} <= covered, "a results file has no Table"


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "results" / "tree_replay.json", tmp_path / "bench" / "results")
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- report:tree_replay -->\nhand-typed\n<!-- /report -->\n"
                   "<!-- report:voice_latency -->\n<!-- /report -->\nend\n")
    return tmp_path, doc


def test_check_reports_a_stale_table_and_writing_fixes_it(tree):
    root, doc = tree
    assert report.run(root, ("doc.md",), check=True) == ["doc.md"]
    assert "hand-typed" in doc.read_text()  # --check changes nothing
    assert report.run(root, ("doc.md",)) == ["doc.md"]
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n")
    assert "| code | 1.79 |" in text and "`python bench/tree_replay.py`" in text
    assert "_No results yet: `python bench/voice_latency.py`" in text  # absent file: says how to make it
    assert report.run(root, ("doc.md",), check=True) == []

    data = json.loads((root / "bench/results/tree_replay.json").read_text())
    data["tau"]["code"]["chain"] = 1.5
    (root / "bench/results/tree_replay.json").write_text(json.dumps(data))
    assert report.run(root, ("doc.md",), check=True) == ["doc.md"]  # new numbers: the table is stale


def test_an_unknown_table_name_is_an_error(tree):
    root, doc = tree
    doc.write_text("<!-- report:no_such_table -->\n<!-- /report -->\n")
    with pytest.raises(ValueError, match="no_such_table"):
        report.run(root, ("doc.md",), check=True)


def test_a_list_of_rows_renders_one_column_per_field():
    lines = report.rows_table([("x.json", {"profile": "coder", "rows": [
        {"method": "ar", "v2v": {"p50_ms": 900.0}}, {"method": "domino", "v2v": {"p50_ms": 812.5}, "tau": 2.0}]})])
    assert lines[0] == "`x.json`: profile coder."
    assert lines[2] == "| method | v2v p50_ms | tau |"
    assert lines[4:] == ["| ar | 900.00 | - |", "| domino | 812.50 | 2.00 |"]
