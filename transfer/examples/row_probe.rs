//! Probe (not a benchmark of record) behind the small-row choices in `copy.rs`: variants of a
//! gather of random rows (default 256 B) from a 1 GiB arena into a 32 MiB batch, each timed
//! against a contiguous `memcpy` of the same bytes measured just before it ("paired").
//!
//! `cargo run --release -p kvdex-transfer --example row_probe -- [reps] [row_bytes] [nohuge]`
//! (`V=naive,lib,nt16x1` picks variants; `nohuge` advises the arena `MADV_NOHUGEPAGE`).
//! Variants: `naive` (one `memcpy` per row), `pfDxL` (prefetch L lines of the row D ahead),
//! `ntDxL` (the same with non-temporal stores), `nt0` (no prefetch), `lib` / `libpf` (this
//! crate's streaming / ordinary run loops).

use std::time::Instant;

use rand::{Rng, SeedableRng};

const ARENA: usize = 1 << 30;
const BATCH: usize = 32 << 20;

#[inline(always)]
fn pf(p: *const u8) {
    // SAFETY: a hint.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()) };
}

fn naive(src: &[u8], dst: &mut [u8], offs: &[usize], row: usize) {
    for (i, &o) in offs.iter().enumerate() {
        dst[i * row..(i + 1) * row].copy_from_slice(&src[o..o + row]);
    }
}

#[inline(always)]
fn pf_loop<const D: usize>(src: &[u8], dst: &mut [u8], offs: &[usize], row: usize, lines: usize) {
    let s = src.as_ptr();
    for (i, &o) in offs.iter().enumerate() {
        if let Some(&a) = offs.get(i + D) {
            let mut l = 0;
            while l < lines {
                pf(s.wrapping_add(a + l * 64));
                l += 1;
            }
        }
        dst[i * row..(i + 1) * row].copy_from_slice(&src[o..o + row]);
    }
}

#[target_feature(enable = "avx2")]
unsafe fn nt_loop<const D: usize, const L: usize>(
    src: &[u8],
    dst: &mut [u8],
    offs: &[usize],
    row: usize,
) {
    use std::arch::x86_64::*;
    let s = src.as_ptr();
    let d = dst.as_mut_ptr();
    for (i, &o) in offs.iter().enumerate() {
        if let Some(&a) = offs.get(i + D) {
            for l in 0..L.min(row / 64) {
                pf(s.wrapping_add(a + l * 64));
            }
        }
        let mut k = 0;
        while k < row {
            let v0 = _mm256_loadu_si256(s.add(o + k).cast());
            let v1 = _mm256_loadu_si256(s.add(o + k + 32).cast());
            _mm256_stream_si256(d.add(i * row + k).cast(), v0);
            _mm256_stream_si256(d.add(i * row + k + 32).cast(), v1);
            k += 64;
        }
    }
    _mm_sfence();
}

thread_local! {
    static RUNS: std::cell::RefCell<Vec<kvdex_transfer::Run>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn lib_stream(src: &[u8], dst: &mut [u8], _offs: &[usize], _row: usize) {
    lib(src, dst, true)
}

fn lib_plain(src: &[u8], dst: &mut [u8], _offs: &[usize], _row: usize) {
    lib(src, dst, false)
}

/// `nt_loop::<16, 1>` over the `Run` structs (is it the data or the loop?).
#[target_feature(enable = "avx2")]
unsafe fn nt_runs(src: &[u8], dst: &mut [u8], _offs: &[usize], _row: usize) {
    use std::arch::x86_64::*;
    let s = src.as_ptr();
    let d = dst.as_mut_ptr();
    RUNS.with_borrow(|runs| {
        for (i, r) in runs.iter().enumerate() {
            if let Some(a) = runs.get(i + 16) {
                pf(s.wrapping_add(a.src_offset as usize));
            }
            let (o, at, row) = (r.src_offset as usize, r.dst_offset as usize, r.len as usize);
            let mut k = 0;
            while k < row {
                let v0 = _mm256_loadu_si256(s.add(o + k).cast());
                let v1 = _mm256_loadu_si256(s.add(o + k + 32).cast());
                _mm256_stream_si256(d.add(at + k).cast(), v0);
                _mm256_stream_si256(d.add(at + k + 32).cast(), v1);
                k += 64;
            }
        }
    });
    _mm_sfence();
}

thread_local! {
    static SORTED: std::cell::RefCell<(Vec<u32>, Vec<kvdex_transfer::Run>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Counting sort of the runs by 2 MiB source page (timed), then the streaming loop over them.
fn bucketed(src: &[u8], dst: &mut [u8], _offs: &[usize], _row: usize) {
    const SHIFT: u32 = 21;
    RUNS.with_borrow(|runs| {
        SORTED.with_borrow_mut(|(counts, out)| {
            let pages = (src.len() >> SHIFT) + 1;
            counts.clear();
            counts.resize(pages + 1, 0);
            for r in runs.iter() {
                counts[(r.src_offset >> SHIFT) as usize + 1] += 1;
            }
            for i in 1..counts.len() {
                counts[i] += counts[i - 1];
            }
            out.clear();
            out.resize(
                runs.len(),
                kvdex_transfer::Run {
                    src_offset: 0,
                    dst_offset: 0,
                    len: 0,
                },
            );
            for r in runs.iter() {
                let b = (r.src_offset >> SHIFT) as usize;
                out[counts[b] as usize] = *r;
                counts[b] += 1;
            }
            // SAFETY: the same runs, reordered; destinations are disjoint.
            unsafe {
                kvdex_transfer::copy::copy_runs_streaming(src.as_ptr(), dst.as_mut_ptr(), out)
            };
        });
    });
}

/// The crate's run loops over `RUNS`, which `main` fills from the offsets before timing.
fn lib(src: &[u8], dst: &mut [u8], stream: bool) {
    RUNS.with_borrow_mut(|runs| {
        // SAFETY: every run was drawn inside the arena and the batch.
        unsafe {
            if stream {
                kvdex_transfer::copy::copy_runs_streaming(src.as_ptr(), dst.as_mut_ptr(), runs)
            } else {
                kvdex_transfer::copy::copy_runs_prefetch(src.as_ptr(), dst.as_mut_ptr(), runs)
            }
        };
    });
}

/// `nt_loop` behind the CPU check its `#[target_feature]` needs.
fn nt<const D: usize, const L: usize>(src: &[u8], dst: &mut [u8], offs: &[usize], row: usize) {
    assert!(is_x86_feature_detected!("avx2"), "row_probe needs AVX2");
    // SAFETY: AVX2 was detected just above; the loop bounds every access by the slices.
    unsafe { nt_loop::<D, L>(src, dst, offs, row) }
}

/// `nt_runs` behind the CPU check its `#[target_feature]` needs.
fn nt_runs_checked(src: &[u8], dst: &mut [u8], offs: &[usize], row: usize) {
    assert!(is_x86_feature_detected!("avx2"), "row_probe needs AVX2");
    // SAFETY: AVX2 was detected just above; the loop bounds every access by the slices.
    unsafe { nt_runs(src, dst, offs, row) }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let row: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let nohuge = args.get(3).is_some_and(|s| s == "nohuge");
    // SAFETY: plain anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ARENA + (2 << 20),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as *mut u8;
    let p = p.wrapping_add(p.align_offset(2 << 20));
    // SAFETY: inside the mapping.
    unsafe {
        libc::madvise(
            p.cast(),
            ARENA,
            if nohuge {
                libc::MADV_NOHUGEPAGE
            } else {
                libc::MADV_HUGEPAGE
            },
        )
    };
    // SAFETY: inside the mapping.
    let src = unsafe { std::slice::from_raw_parts_mut(p, ARENA) };
    for (i, c) in src.chunks_mut(1 << 20).enumerate() {
        c.fill(i as u8);
    }
    let smaps = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    for l in smaps.lines().filter(|l| l.contains("AnonHuge")) {
        println!("{l}");
    }
    let src: &[u8] = src;
    let mut dbuf = vec![0u8; BATCH + 4096];
    let off = dbuf.as_ptr().align_offset(4096);
    let dst = &mut dbuf[off..off + BATCH];
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let n = BATCH / row;
    let mut offs = vec![0usize; n];
    type F = fn(&[u8], &mut [u8], &[usize], usize);
    let variants: Vec<(&str, F)> = vec![
        ("naive", naive),
        ("lib", lib_stream),
        ("libpf", lib_plain),
        ("pf8x4", |s, d, o, r| pf_loop::<8>(s, d, o, r, 4)),
        ("pf16x4", |s, d, o, r| pf_loop::<16>(s, d, o, r, 4)),
        ("pf32x4", |s, d, o, r| pf_loop::<32>(s, d, o, r, 4)),
        ("pf8x1", |s, d, o, r| pf_loop::<8>(s, d, o, r, 1)),
        ("pf16x1", |s, d, o, r| pf_loop::<16>(s, d, o, r, 1)),
        ("pf32x1", |s, d, o, r| pf_loop::<32>(s, d, o, r, 1)),
        ("pf16x2", |s, d, o, r| pf_loop::<16>(s, d, o, r, 2)),
        ("nt8x4", nt::<8, 4>),
        ("nt16x4", nt::<16, 4>),
        ("nt32x4", nt::<32, 4>),
        ("nt8x1", nt::<8, 1>),
        ("nt16x1", nt::<16, 1>),
        ("nt32x1", nt::<32, 1>),
        ("nt4x1", nt::<4, 1>),
        ("nt8x2", nt::<8, 2>),
        ("nt0", nt::<0, 0>),
        ("nt16x2", nt::<16, 2>),
        ("lib2", lib_stream),
        ("bucket", bucketed),
        ("ntruns", nt_runs_checked),
        ("naive2", naive),
    ];

    let pick: Vec<String> = std::env::var("V")
        .map(|v| v.split(',').map(String::from).collect())
        .unwrap_or_default();
    let variants: Vec<(&str, F)> = variants
        .into_iter()
        .filter(|v| pick.is_empty() || pick.iter().any(|p| p == v.0))
        .collect();
    let mut times: Vec<Vec<f64>> = vec![vec![]; variants.len() + 1];
    let mut paired: Vec<Vec<f64>> = vec![vec![]; variants.len()];
    for _ in 0..reps {
        for (k, (_, f)) in variants.iter().enumerate() {
            let start = rng.gen_range(0..(ARENA - BATCH) / 4096) * 4096;
            let t = Instant::now();
            dst.copy_from_slice(&src[start..start + BATCH]);
            let tc = t.elapsed().as_secs_f64();
            for o in offs.iter_mut() {
                *o = rng.gen_range(0..ARENA / row) * row;
            }
            RUNS.with_borrow_mut(|runs| {
                runs.clear();
                runs.extend(offs.iter().enumerate().map(|(i, &o)| kvdex_transfer::Run {
                    src_offset: o as u64,
                    dst_offset: (i * row) as u64,
                    len: row as u64,
                }));
            });
            let t = Instant::now();
            f(src, dst, &offs, row);
            let tv = t.elapsed().as_secs_f64();
            times[k].push(tv);
            paired[k].push(tc / tv);
        }
        let start = rng.gen_range(0..(ARENA - BATCH) / 4096) * 4096;
        let t = Instant::now();
        dst.copy_from_slice(&src[start..start + BATCH]);
        times[variants.len()].push(t.elapsed().as_secs_f64());
    }
    let names: Vec<&str> = variants.iter().map(|v| v.0).chain(["contig"]).collect();
    for (k, t) in times.iter_mut().enumerate() {
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        let pr = paired
            .get_mut(k)
            .map(|p| {
                p.sort_by(f64::total_cmp);
                p[p.len() / 2]
            })
            .unwrap_or(1.0);
        println!(
            "{:10} paired {:4.0}% p50 {:6.2} GB/s  best {:6.2} GB/s",
            names[k],
            pr * 100.0,
            BATCH as f64 / med / 1e9,
            BATCH as f64 / t[0] / 1e9
        );
    }
    std::hint::black_box(&dbuf);
}
