//! The data a recall run measures on, one [`Group`] per graph: a data set directory's
//! (layer, KV head) pairs with the benchmark split, or `kvdex bench decode`'s synthetic data.

use half::f16;

use super::RecallArgs;
use crate::data::{DataSet, Layer};
use kvdex::error::{KvdexError, Result};

/// Widens f16 rows to f32.
pub(super) fn to_f32(rows: &[f16]) -> Vec<f32> {
    rows.iter().map(|x| x.to_f32()).collect()
}

/// One graph's worth of data: a KV head's keys, and per query head of its group the test
/// queries and the training queries with their (causal) positions.
pub struct Group<'a> {
    /// Progress label.
    pub label: String,
    /// `[n][dim]` keys.
    pub keys: &'a [f16],
    /// `[n][dim]` values of the same positions, when the data has them (output error).
    pub values: Option<&'a [f16]>,
    /// Per query head: `[tests][dim]` test queries.
    pub tests: Vec<Vec<f32>>,
    /// Per query head: `[n][dim]` training queries and their positions.
    pub train: Vec<(Vec<f32>, Vec<u32>)>,
}

/// The groups of a data set directory: every (layer, KV head), with the benchmark split.
pub(super) fn data_groups(
    a: &RecallArgs,
    dir: &std::path::Path,
    each: &mut dyn FnMut(Group<'_>, usize) -> Result<()>,
) -> Result<()> {
    let ds = DataSet::open(dir)?;
    let meta = ds.meta.clone();
    let layers: Vec<u32> = match &a.layers {
        Some(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<u32>()
                    .map_err(|_| KvdexError::Config(format!("bad layer {x:?}")))
            })
            .collect::<Result<_>>()?,
        None => meta.layers.clone(),
    };
    let (ctx, d) = (meta.context(), meta.dim);
    for &l in &layers {
        let layer = ds.layer(l)?;
        let kv_heads = a.kv_heads.unwrap_or(meta.kv_heads()).min(meta.kv_heads());
        for g in 0..kv_heads {
            let heads: Vec<usize> = (0..meta.q_heads())
                .filter(|&h| meta.kv_head_of_q_head[h] == g)
                .collect();
            let group = Group {
                label: format!("layer {l} kv head {g}/{kv_heads}"),
                keys: Layer::rows(&layer.k, g, 0, ctx),
                values: Some(Layer::rows(&layer.v, g, 0, ctx)),
                tests: heads
                    .iter()
                    .map(|&h| to_f32(Layer::rows(&layer.q, h, ctx, meta.tokens)))
                    .collect(),
                train: heads
                    .iter()
                    .map(|&h| {
                        let v = to_f32(Layer::rows(&layer.q, h, 0, ctx));
                        (v, (0..ctx as u32).collect())
                    })
                    .collect(),
            };
            each(group, d)?;
        }
    }
    Ok(())
}

/// The groups of `kvdex bench decode`'s synthetic data at `n` tokens (one per KV head).
pub(super) fn synth_groups(
    a: &RecallArgs,
    n: usize,
    each: &mut dyn FnMut(Group<'_>, usize) -> Result<()>,
) -> Result<()> {
    let shape: Vec<usize> = a
        .synth_shape
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| KvdexError::Config(format!("bad --synth-shape {:?}", a.synth_shape)))?;
    let [hq, kv, d] = shape[..] else {
        return Err(KvdexError::Config(format!(
            "--synth-shape needs q_heads,kv_heads,head_dim, got {:?}",
            a.synth_shape
        )));
    };
    let (sinks, window) = (128, 512);
    if kv == 0 || hq % kv != 0 || d < 4 || d % 2 != 0 || n <= sinks + window + 1 {
        return Err(KvdexError::Config(format!(
            "--synth-shape {hq},{kv},{d} / --synth-context {n}: kv heads must divide q heads, \
             an even dim >= 4, more than {} tokens",
            sinks + window + 1
        )));
    }
    let data = crate::bench::decode_data::Synth::generate(n, hq, kv, d, a.synth_seed);
    let sets = data.recall_sets(hq, sinks, a.synth_train, a.synth_tests, a.synth_seed);
    let end = n - window;
    let used = a.kv_heads.unwrap_or(kv).min(kv);
    for (g, (tests, train)) in sets.into_iter().enumerate().take(used) {
        let group = Group {
            label: format!("synthetic {n} kv head {g}/{kv}"),
            keys: &data.k[(g * n + sinks) * d..(g * n + end) * d],
            values: Some(&data.v[(g * n + sinks) * d..(g * n + end) * d]),
            tests,
            train,
        };
        each(group, d)?;
    }
    Ok(())
}
