#!/usr/bin/env python3
"""Difficulty statistics of a data set (../shared/data layout), to calibrate `kvdex gen-synth`
against real vectors. Same split as `kvdex bench recall`: context [0, T-256), test queries
[T-256, T). One line per statistic, median over (layer, query head) with the min..max range.

    python3 benches/peers/calib.py --data ../shared/data/smollm2-code-8k

Statistics (per query head, test queries against the context):
- cos_mq_mk: cosine of the mean test query and the mean context key (out-of-distribution offset);
- knorm_p99_p50, qnorm_p99_p50: norm tails (99th percentile over median);
- sink_mass: softmax mass (logit q.k/sqrt(d)) on key 0; top100_mass: mass of the exact top-100;
- overlap10_l2_ip: |top-10 by inner product & top-10 by L2 distance| / 10 (1 = in distribution);
- recent512_top100: share of the exact top-100 within the last 512 context positions;
- pos_corr: median correlation of a query's scores with a key's position (recency trend);
- eff_rank_k: participation ratio of the key covariance's eigenvalues (anisotropy);
- tok_knn_l2_ip: share of the top-10 IP neighbours of a query that are also in the top-100 of the
  query that precedes it (how much consecutive queries share their targets).
"""
import argparse, json, os
import numpy as np


def stats_head(K, Q, d):
    out = {}
    mq, mk = Q.mean(0), K.mean(0)
    out["cos_mq_mk"] = float(mq @ mk / (np.linalg.norm(mq) * np.linalg.norm(mk) + 1e-12))
    kn, qn = np.linalg.norm(K, axis=1), np.linalg.norm(Q, axis=1)
    out["knorm_p99_p50"] = float(np.percentile(kn, 99) / np.median(kn))
    out["qnorm_p99_p50"] = float(np.percentile(qn, 99) / np.median(qn))
    S = Q @ K.T
    z = S / np.sqrt(d)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out["sink_mass"] = float(p[:, 0].mean())
    top100 = np.argpartition(-S, 99, axis=1)[:, :100]
    out["top100_mass"] = float(np.take_along_axis(p, top100, 1).sum(1).mean())
    n = K.shape[0]
    out["recent512_top100"] = float((top100 >= n - 512).mean())
    top10 = np.argpartition(-S, 9, axis=1)[:, :10]
    L2 = (kn ** 2)[None, :] - 2 * S
    l2top = np.argpartition(L2, 9, axis=1)[:, :10]
    out["overlap10_l2_ip"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10, l2top)]))
    pos = np.arange(n, dtype=np.float64)
    pc = [np.corrcoef(s, pos)[0, 1] for s in S]
    out["pos_corr"] = float(np.median(pc))
    ev = np.linalg.eigvalsh(np.cov(K.T))
    out["eff_rank_k"] = float(ev.sum() ** 2 / (ev ** 2).sum())
    share = [len(set(top10[i]) & set(top100[i - 1])) / 10 for i in range(1, len(top10))]
    out["next_query_share"] = float(np.mean(share))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    meta = json.load(open(os.path.join(a.data, "meta.json")))
    T, kvmap = meta["T"], meta["kv_head_of_q_head"]
    ctx = T - 256
    rows = []
    for l in meta["layers"]:
        K = np.load(os.path.join(a.data, f"K_L{l}.npy")).astype(np.float32)
        Q = np.load(os.path.join(a.data, f"Q_L{l}.npy")).astype(np.float32)
        d = K.shape[2]
        for h, g in enumerate(kvmap):
            rows.append(stats_head(K[g, :ctx], Q[h, ctx:T], d))
    keys = list(rows[0].keys())
    summary = {}
    for key in keys:
        v = np.array([r[key] for r in rows])
        summary[key] = (float(np.median(v)), float(v.min()), float(v.max()))
    if a.json:
        print(json.dumps({"data": a.data, "stats": summary}))
    else:
        for key, (m, lo, hi) in summary.items():
            print(f"{key:18s} median {m:8.3f}   range {lo:8.3f} .. {hi:8.3f}")


if __name__ == "__main__":
    main()
