//! Unit tests of the store: growth, budget, search against brute force, bad input.
use super::*;
use kvdex_index::KeyDtype;

#[test]
fn append_search_gather_round_trip() {
    let shape = Shape {
        layers: 1,
        q_heads: 2,
        kv_heads: 1,
        head_dim: 2,
        dtype: KeyDtype::F32,
    };
    let s = Session::new(shape).unwrap();
    let k: Vec<f32> = vec![1.0, 0.0, 0.0, 1.0, 2.0, 2.0];
    let v: Vec<f32> = vec![9.0; 6];
    s.append(0, 3, bytemuck::cast_slice(&k), bytemuck::cast_slice(&v))
        .unwrap();
    let (mut ids, mut sc) = (vec![0u32; 2], vec![0f32; 2]);
    let mut scratch = SearchScratch::new();
    let mut hits = Hits::default();
    let kk = s
        .search(
            0,
            &[1.0, 0.0, 0.0, -1.0],
            1,
            &mut scratch,
            &mut hits,
            &mut ids,
            &mut sc,
        )
        .unwrap();
    assert_eq!(kk, 1);
    assert_eq!(ids, vec![2, 0]);
    let mut out = vec![0u8; 16];
    assert_eq!(s.gather(0, 0, &[1], &mut out).unwrap(), 16);
    let f: &[f32] = bytemuck::cast_slice(&out);
    assert_eq!(f, &[0.0, 1.0, 9.0, 9.0]);
}

fn f32_session(store: &Store, layers: u32) -> Session {
    let shape = Shape {
        layers,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 8,
        dtype: KeyDtype::F32,
    };
    store.session(shape).unwrap()
}

fn rows(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
        })
        .collect()
}

#[test]
fn growth_keeps_rows_and_search_matches_brute_force() {
    let store = Store::new(Arc::new(HostLink::new()), Arc::new(Budget::unlimited()), 4);
    let s = f32_session(&store, 2);
    let (kvh, d) = (2usize, 8usize);
    let mut all_k = vec![Vec::new(); kvh];
    for (block, tokens) in [3usize, 5, 1, 17, 40].into_iter().enumerate() {
        let k = rows(kvh * tokens * d, block as u32);
        let v = rows(kvh * tokens * d, 99 + block as u32);
        s.append(
            1,
            tokens,
            bytemuck::cast_slice(&k),
            bytemuck::cast_slice(&v),
        )
        .unwrap();
        for h in 0..kvh {
            all_k[h].extend_from_slice(&k[h * tokens * d..(h + 1) * tokens * d]);
        }
    }
    let n = 66;
    assert_eq!((s.len(1).unwrap(), s.len(0).unwrap()), (n, 0));
    let st = s.layer_stats();
    assert_eq!((st[1].tokens, st[1].indexed, st[1].index), (n, n, "flat"));
    assert!(st[1].capacity >= n);
    let q = rows(4 * d, 7);
    let (mut ids, mut sc) = (vec![0u32; 4 * 5], vec![0f32; 4 * 5]);
    let (mut scratch, mut hits) = (SearchScratch::new(), Hits::default());
    assert_eq!(
        s.search(1, &q, 5, &mut scratch, &mut hits, &mut ids, &mut sc)
            .unwrap(),
        5
    );
    for qh in 0..4 {
        let keys = &all_k[qh / 2];
        let mut brute: Vec<(f32, u32)> = (0..n)
            .map(|t| {
                (
                    (0..d).map(|j| q[qh * d + j] * keys[t * d + j]).sum(),
                    t as u32,
                )
            })
            .collect();
        brute.sort_by(|a, b| b.0.total_cmp(&a.0));
        let want: Vec<u32> = brute[..5].iter().map(|x| x.1).collect();
        assert_eq!(&ids[qh * 5..(qh + 1) * 5], &want[..], "query head {qh}");
    }
    let mut out = vec![0u8; 2 * 2 * d * 4];
    s.gather(1, 1, &[65, 0], &mut out).unwrap();
    let f: &[f32] = bytemuck::cast_slice(&out);
    assert_eq!(&f[..d], &all_k[1][65 * d..66 * d]);
    assert_eq!(&f[d..2 * d], &all_k[1][..d]);
}

#[test]
fn budget_refuses_an_append_and_leaves_other_sessions_intact() {
    let link = Arc::new(HostLink::new());
    // One token of one layer: 2 KV heads x (K+V) x 32 bytes, each rounded to 64 = 256 bytes.
    let store = Store::new(link.clone(), Arc::new(Budget::new(1024)), 2);
    let a = f32_session(&store, 1);
    let b = f32_session(&store, 1);
    let tok = rows(2 * 8, 1);
    let blk = bytemuck::cast_slice(&tok);
    a.append(0, 1, blk, blk).unwrap(); // initial capacity 2 tokens: 2*2*64 = 256 bytes
    b.append(0, 1, blk, blk).unwrap();
    assert_eq!(store.budget().used(), 512);
    let big = rows(2 * 8 * 8, 2);
    match b.append(0, 8, bytemuck::cast_slice(&big), bytemuck::cast_slice(&big)) {
        Err(KvdexError::Budget {
            asked,
            left,
            budget,
        }) => {
            assert_eq!((left, budget), (512, 1024));
            assert!(asked > left, "asked {asked}");
        }
        other => panic!("expected a budget error, got {other:?}"),
    }
    assert_eq!(b.len(0).unwrap(), 1, "the refused append changed nothing");
    // The other session still grows within what is left.
    let three = rows(2 * 8 * 3, 3);
    a.append(
        0,
        3,
        bytemuck::cast_slice(&three),
        bytemuck::cast_slice(&three),
    )
    .unwrap();
    assert_eq!(a.layer_stats()[0].capacity, 4);
    let mut out = vec![0u8; 64];
    b.gather(0, 0, &[0], &mut out).unwrap();
    assert_eq!(&out[..32], &blk[..32]);
    let used = store.budget().used();
    drop(a);
    assert_eq!(store.budget().used(), used - 512);
    drop(b);
    assert_eq!((store.budget().used(), link.stats().bytes), (0, 0));
}

#[test]
fn bad_appends_and_gathers_are_refused() {
    let s = f32_session(&Store::unlimited(), 1);
    let e = s
        .append(0, 2, &[0u8; 10], &[0u8; 10])
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs 128 bytes"), "{e}");
    assert!(s
        .append(5, 0, &[], &[])
        .unwrap_err()
        .to_string()
        .contains("layer 5"));
    let mut out = vec![0u8; 64];
    assert!(s
        .gather(0, 0, &[0], &mut out)
        .unwrap_err()
        .to_string()
        .contains("token id 0 out of range"));
    assert!(s
        .gather(0, 9, &[], &mut out)
        .unwrap_err()
        .to_string()
        .contains("kv_head 9"));
}

#[test]
fn dropping_a_session_mid_build_frees_its_memory_at_once() {
    let link = Arc::new(HostLink::new());
    let store =
        Store::new(link.clone(), Arc::new(Budget::new(1 << 30)), 64).with_decode(DecodeConfig {
            sinks: 4,
            window: 8,
            build_threads: 1,
            ..Default::default()
        });
    // Hold the only build thread, so that the build is queued behind it: the session is
    // deterministically mid-build when it is dropped.
    let (release, blocked) = std::sync::mpsc::channel::<()>();
    let (started, running) = std::sync::mpsc::channel::<()>();
    let pool = store.pool.get(1).unwrap();
    pool.spawn(move || {
        let _ = started.send(());
        let _ = blocked.recv();
    });
    running.recv().unwrap();
    let s = Arc::new(f32_session(&store, 1));
    let n = 300;
    let k = rows(2 * n * 8, 3);
    s.append(0, n, bytemuck::cast_slice(&k), bytemuck::cast_slice(&k))
        .unwrap();
    let positions: Vec<u32> = (0..n as u32).step_by(10).collect();
    let q = rows(4 * positions.len() * 8, 9);
    s.seal(
        0,
        kvdex_index::IndexKind::Graph,
        Some(SealTraining {
            vectors: &q,
            positions: &positions,
        }),
    )
    .unwrap();
    assert_eq!(s.build_status(0).unwrap().state, "building");
    assert!(store.budget().used() > 0 && link.stats().bytes > 0);
    // What /stats reports (budget_used_bytes, link_bytes) drops to zero with the session,
    // while its build job is still queued.
    drop(s);
    assert_eq!(store.budget().used(), 0);
    assert_eq!(link.stats().bytes, 0);
    assert_eq!(link.stats().arenas, 0);
    // The job then runs, finds the session gone and returns; the pool serves the next job.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    pool.spawn(move || {
        let _ = done.send(());
    });
    release.send(()).unwrap();
    finished
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap();
}

/// An int8 session: search, gather, fork and truncate all read its codes and scales, and its
/// budget holds codes + scales.
#[test]
fn int8_sessions_search_gather_fork_and_truncate_on_their_rows() {
    let (d, n) = (16usize, 40usize);
    let shape = Shape {
        layers: 1,
        q_heads: 2,
        kv_heads: 1,
        head_dim: d as u32,
        dtype: KeyDtype::F32,
    };
    let spec = SessionSpec {
        kv_format: KvFormat::Int8,
        ..Default::default()
    };
    let s = Store::unlimited().session_spec(shape, spec).unwrap();
    assert_eq!(s.bytes_per_token(), 2 * (d + 2));
    let k: Vec<f32> = (0..n * d)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let v: Vec<f32> = k.iter().map(|x| x * 3.0).collect();
    s.append(0, n, bytemuck::cast_slice(&k), bytemuck::cast_slice(&v))
        .unwrap();
    assert_eq!(s.resident_bytes(), (n * 2 * (d + 2)) as u64);
    // The stored row of token t, as gather returns it (f32 session: dequantized values).
    let row = |s: &Session, t: u32| {
        let mut out = vec![0u8; 2 * d * 4];
        s.gather(0, 0, &[t], &mut out).unwrap();
        bytemuck::cast_slice::<u8, f32>(&out).to_vec()
    };
    for t in [0u32, 17, 39] {
        let r = row(&s, t);
        let want = &k[t as usize * d..(t as usize + 1) * d];
        let step = want.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
        assert!(r[..d].iter().zip(want).all(|(a, b)| (a - b).abs() <= step));
        assert!(r[d..]
            .iter()
            .zip(want)
            .all(|(a, b)| (a - 3.0 * b).abs() <= 3.0 * step));
    }
    // The top key by the stored rows is the top key of a brute force over them.
    let q: Vec<f32> = k[5 * d..6 * d]
        .iter()
        .chain(&k[9 * d..10 * d])
        .copied()
        .collect();
    let (mut ids, mut sc) = (vec![0u32; 2], vec![0f32; 2]);
    s.search(
        0,
        &q,
        1,
        &mut SearchScratch::new(),
        &mut Hits::default(),
        &mut ids,
        &mut sc,
    )
    .unwrap();
    for (h, &id) in ids.iter().enumerate() {
        let score = |t: u32| -> f32 {
            let r = row(&s, t);
            r[..d]
                .iter()
                .zip(&q[h * d..(h + 1) * d])
                .map(|(a, b)| a * b)
                .sum()
        };
        let best = (0..n as u32).map(score).fold(f32::NEG_INFINITY, f32::max);
        assert!((score(id) - best).abs() <= 1e-4 * best.abs().max(1.0));
        assert!((sc[h] - score(id)).abs() <= 1e-4 * best.abs().max(1.0));
    }
    let f = s.fork().unwrap();
    assert_eq!(f.kv_format(), KvFormat::Int8);
    for t in [0u32, 39] {
        assert_eq!(row(&f, t), row(&s, t));
    }
    let before = row(&s, 10);
    s.truncate(12).unwrap();
    assert_eq!((s.len(0).unwrap(), row(&s, 10)), (12, before));
}
