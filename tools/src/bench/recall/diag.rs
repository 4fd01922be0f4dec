//! `KVDEX_RECALL_DEBUG=1`: why the graph misses true top keys. For each test query, a traced
//! search (at L = `KVDEX_RECALL_DEBUG_L`, default 512) splits the exact top-k into found and
//! missed keys, and the report compares the two: in-degree, position in the context, hop
//! distance from the search's expanded nodes and from the entry points, whether an
//! in-neighbour was scored (one expansion short), and, for the first queries, how many found
//! keys sit among a missed key's nearest keys (L2): whether key-key edges would bridge them.

use kvdex_index::qgraph::trace::{hops_from, in_degrees, traced_search};
use kvdex_index::{KeySlice, KeyStore, QueryGuidedGraph};

use super::measure::Truth;

/// Per-class (found / missed) sums.
#[derive(Default)]
struct Side {
    count: usize,
    in_deg: f64,
    in_deg_le2: usize,
    out_deg: f64,
    pos: f64,
    last_tenth: usize,
    hops_entry: f64,
    hops_beam: [usize; 5],
    in_nb_scored: usize,
    /// A scored key within 8 positions.
    scored_near: usize,
}

impl Side {
    fn line(&self, name: &str) -> String {
        let c = self.count.max(1) as f64;
        let h = &self.hops_beam;
        format!(
            "# {name}: {} keys, in-degree {:.1} (<= 2: {:.1}%), out-degree {:.1}, position {:.2} \
             (last tenth {:.1}%), hops from entries {:.1}, hops from expanded 0/1/2/3/4+: \
             {}/{}/{}/{}/{}, an in-neighbour scored {:.1}%, a scored key within 8 positions {:.1}%",
            self.count,
            self.in_deg / c,
            100.0 * self.in_deg_le2 as f64 / c,
            self.out_deg / c,
            self.pos / c,
            100.0 * self.last_tenth as f64 / c,
            self.hops_entry / c,
            h[0],
            h[1],
            h[2],
            h[3],
            h[4],
            100.0 * self.in_nb_scored as f64 / c,
            100.0 * self.scored_near as f64 / c,
        )
    }
}

/// The `nn` nearest keys to key `m` by L2 (excluding itself).
fn l2_neighbours(keys: &KeySlice<'_>, norms: &[f32], m: u32, nn: usize) -> Vec<u32> {
    let n = keys.len();
    let mut row = vec![0.0f32; keys.dim()];
    keys.row_f32(m, &mut row);
    let mut ip = vec![0.0f32; n];
    keys.score_range(&row, 0, &mut ip);
    let mut d: Vec<(f32, u32)> = (0..n as u32)
        .filter(|&i| i != m)
        .map(|i| (norms[i as usize] - 2.0 * ip[i as usize], i))
        .collect();
    let nn = nn.min(d.len());
    if nn == 0 {
        return Vec::new();
    }
    d.select_nth_unstable_by(nn - 1, |a, b| a.0.total_cmp(&b.0));
    d[..nn].iter().map(|x| x.1).collect()
}

/// Prints the miss report of graph `g` on `tests` (stderr).
pub(super) fn miss_report(g: &QueryGuidedGraph, keys: &KeySlice<'_>, tests: &[&(Vec<f32>, Truth)]) {
    let l: usize = std::env::var("KVDEX_RECALL_DEBUG_L")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let knn_queries: usize = std::env::var("KVDEX_RECALL_DEBUG_KNN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let n = keys.len();
    let in_deg = in_degrees(g);
    let from_entries = hops_from(g, g.entries());
    let mut rev: Vec<Vec<u32>> = vec![Vec::new(); n];
    for i in 0..n as u32 {
        for &y in g.neighbours_of(i) {
            rev[y as usize].push(i);
        }
    }
    let norms: Vec<f32> = {
        let mut row = vec![0.0f32; keys.dim()];
        (0..n as u32)
            .map(|i| {
                keys.row_f32(i, &mut row);
                row.iter().map(|x| x * x).sum()
            })
            .collect()
    };
    let (mut found, mut missed) = (Side::default(), Side::default());
    let (mut knn_missed, mut knn_top, mut knn_found, mut knn_any) = (0usize, 0usize, 0usize, 0);
    let mut knn_near = 0usize;
    let mut scored_sum = 0usize;
    for (qi, (q, t)) in tests.iter().enumerate() {
        let tr = traced_search(g, keys, q, g.entries(), l);
        scored_sum += tr.scored.len();
        let mut scored = vec![false; n];
        tr.scored.iter().for_each(|&i| scored[i as usize] = true);
        let hops = hops_from(g, &tr.expanded);
        let top = t.top_ids();
        for &id in top {
            let i = id as usize;
            let side = if scored[i] { &mut found } else { &mut missed };
            side.count += 1;
            side.in_deg += in_deg[i] as f64;
            side.in_deg_le2 += usize::from(in_deg[i] <= 2);
            side.out_deg += g.neighbours_of(id).len() as f64;
            side.pos += i as f64 / n as f64;
            side.last_tenth += usize::from(i * 10 >= n * 9);
            side.hops_entry += from_entries[i].min(99) as f64;
            side.hops_beam[(hops[i] as usize).min(4)] += 1;
            side.in_nb_scored += usize::from(rev[i].iter().any(|&r| scored[r as usize]));
            let near = i.saturating_sub(8)..(i + 9).min(n);
            side.scored_near += usize::from(near.filter(|&j| j != i).any(|j| scored[j]));
        }
        if qi < knn_queries {
            for &m in top.iter().filter(|&&m| !scored[m as usize]) {
                let nb = l2_neighbours(keys, &norms, m, 32);
                let f = nb.iter().filter(|&&x| scored[x as usize]).count();
                let tt = nb.iter().filter(|x| top.contains(x)).count();
                let ft = nb
                    .iter()
                    .filter(|&&x| scored[x as usize] && top.contains(&x))
                    .count();
                knn_missed += 1;
                knn_top += tt;
                knn_found += ft;
                knn_any += usize::from(f > 0);
                knn_near += nb.iter().filter(|&&x| x.abs_diff(m) <= 256).count();
            }
        }
    }
    let c = knn_missed.max(1) as f64;
    eprintln!(
        "# miss report at L {l}: {} queries, {:.0} scored per query",
        tests.len(),
        scored_sum as f64 / tests.len().max(1) as f64
    );
    eprintln!("{}", found.line("found top keys"));
    eprintln!("{}", missed.line("missed top keys"));
    eprintln!(
        "# missed keys' 32 L2-nearest keys (first {knn_queries} queries, {knn_missed} missed): \
         true top keys {:.2}, found top keys {:.2}, any scored key {:.1}%, within 256 positions {:.2}",
        knn_top as f64 / c,
        knn_found as f64 / c,
        100.0 * knn_any as f64 / c,
        knn_near as f64 / c
    );
    let hist = |lo: u32, hi: u32| in_deg.iter().filter(|&&x| x >= lo && x <= hi).count();
    eprintln!(
        "# in-degree over all {n} keys: 0 {}, 1-2 {}, 3-8 {}, 9+ {}",
        hist(0, 0),
        hist(1, 2),
        hist(3, 8),
        hist(9, u32::MAX)
    );
}
