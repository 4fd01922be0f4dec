"""Aggregating outcomes per (task, method): the JSON rows, the table and the plot."""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence

from .runner import Outcome

#: The fields every JSON row has (more may follow).
FIELDS = ("task", "method", "context", "samples", "accuracy", "full_solved", "solved_of_full",
          "attended_fraction", "decode_tokens_per_s", "prefill_s", "index_ready_s")


def _mean(xs: Sequence[float]) -> Optional[float]:
    return statistics.fmean(xs) if xs else None


def rows(outcomes: Sequence[Outcome], methods: Sequence[str]) -> List[Dict[str, Any]]:
    """One dict per (task, method), tasks in run order and methods in ``methods`` order.

    ``full_solved`` and ``solved_of_full`` are None when ``full`` did not run; ``solved_of_full``
    is also None when full attention solved no sample.
    """
    tasks = list(dict.fromkeys(o.task for o in outcomes))
    full = {(o.task, o.index) for o in outcomes if o.method == "full" and o.solved}
    ran_full = any(o.method == "full" for o in outcomes)
    out = []
    for task in tasks:
        for method in methods:
            mine = [o for o in outcomes if o.task == task and o.method == method]
            if not mine:
                continue
            solved = {(o.task, o.index) for o in mine if o.solved}
            full_here = {k for k in full if k[0] == task}
            secs = sum(o.decode_s for o in mine)
            ready = [o.index_ready_s for o in mine if o.index_ready_s is not None]
            out.append({
                "task": task,
                "method": method,
                "context": round(statistics.fmean(o.context for o in mine)),
                "samples": len(mine),
                "accuracy": len(solved) / len(mine),
                "full_solved": len(full_here) if ran_full else None,
                "solved_of_full": len(solved & full_here) / len(full_here) if full_here else None,
                "attended_fraction": statistics.fmean(o.attended_fraction for o in mine),
                "decode_tokens_per_s": sum(o.decode_tokens for o in mine) / secs if secs > 0 else None,
                "prefill_s": statistics.fmean(o.prefill_s for o in mine),
                "index_ready_s": _mean(ready),
                "solved": len(solved),
            })
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(data: Sequence[Dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    head = f"{'task':<11}{'method':<11}{'context':>8}{'solved':>9}{'acc':>6}{'of_full':>8}{'attended':>9}" \
           f"{'tok/s':>7}{'prefill_s':>10}{'ready_s':>8}"
    lines = [head, "-" * len(head)]
    for r in data:
        lines.append(
            f"{r['task']:<11}{r['method']:<11}{r['context']:>8}{str(r['solved']) + '/' + str(r['samples']):>9}"
            f"{r['accuracy']:>6.2f}{_fmt(r['solved_of_full'], '.2f'):>8}{r['attended_fraction']:>9.3f}"
            f"{_fmt(r['decode_tokens_per_s'], '.1f'):>7}{r['prefill_s']:>10.1f}{_fmt(r['index_ready_s'], '.2f'):>8}"
        )
    return "\n".join(lines)


def plot(data: Sequence[Dict[str, Any]], path: str, title: str) -> None:
    """A PNG of two panels, accuracy and solved_of_full: per task, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in data))
    methods = list(dict.fromkeys(r["method"] for r in data))
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(tasks)), 4), sharey=True)
    for ax, key in zip(axes, ("accuracy", "solved_of_full")):
        for j, method in enumerate(methods):
            xs, ys = [], []
            for i, task in enumerate(tasks):
                r = next((r for r in data if r["task"] == task and r["method"] == method), None)
                if r is not None and r[key] is not None:
                    xs.append(i + j * width)
                    ys.append(r[key])
            frac = next((r["attended_fraction"] for r in data if r["method"] == method), 0.0)
            ax.bar(xs, ys, width, label=f"{method} ({frac:.0%} attended)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
        ax.set_title(key)
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
