//! Unit tests of a layer's arenas: growth, copies, truncation, Slim and int8 layers.
use super::*;
use kvdex_transfer::host::HostLink;

#[test]
fn grow_keeps_rows_and_alignment_and_frees_old_arenas() {
    let link = HostLink::new();
    let mut l = LayerKv::new(Vec::new(), false, KvFormat::Dtype);
    l.grow(&link, 2, 8, 2).unwrap();
    let k: Vec<u8> = (0..32).collect();
    let v: Vec<u8> = (100..132).collect();
    l.write_rows(2, 8, &k, &v);
    assert_eq!(link.stats().arenas, 4);
    l.grow(&link, 2, 8, 5).unwrap();
    assert_eq!(
        link.stats().arenas,
        4,
        "old arenas are freed after the copy"
    );
    assert_eq!(link.stats().bytes, 4 * 64);
    assert_eq!(l.k_bytes(0, 8), &k[..16]);
    assert_eq!(l.k_bytes(1, 8), &k[16..]);
    assert_eq!(l.v_bytes(1, 8), &v[16..]);
    assert_eq!(l.k_bytes(1, 8).as_ptr() as usize % 64, 0);
    assert_eq!(l.held_bytes(2, 8), 4 * 64);
    drop(l);
    assert_eq!(link.stats().bytes, 0);
}

/// A layer nothing was appended to yet has no arena: its (empty) keys must still cast to
/// rows of every dtype; the search of such a layer once panicked the session's worker.
#[test]
fn an_empty_layer_yields_empty_keys_of_every_dtype() {
    let l = LayerKv::new(Vec::new(), false, KvFormat::Dtype);
    for dtype in [KeyDtype::F16, KeyDtype::Bf16, KeyDtype::F32] {
        let keys = l.keys(0, dtype, 8).unwrap();
        assert_eq!(kvdex_index::KeyStore::len(&keys), 0);
    }
    assert!(l.v_bytes(0, 16).is_empty());
}

#[test]
fn truncate_forgets_rows_and_a_copy_holds_the_same_rows() {
    let link = HostLink::new();
    let mut l = LayerKv::new(Vec::new(), false, KvFormat::Dtype);
    l.grow(&link, 2, 8, 4).unwrap();
    let k: Vec<u8> = (0..64).collect();
    let v: Vec<u8> = (100..164).collect();
    l.write_rows(4, 8, &k, &v);
    l.truncate(3);
    assert_eq!(l.k_bytes(1, 8), &k[32..56]);
    let mut c = LayerKv::new(Vec::new(), false, KvFormat::Dtype);
    c.grow(&link, 2, 8, 3).unwrap();
    c.copy_rows_from(&l, 8);
    assert_eq!((c.len, c.k_bytes(1, 8)), (3, &k[32..56]));
    assert_eq!(c.v_bytes(0, 8), &v[..24]);
}

/// An int8 layer quantizes on write, keeps codes and scales through growth and a copy,
/// and charges its scale arenas.
#[test]
fn int8_layers_keep_codes_and_scales_through_growth_and_copies() {
    use kvdex_index::KeyStore;
    let (link, d) = (HostLink::new(), 16usize);
    let mut l = LayerKv::new(Vec::new(), false, KvFormat::Int8);
    l.grow(&link, 2, d, 2).unwrap();
    assert_eq!(link.stats().arenas, 8, "K, V and their scales per KV head");
    let x: Vec<f32> = (0..2 * 3 * d)
        .map(|i| (i as f32 * 0.37).sin() * (1 + i / d) as f32)
        .collect();
    let k: Vec<u8> = bytemuck::cast_slice(&x).to_vec();
    let v: Vec<u8> = x.iter().map(|a| -a).flat_map(f32::to_le_bytes).collect();
    l.grow(&link, 2, d, 3).unwrap();
    l.write_rows_int8(3, KeyDtype::F32, &mut [0.0; 16], &k, &v);
    l.grow(&link, 2, d, 8).unwrap();
    assert_eq!(
        l.held_bytes(2, d),
        2 * 2 * (arena_bytes(8, d) + arena_bytes(8, SCALE_BYTES))
    );
    let mut c = LayerKv::new(Vec::new(), false, KvFormat::Int8);
    c.grow(&link, 2, d, 3).unwrap();
    c.copy_rows_from(&l, d);
    for layer in [&l, &c] {
        for g in 0..2 {
            let (keys, values) = (
                layer.keys(g, KeyDtype::F32, d).unwrap(),
                layer.values(g, KeyDtype::F32, d).unwrap(),
            );
            let mut row = [0.0f32; 16];
            for t in 0..3 {
                let want = &x[(g * 3 + t) * d..(g * 3 + t + 1) * d];
                let amax = want.iter().fold(0.0f32, |m, a| m.max(a.abs()));
                keys.row_f32(t as u32, &mut row);
                assert!(row
                    .iter()
                    .zip(want)
                    .all(|(a, b)| (a - b).abs() <= amax / 127.0));
                values.row_f32(t as u32, &mut row);
                assert!(row
                    .iter()
                    .zip(want)
                    .all(|(a, b)| (a + b).abs() <= amax / 127.0));
            }
        }
    }
}

#[test]
fn slim_layers_hold_k_only() {
    let link = HostLink::new();
    let mut l = LayerKv::new(Vec::new(), true, KvFormat::Dtype);
    l.grow(&link, 2, 16, 2).unwrap();
    assert_eq!(link.stats().arenas, 2, "one arena per KV head");
    let k: Vec<u8> = (0..64).collect();
    l.write_rows(2, 16, &k, &[]);
    l.grow(&link, 2, 16, 4).unwrap();
    assert_eq!(l.k_bytes(1, 16), &k[32..]);
    assert!(l.v_bytes(1, 16).is_empty());
    assert_eq!(l.held_bytes(2, 16), 2 * 64);
}
