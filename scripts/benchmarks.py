#!/usr/bin/env python3
"""Check BENCHMARKS.md against benches/results/, or list the results.

BENCHMARKS.md quotes figures; benches/results/<area>.jsonl holds them as data, one record per
line (see benches/results/README.md). This script checks that:

- every record is well formed: a unique `id`, an `issue`, a `machine` named in
  machines.json, the exact `command` that made it, and numeric `figures`;
- every table row of BENCHMARKS.md whose table has a "figure" and a "source" column names
  existing records in its source cell (`decode.jsonl#vm-128k`), and every number in its
  figure cells is one of those records' figures, as rounded in the text. Figure cells are all
  cells but those of the columns in LABEL_COLUMNS (issue, target, status, ...).

A number in a figure cell counts only when it stands alone: `1.27 ms`, `6.4×`, `38%` and
`1,615` are checked; `128K`, `8KiB`, `L192` and `top1` are labels, and a number after `≥`,
`≤`, `<` or `>` is a threshold: those are not checked. Signs are ignored (`−0.008` is checked
against -0.008).

    python3 scripts/benchmarks.py [--check]   # check; exit 1 and name each problem otherwise
    python3 scripts/benchmarks.py --list decode.jsonl   # the records' figures, to write a row
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("id", "issue", "machine", "command", "figures")
# A number not glued to a word: "1.27", "1,615", "38" in "38%"; not "128K", "L192", "p99".
NUMBER = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w.]|,\d)")
THRESHOLD = re.compile(r"[≥≤<>]\s*$")
# Columns whose numbers are labels or targets, not measured figures.
LABEL_COLUMNS = frozenset({"issue", "target", "status", "source", "context", "machine"})
REF = re.compile(r"([\w-]+\.jsonl)#([\w.-]+)")


@dataclass(frozen=True)
class Record:
    file: str
    id: str
    figures: dict[str, object]


def figure_values(figures: dict[str, object]) -> list[float]:
    """Every number among a record's figures (a range or list gives each of its members)."""
    out: list[float] = []
    for value in figures.values():
        items = value if isinstance(value, list) else [value]
        out.extend(float(v) for v in items if isinstance(v, (int, float)) and not isinstance(v, bool))
    return out


def load_results(results: Path, problems: list[str]) -> dict[tuple[str, str], Record]:
    machines_path = results / "machines.json"
    machines: dict[str, str] = json.loads(machines_path.read_text()) if machines_path.exists() else {}
    if not machines:
        problems.append(f"{machines_path}: missing or empty")
    records: dict[tuple[str, str], Record] = {}
    for path in sorted(results.glob("*.jsonl")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: not JSON ({e})")
                continue
            missing = [k for k in REQUIRED if k not in rec]
            if missing:
                problems.append(f"{where}: missing {', '.join(missing)}")
                continue
            if not isinstance(rec["command"], str) or not rec["command"].strip():
                problems.append(f"{where}: empty command")
            if rec["machine"] not in machines:
                problems.append(f"{where}: machine {rec['machine']!r} is not in machines.json")
            figures = rec["figures"]
            if not isinstance(figures, dict) or not figure_values(figures):
                problems.append(f"{where}: figures must be an object holding numbers")
                continue
            key = (path.name, str(rec["id"]))
            if key in records:
                problems.append(f"{where}: id {rec['id']!r} used twice in {path.name}")
            records[key] = Record(path.name, str(rec["id"]), figures)
    return records


def quoted_numbers(cell: str) -> list[tuple[str, float, int]]:
    """(text, value, decimals) of each stand-alone number in a table cell."""
    out = []
    for m in NUMBER.finditer(cell):
        if THRESHOLD.search(cell[: m.start()]):
            continue
        whole, frac = m.group(1), m.group(2) or ""
        text = whole + frac
        out.append((text, float(whole.replace(",", "") + frac), len(frac) - 1 if frac else 0))
    return out


def matches(value: float, decimals: int, figures: list[float]) -> bool:
    return any(abs(abs(round(f, decimals)) - value) < 1e-9 for f in figures)


def split_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def check_page(page: Path, records: dict[tuple[str, str], Record], problems: list[str]) -> int:
    """Check every row of the tables with a figure and a source column; return the rows checked."""
    rows = 0
    header: list[str] | None = None
    for lineno, line in enumerate(page.read_text().splitlines(), 1):
        if not line.lstrip().startswith("|"):
            header = None
            continue
        cells = split_row(line)
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        if "figure" not in header or "source" not in header:
            continue
        if len(cells) != len(header):
            problems.append(f"{page.name}:{lineno}: {len(cells)} cells, header has {len(header)}")
            continue
        rows += 1
        figure_cells = [c for name, c in zip(header, cells) if name not in LABEL_COLUMNS]
        refs = REF.findall(cells[header.index("source")])
        if not refs:
            problems.append(f"{page.name}:{lineno}: no file#id in the source cell")
            continue
        known = [records.get(ref) for ref in refs]
        for ref, rec in zip(refs, known):
            if rec is None:
                problems.append(f"{page.name}:{lineno}: no record {ref[0]}#{ref[1]}")
        values = [v for rec in known if rec is not None for v in figure_values(rec.figures)]
        for text, value, decimals in (q for cell in figure_cells for q in quoted_numbers(cell)):
            if not matches(value, decimals, values):
                names = ", ".join(f"{f}#{i}" for f, i in refs)
                problems.append(f"{page.name}:{lineno}: {text} is not a figure of {names}")
    return rows


def list_records(records: dict[tuple[str, str], Record], file: str) -> None:
    for (f, rid), rec in records.items():
        if f == file:
            figs = ", ".join(f"{k} {v}" for k, v in rec.figures.items())
            print(f"{f}#{rid}: {figs}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--page", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--results", type=Path, default=ROOT / "benches" / "results")
    ap.add_argument("--check", action="store_true", help="check the page and the records (the default)")
    ap.add_argument("--list", metavar="FILE", help="print the records of one results file instead")
    args = ap.parse_args(argv)
    problems: list[str] = []
    records = load_results(args.results, problems)
    if args.list:
        list_records(records, args.list)
        return 0
    rows = check_page(args.page, records, problems)
    if rows == 0:
        problems.append(f"{args.page.name}: no table with a figure and a source column")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {len(records)} records, {rows} rows of {args.page.name} checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
