//! The measurement: exact answers (top-k and the softmax attention mass) per test query,
//! each variant built and searched on a group, and the figures accumulated per (method,
//! setting).

use std::time::Instant;

use kvdex_index::keys::KeyRows;
use kvdex_index::qgraph::build::build as build_graph;
use kvdex_index::{
    ClusterIndex, FlatIndex, GraphParams, Hits, HnswIndex, HnswParams, KeySlice, MipsIndex,
    MipsIndexMut, SearchScratch, TrainingSignal,
};

use super::args::settings;
use super::{Group, RecallArgs};
use kvdex::error::Result;

/// Accumulated figures of one (method, setting).
#[derive(Debug, Default, Clone)]
pub(super) struct Agg {
    pub(super) method: String,
    pub(super) params: serde_json::Value,
    pub(super) recalls: Vec<f32>,
    pub(super) mass_recall: f64,
    pub(super) mass_covered: f64,
    pub(super) scored_frac: f64,
    pub(super) search_s: f64,
    pub(super) build_s: f64,
    /// Seconds inside the insert calls (graph+insert), the keys they inserted, and the calls.
    pub(super) insert_s: f64,
    /// Of `insert_s`, seconds preparing guides (`guide_insert`, the read-only half).
    pub(super) guide_s: f64,
    pub(super) inserted: usize,
    pub(super) insert_calls: usize,
    pub(super) memory_bytes: usize,
    pub(super) kv_bytes: usize,
    /// Sum over queries of bytes read / f16 key bytes of the context.
    pub(super) bytes_frac: f64,
    /// Sums over queries of the output's relative error: the retrieved set alone, and with the
    /// cluster index's tail estimate (second-order and centroid-only); and their counts.
    pub(super) out_err: f64,
    pub(super) out_err_tail: f64,
    pub(super) out_err_centroid: f64,
    pub(super) out_n: usize,
    pub(super) tail_n: usize,
}

impl Agg {
    pub(super) fn json(&self) -> serde_json::Value {
        let n = self.recalls.len().max(1) as f64;
        let mut r = self.recalls.clone();
        r.sort_by(|a, b| a.total_cmp(b));
        let p10 = r.get(r.len() / 10).copied().unwrap_or(0.0);
        serde_json::json!({
            "method": self.method,
            "params": self.params,
            "recall_at_k": r.iter().map(|&x| x as f64).sum::<f64>() / n,
            "recall_p10": p10,
            "mass_recall": self.mass_recall / n,
            "mass_covered": self.mass_covered / n,
            "scored_fraction": self.scored_frac / n,
            "qps": n / self.search_s.max(1e-9),
            "build_s": self.build_s,
            "insert_s": self.insert_s,
            "insert_us_per_key": 1e6 * self.insert_s / self.inserted.max(1) as f64,
            "insert_ms_per_call": 1e3 * self.insert_s / self.insert_calls.max(1) as f64,
            "guide_ms_per_call": 1e3 * self.guide_s / self.insert_calls.max(1) as f64,
            "memory_bytes": self.memory_bytes,
            "memory_fraction_of_kv": self.memory_bytes as f64 / self.kv_bytes.max(1) as f64,
            "bytes_fraction": self.bytes_frac / n,
            "out_rel_err": (self.out_n > 0).then(|| self.out_err / self.out_n as f64),
            "out_rel_err_tail": (self.tail_n > 0).then(|| self.out_err_tail / self.tail_n as f64),
            "out_rel_err_tail_centroid": (self.tail_n > 0).then(|| self.out_err_centroid / self.tail_n as f64),
        })
    }
}

/// Exact answers for one test query.
pub(super) struct Truth {
    top: Vec<u32>,
    probs: Vec<f32>,
    top_mass: f64,
    /// The exact attention output over the whole context, when values are known.
    out: Option<Vec<f32>>,
}

impl Truth {
    /// The exact top-k ids, best first.
    pub(super) fn top_ids(&self) -> &[u32] {
        &self.top
    }
}

pub(super) fn truth(
    keys: &KeySlice<'_>,
    values: Option<&KeySlice<'_>>,
    q: &[f32],
    k: usize,
    scratch: &mut SearchScratch,
) -> Result<Truth> {
    use kvdex_index::KeyStore;
    let n = keys.len();
    let mut hits = Hits::default();
    FlatIndex::new(n).search(keys, q, k, scratch, &mut hits)?;
    let mut probs = vec![0.0f32; n];
    keys.score_range(q, 0, &mut probs);
    let scale = 1.0 / (keys.dim() as f32).sqrt();
    let mx = probs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * scale;
    let mut sum = 0.0f64;
    for p in probs.iter_mut() {
        *p = (*p * scale - mx).exp();
        sum += *p as f64;
    }
    probs.iter_mut().for_each(|p| *p = (*p as f64 / sum) as f32);
    let top_mass = hits.ids.iter().map(|&i| probs[i as usize] as f64).sum();
    let out = values.map(|v| super::attn::exact_out(&probs, v));
    Ok(Truth {
        top: hits.ids,
        probs,
        top_mass,
        out,
    })
}

/// What the output error is measured with: the values, and the cluster index whose tail
/// estimate is merged in.
#[derive(Clone, Copy, Default)]
pub(super) struct OutCheck<'a> {
    pub(super) values: Option<&'a KeySlice<'a>>,
    pub(super) cluster: Option<&'a ClusterIndex>,
}

/// Runs `index` on the test queries and adds the figures to `agg`.
pub(super) fn evaluate(
    index: &dyn MipsIndex,
    keys: &KeySlice<'_>,
    tests: &[(Vec<f32>, Truth)],
    k: usize,
    agg: &mut Agg,
    check: OutCheck<'_>,
) -> Result<()> {
    let mut scratch = SearchScratch::new();
    let mut hits = Hits::default();
    let n = kvdex_index::KeyStore::len(keys) as f64;
    let key_bytes = n * kvdex_index::KeyStore::dim(keys) as f64 * 2.0;
    let t0 = Instant::now();
    let mut results = Vec::with_capacity(tests.len());
    for (q, _) in tests {
        let st = index.search(keys, q, k, &mut scratch, &mut hits)?;
        results.push((hits.clone(), st.scored, st.bytes_read));
    }
    agg.search_s += t0.elapsed().as_secs_f64();
    if let Some(values) = check.values {
        let scale = 1.0 / (kvdex_index::KeyStore::dim(keys) as f32).sqrt();
        for ((h, _, _), (q, t)) in results.iter().zip(tests) {
            let Some(exact) = &t.out else { continue };
            let (o, _) = super::attn::retrieved_out(&h.ids, &h.scores, scale, values);
            agg.out_err += super::attn::rel_err(&o, exact);
            agg.out_n += 1;
            if let Some(ci) = check.cluster {
                let hs = (&h.ids[..], &h.scores[..]);
                let o = super::attn::with_tail(ci, q, hs, keys, values, true)?;
                agg.out_err_tail += super::attn::rel_err(&o, exact);
                let o = super::attn::with_tail(ci, q, hs, keys, values, false)?;
                agg.out_err_centroid += super::attn::rel_err(&o, exact);
                agg.tail_n += 1;
            }
        }
    }
    for ((h, scored, bytes), (_, t)) in results.iter().zip(tests) {
        let ids = &h.ids;
        agg.bytes_frac += *bytes as f64 / key_bytes;
        let hit = ids.iter().filter(|i| t.top.contains(i)).count();
        agg.recalls.push(hit as f32 / t.top.len().max(1) as f32);
        let mass: f64 = ids.iter().map(|&i| t.probs[i as usize] as f64).sum();
        agg.mass_recall += if t.top_mass > 0.0 {
            (mass / t.top_mass).min(1.0)
        } else {
            1.0
        };
        agg.mass_covered += mass;
        agg.scored_frac += *scored as f64 / n;
    }
    Ok(())
}

/// Builds and evaluates every variant on one group.
pub(super) fn run_group(
    a: &RecallArgs,
    group: &Group<'_>,
    d: usize,
    (variants, aggs): (&[String], &mut [Vec<Agg>]),
    (gp, hp): (&GraphParams, &HnswParams),
) -> Result<()> {
    let keys_f16 = group.keys;
    let keys = KeySlice::new(KeyRows::F16(keys_f16), d)?;
    let values = match group.values {
        Some(v) => Some(KeySlice::new(KeyRows::F16(v), d)?),
        None => None,
    };
    let check = OutCheck {
        values: values.as_ref(),
        cluster: None,
    };
    let ctx = keys_f16.len() / d;
    let mut scratch = SearchScratch::new();
    let mut tests: Vec<Vec<(Vec<f32>, Truth)>> = Vec::new();
    // With --guide-tests, each head's first test queries guide the insert and are not measured.
    let mut guides: Vec<&[f32]> = Vec::new();
    for qs in &group.tests {
        let (guide, measured) = qs.split_at((a.guide_tests * d).min(qs.len()));
        guides.push(guide);
        let mut t = Vec::new();
        for q in measured.chunks_exact(d) {
            t.push((
                q.to_vec(),
                truth(&keys, values.as_ref(), q, a.k, &mut scratch)?,
            ));
        }
        tests.push(t);
    }
    let train = &group.train;
    for (vi, m) in variants.iter().enumerate() {
        let kv_bytes = ctx * d * 2 * 2;
        for agg in aggs[vi].iter_mut() {
            agg.kv_bytes += kv_bytes;
        }
        match m.as_str() {
            "flat" => {
                let idx = FlatIndex::new(ctx);
                for t in &tests {
                    evaluate(&idx, &keys, t, a.k, &mut aggs[vi][0], check)?;
                }
            }
            "cluster" => {
                let t0 = Instant::now();
                let mut idx = ClusterIndex::build(&keys, &super::args::cluster_params(a)?)?;
                let bs = t0.elapsed().as_secs_f64();
                if let Some(v) = &values {
                    idx.absorb_values(v)?;
                }
                for (si, probe) in super::args::probes(a).into_iter().enumerate() {
                    idx.set_probe_fraction(probe);
                    let agg = &mut aggs[vi][si];
                    agg.build_s += bs;
                    agg.memory_bytes += idx.memory_bytes();
                    let check = OutCheck {
                        cluster: Some(&idx),
                        ..check
                    };
                    for t in &tests {
                        evaluate(&idx, &keys, t, a.k, agg, check)?;
                    }
                }
            }
            "hnsw" => {
                let t0 = Instant::now();
                let mut idx = HnswIndex::build(&keys, hp)?;
                let bs = t0.elapsed().as_secs_f64();
                for (si, ef) in settings("hnsw", a).into_iter().enumerate() {
                    idx.set_ef_search(ef);
                    let agg = &mut aggs[vi][si];
                    agg.build_s += bs;
                    agg.memory_bytes += idx.memory_bytes();
                    for t in &tests {
                        evaluate(&idx, &keys, t, a.k, agg, check)?;
                    }
                }
            }
            _ => {
                let cut = match m.as_str() {
                    "graph+insert" => ((1.0 - a.insert_frac.unwrap_or(0.0)) * ctx as f64) as usize,
                    _ => ctx,
                };
                let groups: Vec<Vec<usize>> = if a.graph_per == "kv" {
                    vec![(0..train.len()).collect()]
                } else {
                    (0..train.len()).map(|i| vec![i]).collect()
                };
                for grp in groups {
                    let mut vecs = Vec::new();
                    let mut pos = Vec::new();
                    for &i in &grp {
                        let (v, p) = &train[i];
                        for (j, &at) in p.iter().enumerate() {
                            if (at as usize) < cut {
                                vecs.extend_from_slice(&v[j * d..(j + 1) * d]);
                                pos.push(at);
                            }
                        }
                    }
                    let signal = TrainingSignal::Queries {
                        vectors: &vecs,
                        positions: &pos,
                    };
                    let t0 = Instant::now();
                    let part = KeySlice::new(KeyRows::F16(&keys_f16[..cut * d]), d)?;
                    let mut idx = build_graph(&part, &signal, gp)?;
                    let mut timing = (0.0, 0, 0, 0.0);
                    if cut < ctx {
                        // (position, query) guides: the new positions' own prefill queries (an
                        // even sample), or the first test queries (after the whole context).
                        let mut fresh: Vec<(usize, &[f32])> = Vec::new();
                        let per = a.insert_queries.div_ceil(grp.len().max(1));
                        for &i in &grp {
                            if a.guide_tests > 0 {
                                let rows = guides[i].chunks_exact(d).enumerate();
                                fresh.extend(rows.map(|(j, q)| (ctx + j, q)));
                                continue;
                            }
                            let (v, p) = &train[i];
                            let later: Vec<usize> =
                                (0..p.len()).filter(|&j| p[j] as usize >= cut).collect();
                            let take = per.min(later.len());
                            for j in 0..take {
                                let at = later[j * later.len() / take];
                                fresh.push((p[at] as usize, &v[at * d..(at + 1) * d]));
                            }
                        }
                        fresh.sort_by_key(|f| f.0);
                        timing = insert_rest(a, &mut idx, keys_f16, d, (cut, ctx), &fresh)?;
                    }
                    let bs = t0.elapsed().as_secs_f64();
                    if std::env::var_os("KVDEX_RECALL_DEBUG").is_some() {
                        let (mut sum, mut cnt) = (0usize, 0usize);
                        for &i in &grp {
                            for (_, t) in &tests[i] {
                                for &id in &t.top {
                                    sum += idx.neighbours_of(id).len();
                                    cnt += 1;
                                }
                            }
                        }
                        eprintln!(
                            "# graph: mean out-degree {:.1}, of the test queries' true top keys {:.1}",
                            idx.mean_degree(),
                            sum as f64 / cnt.max(1) as f64
                        );
                        let mine: Vec<&(Vec<f32>, Truth)> =
                            grp.iter().flat_map(|&i| tests[i].iter()).collect();
                        super::diag::miss_report(&idx, &keys, &mine);
                    }
                    for (si, lst) in settings("graph", a).into_iter().enumerate() {
                        idx.set_search_list(lst);
                        let agg = &mut aggs[vi][si];
                        agg.build_s += bs;
                        agg.insert_s += timing.0;
                        agg.guide_s += timing.3;
                        agg.inserted += timing.1;
                        agg.insert_calls += timing.2;
                        agg.memory_bytes += idx.memory_bytes();
                        for &i in &grp {
                            evaluate(&idx, &keys, &tests[i], a.k, agg, check)?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Inserts keys `cut..ctx` into `idx` as `--insert-guide` and `--insert-batch` ask, the guide
/// queries split evenly over the calls in position order. Returns (seconds in the insert
/// calls, keys inserted, calls, of the seconds those preparing guides).
fn insert_rest(
    a: &RecallArgs,
    idx: &mut kvdex_index::QueryGuidedGraph,
    keys_f16: &[half::f16],
    d: usize,
    (cut, ctx): (usize, usize),
    fresh: &[(usize, &[f32])],
) -> Result<(f64, usize, usize, f64)> {
    let batch = if a.insert_batch == 0 {
        ctx - cut
    } else {
        a.insert_batch
    };
    let calls = (ctx - cut).div_ceil(batch.max(1));
    let (mut secs, mut guide_secs) = (0.0, 0.0);
    let mut guide = Vec::new();
    for c in 0..calls {
        let to = (cut + (c + 1) * batch).min(ctx);
        let view = KeySlice::new(KeyRows::F16(&keys_f16[..to * d]), d)?;
        guide.clear();
        let rows = &fresh[c * fresh.len() / calls..(c + 1) * fresh.len() / calls];
        rows.iter().for_each(|(_, q)| guide.extend_from_slice(q));
        let t = Instant::now();
        match a.insert_guide.as_str() {
            "approx" => {
                let prepared = idx.guide_insert(&view, &guide)?;
                guide_secs += t.elapsed().as_secs_f64();
                idx.insert_guided(&view, &prepared)?
            }
            "keys" => idx.insert(&view)?,
            _ => idx.insert_with_queries(&view, &guide)?,
        }
        secs += t.elapsed().as_secs_f64();
    }
    Ok((secs, ctx - cut, calls, guide_secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::recall::groups::to_f32;
    use crate::data::{DataSet, Layer};

    /// The real-data fixture (layer 17, 1024 tokens): the split, the ground truth and the graph
    /// end to end. The graph must beat a key-only graph's typical recall on these OOD queries.
    #[test]
    fn graph_on_real_fixture_finds_most_of_the_true_top_k() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/smollm2-l17-1k");
        let ds = DataSet::open(&dir).unwrap();
        let (ctx, d, k) = (ds.meta.context(), ds.meta.dim, 20);
        assert_eq!(ctx, 768);
        let layer = ds.layer(17).unwrap();
        let keys = KeySlice::new(KeyRows::F16(Layer::rows(&layer.k, 0, 0, ctx)), d).unwrap();
        let train = to_f32(Layer::rows(&layer.q, 0, 0, ctx));
        let pos: Vec<u32> = (0..ctx as u32).collect();
        let signal = TrainingSignal::Queries {
            vectors: &train,
            positions: &pos,
        };
        let g = build_graph(
            &keys,
            &signal,
            &GraphParams {
                search_list: 48,
                ..GraphParams::default()
            },
        )
        .unwrap();
        let mut scratch = SearchScratch::new();
        let tests: Vec<(Vec<f32>, Truth)> = to_f32(Layer::rows(&layer.q, 0, ctx, ds.meta.tokens))
            .chunks_exact(d)
            .map(|q| (q.to_vec(), truth(&keys, None, q, k, &mut scratch).unwrap()))
            .collect();
        let mut agg = Agg::default();
        evaluate(&g, &keys, &tests, k, &mut agg, OutCheck::default()).unwrap();
        let j = agg.json();
        let recall = j["recall_at_k"].as_f64().unwrap();
        assert!(recall > 0.9, "recall@{k} {recall}");
        assert!(j["mass_recall"].as_f64().unwrap() > 0.95);
        assert!(j["scored_fraction"].as_f64().unwrap() < 1.0);
    }
}
