#!/usr/bin/env python3
"""Peer baselines for `kvdex bench recall`: faiss HNSW and IVF on the same data and split.

Same split as kvdex (context [0, T-256), test queries [T-256, T)), same aggregation over every
layer and head, and the same JSON fields per line, so kvdex and peers land in one table.
faiss HNSW indexes keys with the MIPS->L2 extra coordinate (as kvdex's hnsw backend); IVF uses
the inner-product metric directly. scored_fraction counts keys whose distance was computed:
for IVF the sizes of the probed lists, for HNSW faiss's `hnsw_stats.ndis`.

    pip install -r benches/peers/requirements.txt
    python benches/peers/peers.py --data ../shared/data/smollm2-code-8k --sweep
"""
import argparse, json, os, time
import numpy as np
import faiss


def load(dirp):
    meta = json.load(open(os.path.join(dirp, "meta.json")))
    return meta


def truth(keys, q, k):
    s = keys @ q
    top = np.argpartition(-s, k - 1)[:k]
    z = s / np.sqrt(keys.shape[1])
    p = np.exp(z - z.max())
    p /= p.sum()
    return set(top.tolist()), p, p[top].sum()


def agg_line(method, params, recs, mr, mc, sf, search_s, build_s, mem):
    r = np.sort(np.array(recs))
    return {
        "method": method, "params": params,
        "recall_at_k": float(r.mean()), "recall_p10": float(r[len(r) // 10]),
        "mass_recall": float(np.mean(mr)), "mass_covered": float(np.mean(mc)),
        "scored_fraction": float(np.mean(sf)), "qps": len(r) / max(search_s, 1e-9),
        "build_s": build_s, "memory_bytes": int(mem),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--methods", default="hnsw,ivf")
    ap.add_argument("--layers", default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    a = ap.parse_args()
    faiss.omp_set_num_threads(1)
    meta = load(a.data)
    T, k = meta["T"], a.k
    ctx = T - 256
    layers = [int(x) for x in a.layers.split(",")] if a.layers else meta["layers"]
    kvmap = meta["kv_head_of_q_head"]
    n_kv = max(kvmap) + 1
    hnsw_efs = [int(k * f) for f in (1, 1.5, 2, 3, 4, 6, 8, 12)] if a.sweep else [200]
    ivf_probes = [1, 2, 4, 8, 16, 24, 32, 48, 64] if a.sweep else [16]
    methods = a.methods.split(",")
    res = {}  # (method, setting) -> lists
    def acc(key):
        return res.setdefault(key, {"recs": [], "mr": [], "mc": [], "sf": [], "s": 0.0, "b": 0.0, "mem": 0})
    for l in layers:
        K = np.load(os.path.join(a.data, f"K_L{l}.npy")).astype(np.float32)
        Q = np.load(os.path.join(a.data, f"Q_L{l}.npy")).astype(np.float32)
        for g in range(a.kv_heads or n_kv):
            keys = np.ascontiguousarray(K[g, :ctx])
            n, d = keys.shape
            heads = [h for h in range(len(kvmap)) if kvmap[h] == g]
            tests = [(Q[h, q], truth(keys, Q[h, q], k)) for h in heads for q in range(ctx, T)]
            qs = np.stack([t[0] for t in tests])
            if "hnsw" in methods:
                n2 = (keys ** 2).sum(1)
                aug = np.hstack([keys, np.sqrt(n2.max() - n2)[:, None]]).astype(np.float32)
                t0 = time.time()
                idx = faiss.IndexHNSWFlat(d + 1, 32)
                idx.hnsw.efConstruction = 200
                idx.add(aug)
                bs = time.time() - t0
                qa = np.hstack([qs, np.zeros((len(qs), 1), np.float32)])
                for ef in hnsw_efs:
                    idx.hnsw.efSearch = ef
                    st = acc(("faiss-hnsw", ef))
                    faiss.cvar.hnsw_stats.reset()
                    t0 = time.time()
                    _, I = idx.search(qa, k)
                    st["s"] += time.time() - t0
                    nd = faiss.cvar.hnsw_stats.ndis
                    st["b"] += bs
                    st["mem"] += n * ((d + 1) * 4 + 2 * 32 * 4)
                    for (q, (top, p, tm)), ids in zip(tests, I):
                        ids = ids[ids >= 0]
                        st["recs"].append(len(top.intersection(ids.tolist())) / k)
                        m = p[ids].sum()
                        st["mr"].append(min(m / tm, 1.0)); st["mc"].append(m)
                        st["sf"].append(nd / len(tests) / n)
            if "ivf" in methods:
                nlist = int(4 * np.sqrt(n))
                t0 = time.time()
                quant = faiss.IndexFlatIP(d)
                idx = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
                idx.train(keys)
                idx.add(keys)
                bs = time.time() - t0
                sizes = np.array([idx.invlists.list_size(i) for i in range(nlist)])
                for npb in ivf_probes:
                    idx.nprobe = npb
                    st = acc(("faiss-ivf", npb))
                    t0 = time.time()
                    _, I = idx.search(qs, k)
                    st["s"] += time.time() - t0
                    _, probed = quant.search(qs, npb)
                    st["b"] += bs
                    st["mem"] += n * 8 + nlist * d * 4
                    for (q, (top, p, tm)), ids, pr in zip(tests, I, probed):
                        ids = ids[ids >= 0]
                        st["recs"].append(len(top.intersection(ids.tolist())) / k)
                        m = p[ids].sum()
                        st["mr"].append(min(m / tm, 1.0)); st["mc"].append(m)
                        st["sf"].append((sizes[pr].sum() + nlist) / n)
    for (m, s), st in res.items():
        params = {"k": k, "M": 32, "ef_construction": 200, "ef": s} if m == "faiss-hnsw" else {"k": k, "nlist": "4*sqrt(n)", "nprobe": s}
        print(json.dumps(agg_line(m, params, st["recs"], st["mr"], st["mc"], st["sf"], st["s"], st["b"], st["mem"])))


if __name__ == "__main__":
    main()
