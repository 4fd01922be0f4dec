//! Append, search and gather through a real region and worker, checked against brute force.

mod shm_common;

use kvdex_client::Client;
use shm_common::*;

#[test]
fn ping_echoes_small_and_large_payloads() {
    let s = serve(f32_shape(1, 2, 1, 4), 1 << 16, "ping");
    let mut h = Client::attach_with(&s.path, &s.token, test_wait()).unwrap();
    for len in [0usize, 1, 64, 8192, 30_000] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        assert_eq!(h.ping(&data).unwrap(), &data[..], "echo of {len} bytes");
    }
    // Spaced requests: the worker parks between them and must be woken by the doorbell.
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(15));
        assert_eq!(h.ping(b"cold").unwrap(), b"cold");
    }
}

#[test]
fn append_search_gather_match_brute_force() {
    let (layers, q_heads, kv_heads, dim) = (2u32, 4u32, 2u32, 16usize);
    let s = serve(
        f32_shape(layers, q_heads, kv_heads, dim as u32),
        1 << 20,
        "ops",
    );
    let mut h = Client::attach_with(&s.path, &s.token, test_wait()).unwrap();
    assert_eq!(h.shape(), s.session.shape());
    // Three blocks per layer; keep our own copy of K and V per (layer, kv head).
    let mut keys = vec![vec![Vec::<f32>::new(); kv_heads as usize]; layers as usize];
    let mut vals = keys.clone();
    let mut total = 0u64;
    for (block, tokens) in [37usize, 1, 90].into_iter().enumerate() {
        total += tokens as u64;
        for layer in 0..layers {
            let k = values(
                kv_heads as usize * tokens * dim,
                1 + block as u64 * 10 + layer as u64,
            );
            let v = values(
                kv_heads as usize * tokens * dim,
                100 + block as u64 * 10 + layer as u64,
            );
            let len = h
                .append(
                    layer,
                    tokens as u32,
                    bytemuck::cast_slice(&k),
                    bytemuck::cast_slice(&v),
                )
                .unwrap();
            assert_eq!(len, total);
            for kvh in 0..kv_heads as usize {
                let r = kvh * tokens * dim..(kvh + 1) * tokens * dim;
                keys[layer as usize][kvh].extend_from_slice(&k[r.clone()]);
                vals[layer as usize][kvh].extend_from_slice(&v[r]);
            }
        }
    }
    let n = total as usize;
    let group = (q_heads / kv_heads) as usize;
    for layer in 0..layers as usize {
        let q = values(q_heads as usize * dim, 7 + layer as u64);
        let k = 10usize;
        let mut ids = vec![0u32; q_heads as usize * k];
        let mut scores = vec![0f32; q_heads as usize * k];
        let used = h
            .search(layer as u32, &q, k as u32, &mut ids, &mut scores)
            .unwrap();
        assert_eq!(used, k);
        for qh in 0..q_heads as usize {
            let kv = &keys[layer][qh / group];
            let mut exact: Vec<(f32, u32)> = (0..n)
                .map(|t| {
                    (
                        (0..dim).map(|d| q[qh * dim + d] * kv[t * dim + d]).sum(),
                        t as u32,
                    )
                })
                .collect();
            exact.sort_by(|a, b| b.0.total_cmp(&a.0));
            let got = &ids[qh * k..(qh + 1) * k];
            let want: Vec<u32> = exact[..k].iter().map(|e| e.1).collect();
            assert_eq!(got, &want[..], "layer {layer} head {qh}");
            for (s, e) in scores[qh * k..(qh + 1) * k].iter().zip(&exact) {
                assert!((s - e.0).abs() < 1e-4, "score {s} vs {}", e.0);
            }
        }
        // Gather the first head's hits for each KV head and compare rows byte for byte.
        for kvh in 0..kv_heads {
            let want_ids = &ids[..k];
            let rows = h.gather(layer as u32, kvh, want_ids).unwrap();
            assert_eq!(rows.row_bytes, dim * 4);
            let (gk, gv): (&[f32], Vec<f32>) = (
                bytemuck::cast_slice(rows.k),
                bytemuck::cast_slice(rows.v).to_vec(),
            );
            for (i, &id) in want_ids.iter().enumerate() {
                let r = id as usize * dim..(id as usize + 1) * dim;
                assert_eq!(
                    &gk[i * dim..(i + 1) * dim],
                    &keys[layer][kvh as usize][r.clone()]
                );
                assert_eq!(&gv[i * dim..(i + 1) * dim], &vals[layer][kvh as usize][r]);
            }
        }
    }
    // k larger than the layer is clamped.
    let q = values(q_heads as usize * dim, 3);
    let mut ids = vec![0u32; q_heads as usize * n];
    let mut scores = vec![0f32; q_heads as usize * n];
    assert_eq!(h.search(0, &q, 100_000, &mut ids, &mut scores).unwrap(), n);
    assert_eq!(s.session.len(1).unwrap(), n);
}

#[test]
fn store_errors_come_back_as_error_completions() {
    let s = serve(f32_shape(1, 2, 1, 4), 1 << 16, "store-err");
    let mut h = Client::attach_with(&s.path, &s.token, test_wait()).unwrap();
    let e = h.append(5, 1, &[0; 16], &[0; 16]).unwrap_err().to_string();
    assert!(e.contains("layer 5"), "{e}");
    let e = h.append(0, 2, &[0; 16], &[0; 16]).unwrap_err().to_string();
    assert!(e.contains("needs 32 bytes"), "{e}");
    // A NaN or infinity in K or V is named and refused; nothing is stored.
    let mut nan = [0u8; 16];
    nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = h.append(0, 1, &nan, &[0; 16]).unwrap_err().to_string();
    assert!(
        e.contains("K value 2 (kv head 0, token 0 of 1, dim 2) is NaN or infinite"),
        "{e}"
    );
    let inf = f32::NEG_INFINITY.to_le_bytes().repeat(4);
    let e = h.append(0, 1, &[0; 16], &inf).unwrap_err().to_string();
    assert!(e.contains("V value 0"), "{e}");
    h.append(0, 1, &[0; 16], &[0; 16]).unwrap();
    let e = h.gather(0, 0, &[3]).unwrap_err().to_string();
    assert!(e.contains("token id 3 out of range"), "{e}");
    assert!(
        h.gather(0, 0, &[1]).is_err(),
        "the refused appends stored nothing"
    );
    let e = h.gather(0, 9, &[0]).unwrap_err().to_string();
    assert!(e.contains("kv_head 9"), "{e}");
    let mut ids = [0u32; 2];
    let mut sc = [0f32; 2];
    let e = h
        .search(0, &[1.0; 3], 1, &mut ids, &mut sc)
        .unwrap_err()
        .to_string();
    assert!(e.contains("query has 3 values"), "{e}");
    // The session keeps serving after errors.
    assert_eq!(h.search(0, &[1.0; 8], 1, &mut ids, &mut sc).unwrap(), 1);
}
