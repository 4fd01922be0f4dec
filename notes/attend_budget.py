"""Measures kvdex's adaptive budget (index/src/attend/budget.rs) on the real SmolLM2 Q/K data.

Mirrors the Rust algorithm exactly:
  static  = sinks S + recent window W (attended by the engine; lse known exactly)
  cands   = exact top max_k non-static logits (a flat index), sorted best first
  tail    = (N / m) * sum_{j in systematic sample of m non-static keys, s_j < s_min} exp(s_j)
  k       = smallest k in [min_k, max_k] with static + sum_{i<k} exp(s_i) >= p * (static + cands + tail)
and reports the chosen k and the TRUE covered mass (static + top-k) / (all causal keys).

Usage: python3 notes/attend_budget.py [DATA_DIR [SINKS WINDOW]]   (default 128 512)
"""
import json
import sys

import numpy as np

DATA = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/smollm2-code-8k"
S, W = (int(x) for x in (sys.argv[2:4] if len(sys.argv) > 3 else (128, 512)))
MIN_K, MAX_K, M = 16, 1024, 256
POSITIONS = np.linspace(2048, 8191, 24).astype(int)


def lse(x):
    if x.size == 0:
        return -np.inf
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


def systematic_sample(lo, hi, m):
    span = hi - lo
    m = min(m, span)
    step = span / max(m, 1)
    return lo + np.minimum(((np.arange(m) + 0.5) * step).astype(np.int64), span - 1)


def choose_k(cand, static_lse, tail_lse, p):
    m = max(cand[0] if cand.size else -np.inf, static_lse, tail_lse)
    rel = np.exp(cand.astype(np.float64) - m)
    stat, tail = np.exp(static_lse - m), np.exp(tail_lse - m)
    total = stat + rel.sum() + tail
    covered = stat + np.cumsum(rel)
    ok = np.nonzero(covered >= p * total)[0]
    k = (ok[0] + 1) if ok.size else cand.size
    return int(min(max(k, MIN_K), cand.size))


def main():
    meta = json.load(open(f"{DATA}/meta.json"))
    group = meta["cfg"]["n_head"] // meta["cfg"]["n_kv"]
    scale = 1.0 / np.sqrt(meta["cfg"]["hd"])
    print(f"S={S} W={W} min_k={MIN_K} max_k={MAX_K} sample m={M}; {len(POSITIONS)} query positions in 2048..8191")
    for layer in meta["layers"]:
        q_all = np.load(f"{DATA}/Q_L{layer}.npy").astype(np.float32)
        k_all = np.load(f"{DATA}/K_L{layer}.npy").astype(np.float32)
        rows = {p: [] for p in (0.9, 0.95)}
        tail_ratio, top100 = [], []
        for h in range(q_all.shape[0]):
            keys = k_all[h // group]
            logits_all = (q_all[h, POSITIONS] @ keys.T) * scale
            for qi, t in enumerate(POSITIONS):
                s = logits_all[qi, : t + 1].astype(np.float64)
                lo, hi = S, t + 1 - W  # non-static ids lo..hi
                stat = np.concatenate([s[:lo], s[hi:]])
                non = s[lo:hi]
                order = np.argsort(-non)
                cand = non[order[:MAX_K]]
                thr = cand[-1]
                samp = non[systematic_sample(lo, hi, M) - lo]
                below = samp[samp < thr]
                tail_est = lse(below) + np.log(non.size / samp.size) if below.size else -np.inf
                true_tail = lse(non[order[MAX_K:]])
                if np.isfinite(true_tail):
                    tail_ratio.append(np.exp(tail_est - true_tail) if np.isfinite(tail_est) else 0.0)
                total = lse(s)
                static_lse = lse(stat)
                top100.append(np.exp(np.logaddexp(static_lse, lse(cand[:100])) - total))
                for p in rows:
                    k = choose_k(cand, static_lse, tail_est, p)
                    covered = np.exp(np.logaddexp(static_lse, lse(cand[:k])) - total)
                    rows[p].append((k, covered))
        tr = np.array(tail_ratio)
        t100 = np.array(top100)
        print(f"\nlayer {layer}: tail estimate / true tail: median {np.median(tr):.2f}, p10 {np.percentile(tr, 10):.2f}, p90 {np.percentile(tr, 90):.2f}")
        print(f"  fixed k=100 (+static) true covered: min {t100.min():.3f} median {np.median(t100):.3f} max {t100.max():.3f}")
        for p, r in rows.items():
            ks = np.array([x[0] for x in r])
            cov = np.array([x[1] for x in r])
            print(
                f"  p={p}: k p10/p50/p90/max {np.percentile(ks, 10):.0f}/{np.median(ks):.0f}/{np.percentile(ks, 90):.0f}/{ks.max()}"
                f" mean {ks.mean():.0f}; at max_k {np.mean(ks == MAX_K):.0%};"
                f" true covered min {cov.min():.3f} p10 {np.percentile(cov, 10):.3f} median {np.median(cov):.3f};"
                f" >= p in {np.mean(cov >= p):.0%} (>= p-0.02 in {np.mean(cov >= p - 0.02):.0%})"
            )


if __name__ == "__main__":
    main()
