"""``python -m kvdex.eval``: long-context accuracy of full attention, kvdex and baselines, side by side.

Example::

    python -m kvdex.eval --model smollm2 --haystack hay.txt --context 8192 \\
        --tasks copy,passkey,niah --methods full,kvdex,kvdex-flat,streaming,oracle --samples 10 --json

Prints a table (or, with ``--json``, one JSON object per (task, method) per line) on stdout and a
progress bar on stderr. See :mod:`kvdex.eval` for the tasks, methods and fields.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from typing import Iterator, List, Optional, Sequence

from . import attention, methods as m, models, report
from .prompt import FORMATS, Haystack, resolve_format
from .runner import Outcome, Settings, run
from .tasks import TASKS


def _names(value: str, known: Sequence[str], what: str) -> List[str]:
    names = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in names if x not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--{what}: unknown {bad or value!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvdex.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=f"{' | '.join(models.MODELS)} | a model dir or .gguf file")
    p.add_argument("--haystack", required=True, help="a plain-text file the contexts are cut from")
    p.add_argument("--context", type=int, required=True, help="prompt length in tokens")
    p.add_argument("--tasks", type=lambda v: _names(v, TASKS, "tasks"), default=list(TASKS),
                   help=f"comma-separated, of {','.join(TASKS)} (default: all)")
    p.add_argument("--methods", type=lambda v: _names(v, m.METHODS, "methods"), default=list(m.METHODS),
                   help=f"comma-separated, of {','.join(m.METHODS)} (default: all)")
    p.add_argument("--samples", type=int, default=5, help="samples per task (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's own")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="chat template or plain text (auto: chat when the tokenizer has a template)")
    p.add_argument("--sinks", type=int, default=128, help="static first tokens (kvdex, oracle, streaming)")
    p.add_argument("--window", type=int, default=512, help="static recent tokens (kvdex, oracle)")
    p.add_argument("--budget", type=float, default=0.1,
                   help="attended fraction of streaming and oracle when no kvdex method runs (else kvdex's)")
    p.add_argument("--coverage", type=float, default=None, help="kvdex: adaptive budget's attention mass (default: kvdex.hf's)")
    p.add_argument("--max-k", type=int, default=None, help="kvdex: most tokens retrieved per head")
    p.add_argument("--min-k", type=int, default=None, help="kvdex: fewest tokens retrieved per head")
    p.add_argument("--k", type=int, default=None, help="kvdex: a fixed budget per head (instead of coverage)")
    p.add_argument("--daemon", default=None, help="a running kvdex daemon's URL (default: start one)")
    p.add_argument("--json", action="store_true", help="one JSON object per (task, method) per line")
    p.add_argument("--samples-out", default=None, help="also write every sample's outcome (JSON lines) here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.samples < 1:
        p.error("--samples must be >= 1")
    if not 0.0 < a.budget <= 1.0:
        p.error("--budget must be in (0, 1]")
    if not os.path.isfile(a.haystack):
        p.error(f"--haystack {a.haystack}: no such file")
    return a


@contextlib.contextmanager
def kvdex_client(a: argparse.Namespace) -> Iterator[Optional[m.KvdexOptions]]:
    """A client for the kvdex methods (None when none runs), on ``--daemon`` or a daemon started here."""
    if not any(x in m.KVDEX_METHODS for x in a.methods):
        yield None
        return
    why = m.hf_available()
    if why:
        raise SystemExit(f"--methods {','.join(a.methods)}: {why}")
    import kvdex

    def opts(client: object) -> m.KvdexOptions:
        return m.KvdexOptions(client=client, sinks=a.sinks, window=a.window, coverage=a.coverage, max_k=a.max_k,
                              min_k=a.min_k, k=a.k)

    if a.daemon:
        yield opts(kvdex.connect(a.daemon))
        return
    with kvdex.Daemon(env={"KVDEX_LOG": "warn"}) as d:
        yield opts(kvdex.connect(d.url))


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that a daemon started here is stopped.
    before = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return evaluate(a)
    finally:
        signal.signal(signal.SIGTERM, before)


def evaluate(a: argparse.Namespace) -> int:
    """Runs the evaluation that ``a`` describes and prints its rows."""
    import torch
    from tqdm import tqdm

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tokenizer = models.load(a.model, attention.register())
    with open(a.haystack, encoding="utf-8", errors="replace") as f:
        hay = Haystack(f.read(), tokenizer)
    s = Settings(tasks=a.tasks, methods=a.methods, context=a.context, samples=a.samples, seed=a.seed,
                 fmt=resolve_format(a.format, tokenizer), budget=a.budget, sinks=a.sinks, window=a.window,
                 max_new_tokens=a.max_new_tokens)
    samples_out = open(a.samples_out, "w") if a.samples_out else None

    def progress(o: Outcome) -> None:
        bar.set_postfix_str(f"{o.task} #{o.index} {o.method} {'solved' if o.solved else 'failed'}")
        bar.update()
        if samples_out:
            samples_out.write(json.dumps(o.__dict__) + "\n")
            samples_out.flush()

    with kvdex_client(a) as kv, tqdm(total=len(a.tasks) * a.samples * len(a.methods), file=sys.stderr,
                                     desc="decodes") as bar:
        s.kvdex = kv
        outcomes = run(model, tokenizer, hay, s, progress=progress)
    if samples_out:
        samples_out.close()
    data = report.rows(outcomes, a.methods)
    for r in data:
        r.update(model=a.model, format=s.fmt, seed=a.seed)
    if a.json:
        for r in data:
            print(json.dumps(r))
    else:
        print(report.table(data))
    if a.plot:
        report.plot(data, a.plot, f"{a.model}, {a.context} tokens, {a.samples} samples per task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
