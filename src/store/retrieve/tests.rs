//! Multi-position retrieves: each position answers as its own single-position request would,
//! sees only the tokens its limit allows, and bad positions or limits are refused by name.

use kvdex_index::attend::BudgetParams;
use kvdex_index::KeyDtype;

use super::*;
use crate::store::{DecodeConfig, Shape, Store};

const HQ: usize = 4;
const D: usize = 8;

fn rows(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
        })
        .collect()
}

/// A session of `n` tokens with 4 sinks and a window of 8.
fn session(n: usize) -> Session {
    let cfg = DecodeConfig {
        sinks: 4,
        window: 8,
        ..Default::default()
    };
    let store = Store::unlimited().with_decode(cfg);
    let shape = Shape {
        layers: 1,
        q_heads: HQ as u32,
        kv_heads: 2,
        head_dim: D as u32,
        dtype: KeyDtype::F32,
    };
    let s = store.session(shape).unwrap();
    let (k, v) = (rows(2 * n * D, 1), rows(2 * n * D, 2));
    s.append(0, n, bytemuck::cast_slice(&k), bytemuck::cast_slice(&v))
        .unwrap();
    s
}

/// Owned outputs of a retrieve of `items` rows.
struct Owned {
    k: Vec<u32>,
    coverage: Vec<f32>,
    ids: Vec<u32>,
    scores: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    rows: Vec<u8>,
}

fn run(s: &Session, q: &[f32], limits: &[u32], p: &RetrieveParams) -> Result<Owned> {
    let stride = s.retrieve_stride(0, &p.budget)?;
    let items = limits.len().max(1) * HQ;
    let mut o = Owned {
        k: vec![0; items],
        coverage: vec![0.0; items],
        ids: vec![0; items * stride],
        scores: vec![0.0; items * stride],
        out: vec![0.0; items * D],
        lse: vec![0.0; items],
        rows: vec![0; items * 2 * stride * D * 4],
    };
    s.retrieve_at(
        0,
        q,
        limits,
        p,
        &mut RetrieveScratch::new(),
        RetrieveOut {
            k: &mut o.k,
            coverage: &mut o.coverage,
            ids: &mut o.ids,
            scores: &mut o.scores,
            out: &mut o.out,
            lse: &mut o.lse,
            rows: &mut o.rows,
            rows_dest: None,
        },
    )?;
    Ok(o)
}

fn params(budget: Budget) -> RetrieveParams {
    RetrieveParams {
        budget,
        attend: true,
        gather: true,
        scale: None,
    }
}

#[test]
fn each_position_answers_as_its_own_request_and_sees_only_its_tokens() {
    let n = 100;
    let s = session(n);
    // Limits: all, inside the retrievable range, inside the window, before the sinks' end.
    let limits = [NO_LIMIT, 50, 95, 3];
    let q = rows(limits.len() * HQ * D, 7);
    for budget in [
        Budget::Fixed(16),
        Budget::Adaptive(BudgetParams::new(0.9, 2, 32).unwrap()),
    ] {
        let p = params(budget);
        let all = run(&s, &q, &limits, &p).unwrap();
        let stride = s.retrieve_stride(0, &p.budget).unwrap();
        for (i, &lim) in limits.iter().enumerate() {
            let one = run(&s, &q[i * HQ * D..(i + 1) * HQ * D], &[lim], &p).unwrap();
            let r = i * HQ..(i + 1) * HQ;
            assert_eq!(all.k[r.clone()], one.k[..], "position {i}");
            assert_eq!(all.coverage[r.clone()], one.coverage[..]);
            assert_eq!(all.lse[r.clone()], one.lse[..]);
            assert_eq!(all.out[i * HQ * D..(i + 1) * HQ * D], one.out[..]);
            assert_eq!(all.ids[i * HQ * stride..(i + 1) * HQ * stride], one.ids[..]);
            let per = HQ * 2 * stride * D * 4;
            assert_eq!(all.rows[i * per..(i + 1) * per], one.rows[..]);
            // Visible: sinks .. min(limit, len - window).
            let end = (n - 8).min(lim.min(n as u32) as usize);
            for h in 0..HQ {
                let row = i * HQ + h;
                let ids = &all.ids[row * stride..row * stride + all.k[row] as usize];
                assert!(
                    ids.iter()
                        .all(|&id| (4..end.max(4)).contains(&(id as usize))),
                    "position {i} (limit {lim}) head {h} saw {ids:?}"
                );
            }
        }
        // Before the sinks' end a position sees nothing: an empty part.
        assert!(all.k[3 * HQ..].iter().all(|&k| k == 0));
        assert!(all.lse[3 * HQ..].iter().all(|&l| l == f32::NEG_INFINITY));
    }
    // A fixed budget over every retrievable token of a limited position takes all of them.
    let p = params(Budget::Fixed(200));
    let o = run(&s, &q[HQ * D..2 * HQ * D], &[50], &p).unwrap();
    assert!(o.k.iter().all(|&k| k == 46), "{:?}", o.k);
}

#[test]
fn zero_positions_and_limits_beyond_the_length_are_refused_by_name() {
    let s = session(40);
    let p = params(Budget::Fixed(4));
    let e = run(&s, &[], &[], &p).err().unwrap().to_string();
    assert!(e.contains("positions P = 0"), "{e}");
    let q = rows(2 * HQ * D, 3);
    let e = run(&s, &q, &[10, 41], &p).err().unwrap().to_string();
    assert!(
        e.contains("limits[1] = 41") && e.contains("length 40"),
        "{e}"
    );
    let e = run(&s, &q[..HQ * D], &[10, 20], &p)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("expected positions 2"), "{e}");
}
