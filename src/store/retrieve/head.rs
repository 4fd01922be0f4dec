//! Steps 1-3 of a retrieve for one query head: the index search merged with the tokens not
//! inserted yet, then the budget and the partial attention (Slim mode recomputes the chosen
//! values first).

use super::*;

/// The exact scan of one KV head's queries (its GQA group's heads, for one or several positions)
/// over the retrievable tokens `range`, for a KV head with no index.
pub(super) struct ExactScan<'a> {
    pub(super) keys: &'a KeySlice<'a>,
    pub(super) range: (usize, usize),
    pub(super) stride: usize,
}

impl ExactScan<'_> {
    /// Scans for the queries `q` (`[n][head_dim]`) into `hs[i]` for the `n` indices `i`
    /// that `outs` yields, in order.
    pub(super) fn run(
        &self,
        q: &[f32],
        flat: &mut SearchScratch,
        group: &mut Vec<Hits>,
        hs: &mut [HeadScratch],
        outs: &mut dyn Iterator<Item = usize>,
    ) -> Result<()> {
        let (start, end) = self.range;
        let keys = view(self.keys, start, end)?;
        let n = q.len() / KeyStore::dim(&keys).max(1);
        group.resize_with(n, Hits::default);
        let group = &mut group[..n];
        let st = FlatIndex::new(end - start).search_group(&keys, q, self.stride, flat, group)?;
        for (i, hits) in outs.zip(group.iter_mut()) {
            let h = &mut hs[i];
            std::mem::swap(&mut h.hits, hits);
            h.hits.ids.iter_mut().for_each(|i| *i += start as u32);
            h.scored = st.scored / n.max(1);
        }
        Ok(())
    }
}

impl HeadScratch {
    /// An empty part for a position that sees no retrievable token: nothing chosen, the
    /// merge's weight `exp(-inf) = 0`.
    pub(super) fn empty(&mut self, d: usize) {
        self.hits.clear();
        self.k = 0;
        self.coverage = 1.0;
        self.scored = 0;
        self.out.clear();
        self.out.resize(d, 0.0);
        self.lse = f32::NEG_INFINITY;
    }
}

/// Graph (or other index) search of one head over the indexed tokens, merged with an exact
/// scan of the tokens that left the window but are not inserted yet.
#[allow(clippy::too_many_arguments)]
pub(super) fn search_indexed(
    l: &LayerKv,
    index: &dyn kvdex_index::MipsIndexMut,
    g: usize,
    q: &[f32],
    stride: usize,
    hs: &mut HeadScratch,
    session: &Session,
    (start, end): (usize, usize),
) -> Result<()> {
    let s = session.shape;
    let d = s.head_dim as usize;
    let full = l.keys(g, s.dtype, d)?;
    if index.len() > end - start {
        // A position whose limit cuts into the indexed tokens: the index would return ids it
        // must not see, so scan its visible tokens exactly.
        let keys = view(&full, start, end)?;
        let st = FlatIndex::new(end - start).search_group(
            &keys,
            q,
            stride,
            &mut hs.search,
            std::slice::from_mut(&mut hs.hits),
        )?;
        hs.scored = st.scored;
        hs.hits.ids.iter_mut().for_each(|i| *i += start as u32);
        return Ok(());
    }
    let n = index.len();
    let indexed = view(&full, start, start + n)?;
    // A request for (nearly) every indexed token gains nothing from an approximate index, and
    // a graph beam cannot promise to reach them all: scan exactly instead.
    let st = if stride >= n {
        kvdex_index::MipsIndex::search(
            &FlatIndex::new(n),
            &indexed,
            q,
            stride,
            &mut hs.search,
            &mut hs.hits,
        )?
    } else {
        index.search(&indexed, q, stride, &mut hs.search, &mut hs.hits)?
    };
    hs.scored = st.scored;
    if start + n < end {
        let pend = view(&full, start + n, end)?;
        let st = FlatIndex::new(end - start - n).search_group(
            &pend,
            q,
            stride,
            &mut hs.search,
            std::slice::from_mut(&mut hs.pending),
        )?;
        hs.scored += st.scored;
        hs.merge.reset(stride);
        for (&id, &sc) in hs.hits.ids.iter().zip(&hs.hits.scores) {
            hs.merge.push(id + start as u32, sc);
        }
        for (&id, &sc) in hs.pending.ids.iter().zip(&hs.pending.scores) {
            hs.merge.push(id + (start + n) as u32, sc);
        }
        hs.merge.drain_into(&mut hs.hits);
    } else {
        hs.hits.ids.iter_mut().for_each(|i| *i += start as u32);
    }
    Ok(())
}

/// Slim mode's inputs to a retrieve: values are recomputed as `K·W_KV` for the chosen rows.
pub(super) struct Slim<'a> {
    pub(super) wkv: &'a WKv,
    pub(super) rope: Option<&'a RopeSpec>,
    pub(super) keys: &'a LayerKeys<'a>,
}

/// Steps 2 and 3 for one head: choose k, then attend over the first k candidates. With
/// `slim = Some((slim, kv_head))` the chosen rows' values are recomputed first (into
/// `hs.values`, which a gather then copies out).
#[allow(clippy::too_many_arguments)]
pub(super) fn budget_and_attend(
    keys: &KeySlice<'_>,
    values: &KeySlice<'_>,
    slim: Option<(&Slim<'_>, usize)>,
    q: &[f32],
    scale: f32,
    params: &RetrieveParams,
    (start, end, len): (usize, usize, usize),
    tail_sample: usize,
    hs: &mut HeadScratch,
) -> Result<()> {
    let n = hs.hits.len();
    match params.budget {
        Budget::Fixed(k) => {
            hs.k = k.min(n);
            hs.coverage = 0.0;
        }
        Budget::Adaptive(bp) => {
            // The tail sample's rows are scattered over the whole context: start their cache
            // misses now, so that they overlap each other and the static scan below.
            hs.sample.resize(tail_sample, 0);
            let m = systematic_sample(start as u32, end as u32, &mut hs.sample);
            keys.prefetch(&hs.sample[..m]);
            // Static tokens' exact log-sum-exp: sinks 0..start and window end..len.
            let nstatic = start + (len - end);
            hs.logits.resize(nstatic.max(n), 0.0);
            keys.score_range(q, 0, &mut hs.logits[..start]);
            keys.score_range(q, end, &mut hs.logits[start..nstatic]);
            hs.logits[..nstatic].iter_mut().for_each(|x| *x *= scale);
            let static_lse = lse_of(&hs.logits[..nstatic]);
            let threshold = hs.hits.scores.last().map_or(f32::INFINITY, |&x| x * scale);
            let tail = if n < end - start {
                estimate_tail_lse(
                    keys,
                    q,
                    scale,
                    &hs.sample[..m],
                    end - start,
                    threshold,
                    &mut hs.attend,
                )?
            } else {
                f32::NEG_INFINITY
            };
            hs.logits.resize(n, 0.0);
            for (l, &s) in hs.logits.iter_mut().zip(&hs.hits.scores) {
                *l = s * scale;
            }
            let c = choose_k(&hs.logits[..n], static_lse, tail, &bp)?;
            hs.k = c.k;
            hs.coverage = c.estimated_coverage;
        }
    }
    if params.attend {
        // The chosen rows: K was scored by the search (likely cached), V was not read yet.
        keys.prefetch(&hs.hits.ids[..hs.k]);
        values.prefetch(&hs.hits.ids[..hs.k]);
    }
    if let Some((sl, g)) = slim.filter(|_| params.attend || params.gather) {
        let d = q.len();
        hs.values.resize(hs.k * d, 0.0);
        reconstruct_values_from(
            sl.keys,
            sl.wkv,
            sl.rope,
            &hs.hits.ids[..hs.k],
            g,
            &mut hs.slim,
            &mut hs.values,
        )?;
    }
    if params.attend {
        hs.out.resize(q.len(), 0.0);
        let ids = &hs.hits.ids[..hs.k];
        hs.lse = if slim.is_some() {
            attend_head_dense_values(
                keys,
                KeyRows::F32(&hs.values),
                q,
                ids,
                scale,
                &mut hs.attend,
                &mut hs.out,
            )?
        } else {
            attend_head(keys, values, q, ids, scale, &mut hs.attend, &mut hs.out)?
        };
    }
    Ok(())
}
