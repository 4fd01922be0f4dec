"""BENCHMARKS.md quotes only figures that benches/results/ holds (scripts/benchmarks.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def benchmarks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks", REPO / "scripts" / "benchmarks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_page_matches_the_results(benchmarks: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmarks.main([]) == 0, capsys.readouterr().err


def test_a_figure_missing_from_its_record_is_named(
    benchmarks: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = (REPO / "BENCHMARKS.md").read_text()
    row = next(
        line for line in page.splitlines() if line.startswith("| 128K") and "decode.jsonl#vm-128k |" in line
    )
    wrong = row.replace("| 1.27 |", "| 1.29 |")
    assert wrong != row
    (tmp_path / "BENCHMARKS.md").write_text(page.replace(row, wrong))
    assert benchmarks.main(["--page", str(tmp_path / "BENCHMARKS.md")]) == 1
    assert "1.29 is not a figure of decode.jsonl#vm-128k" in capsys.readouterr().err


def test_a_record_without_command_or_known_machine_is_refused(
    benchmarks: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    shutil.copytree(REPO / "benches" / "results", results)
    bad = {"id": "x", "issue": 5, "machine": "laptop", "command": "", "figures": {"p50_ms": 1.0}}
    with (results / "decode.jsonl").open("a") as f:
        f.write(json.dumps(bad) + "\n")
    assert benchmarks.main(["--results", str(results)]) == 1
    err = capsys.readouterr().err
    assert "empty command" in err
    assert "machine 'laptop' is not in machines.json" in err


def test_numbers_glued_to_units_or_after_a_threshold_are_labels(benchmarks: ModuleType) -> None:
    cell = "128K: 1.27 ms, 6.4×, 1,615 rows, top1 0.977, ≥ 0.95, 8KiB 38%"
    quoted = [text for text, _, _ in benchmarks.quoted_numbers(cell)]
    assert quoted == ["1.27", "6.4", "1,615", "0.977", "38"]
