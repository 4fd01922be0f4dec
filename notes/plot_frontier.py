"""Recall@k vs scored fraction of every method in one or more JSONL files (kvdex bench recall
--json and benches/peers/peers.py output). Usage: python3 plot_frontier.py OUT.png A.jsonl ..."""
import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    out, files = sys.argv[1], sys.argv[2:]
    series = defaultdict(list)
    for f in files:
        for line in open(f):
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            series[r["method"]].append((r["scored_fraction"] * 100, r["recall_at_k"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, pts in sorted(series.items()):
        pts.sort()
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=m)
    ax.axhline(0.95, color="grey", ls=":", lw=1)
    ax.axvline(10, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("keys scored (% of context, log)")
    ax.set_ylabel("recall@100")
    ax.set_ylim(0, 1.01)
    ax.set_title("smollm2-code-8k layer 17, all heads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
