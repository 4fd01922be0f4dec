use std::time::Instant;
fn main() {
    let n = 64usize << 20;
    let mut srcs: Vec<Vec<u8>> = (0..4).map(|i| vec![0x3c ^ i as u8; n]).collect();
    let mut dst = vec![0u8; n];
    let masks: u64 = 0x7c00 * 0x0001_0001_0001_0001; let ones: u64 = 0x0001_0001_0001_0001; let highs: u64 = 0x8000_8000_8000_8000;
    let check = |b: &[u8]| -> bool { let (_, w, _) = bytemuck_like(b); let mut acc = 0u64; for &x in w { let v = (x & masks) ^ masks; acc |= v.wrapping_sub(ones) & !v & highs; } acc != 0 };
    for round in 0..3 {
        // copy only (cold src: rotate buffers)
        let t = Instant::now(); dst.copy_from_slice(std::hint::black_box(&srcs[(round*2)%4])); let c = t.elapsed();
        let t = Instant::now(); let bad = check(std::hint::black_box(&srcs[(round*2+1)%4])); dst.copy_from_slice(&srcs[(round*2+1)%4]); let cc = t.elapsed();
        let t = Instant::now(); let mut bad2 = false; for (d, s) in dst.chunks_mut(4096).zip(srcs[(round*2+2)%4].chunks(4096)) { bad2 |= check(s); d.copy_from_slice(s); } let f = t.elapsed();
        println!("copy {:?} check+copy {:?} fused {:?} {bad} {bad2}", c, cc, f);
        srcs[0][0] ^= 1;
    }
    std::hint::black_box(&dst);
}
// SAFETY: every bit pattern is a valid u64, and align_to's middle is aligned and in bounds
// (std-only stand-in for bytemuck::pod_align_to, which the daemon uses).
fn bytemuck_like(b: &[u8]) -> (&[u8], &[u64], &[u8]) { unsafe { b.align_to::<u64>() } }
