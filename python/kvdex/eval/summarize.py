"""``python -m kvdex.eval.summarize FILE...``: the table (or JSON rows) of ``--samples-out`` files.

For a run that was stopped early, or several runs of one setting (e.g. different seeds) to pool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

from . import report
from .methods import METHODS
from .runner import Outcome


def load(paths: Sequence[str]) -> List[Outcome]:
    """The outcomes in ``paths``; samples of a file whose methods did not all finish are dropped."""
    out: List[Outcome] = []
    for n, path in enumerate(paths):
        with open(path) as f:
            rows = [Outcome(**json.loads(line)) for line in f if line.strip()]
        methods = {o.method for o in rows}
        done = {(o.task, o.index) for o in rows
                if len({x.method for x in rows if (x.task, x.index) == (o.task, o.index)}) == len(methods)}
        # Several files may hold the same (task, index) (other seeds): keep them apart.
        out.extend(Outcome(**{**o.__dict__, "index": o.index + 100000 * n}) for o in rows
                   if (o.task, o.index) in done)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvdex.eval.summarize", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    outcomes = load(a.files)
    seen = {o.method for o in outcomes}
    data = report.rows(outcomes, [x for x in METHODS if x in seen])
    if a.json:
        for r in data:
            print(json.dumps(r))
    else:
        print(report.table(data))
    if a.plot:
        report.plot(data, a.plot, ", ".join(os.path.basename(f) for f in a.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
