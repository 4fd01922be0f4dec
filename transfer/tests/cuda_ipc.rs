//! CUDA IPC destinations, as an engine in another process hands them over: this test binary
//! runs itself a second time as the "engine", which allocates GPU memory, exports an IPC
//! memory handle and an IPC event, and checks what the link's gather wrote there.
//!
//! Skipped (saying so) without a CUDA driver; with `KVDEX_REQUIRE_CUDA=1` that fails instead.

use std::ffi::c_char;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use cudarc::driver::sys;
use kvdex_transfer::cuda::CudaLink;
use kvdex_transfer::{DeviceLink, IpcEventHandle, IpcMemHandle, Run, TransferError};
use rand::{Rng, SeedableRng};

/// The engine's allocation, and the range of it registered as the destination.
const ALLOC: usize = 1 << 20;
const OFFSET: usize = 64 << 10;
const LEN: usize = 512 << 10;
/// Set in the child's environment: it is the engine.
const CHILD_ENV: &str = "KVDEX_IPC_ENGINE";

fn ok(call: &str, rc: sys::CUresult) {
    assert_eq!(rc, sys::CUresult::CUDA_SUCCESS, "{call}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex");
    }
    out
}

/// FNV-1a: how the engine reports what landed without sending it all back.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The engine side: runs only in the child process (`CHILD_ENV` set); in a normal test run it
/// returns at once, and the parent test below is the one that checks.
#[test]
fn ipc_engine_process() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // SAFETY: plain driver calls with out-pointers to locals, on one thread, in order.
    unsafe {
        ok("cuInit", sys::cuInit(0));
        let mut dev = 0;
        ok("cuDeviceGet", sys::cuDeviceGet(&mut dev, 0));
        let mut ctx = std::ptr::null_mut();
        ok(
            "cuDevicePrimaryCtxRetain",
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
        );
        ok("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx));
        let mut buf = 0;
        ok("cuMemAlloc", sys::cuMemAlloc_v2(&mut buf, ALLOC));
        ok("cuMemsetD8", sys::cuMemsetD8_v2(buf, 0xAB, ALLOC));
        let mut mem = sys::CUipcMemHandle { reserved: [0; 64] };
        ok("cuIpcGetMemHandle", sys::cuIpcGetMemHandle(&mut mem, buf));
        let mut ev = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32
            | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        ok("cuEventCreate", sys::cuEventCreate(&mut ev, flags));
        let mut evh = sys::CUipcEventHandle { reserved: [0; 64] };
        ok(
            "cuIpcGetEventHandle",
            sys::cuIpcGetEventHandle(&mut evh, ev),
        );
        let bytes = |r: [c_char; 64]| r.map(|c| c as u8);
        println!(
            "HANDLES {} {}",
            hex(&bytes(mem.reserved)),
            hex(&bytes(evh.reserved))
        );
        std::io::stdout().flush().expect("stdout");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("stdin");
        assert_eq!(line.trim(), "GATHERED");
        // The daemon recorded the event after its copies: waiting on it is how an engine
        // orders its own use of the data.
        ok("cuEventSynchronize", sys::cuEventSynchronize(ev));
        let mut host = vec![0u8; ALLOC];
        ok(
            "cuMemcpyDtoH",
            sys::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), buf, ALLOC),
        );
        println!("HASH {:016x}", fnv(&host));
        std::io::stdout().flush().expect("stdout");
        ok("cuEventDestroy", sys::cuEventDestroy_v2(ev));
        ok("cuMemFree", sys::cuMemFree_v2(buf));
    }
}

#[test]
fn cuda_ipc_gather_lands_in_another_process() {
    let link = match CudaLink::new(0) {
        Ok(link) => link,
        Err(e) => {
            let required = std::env::var("KVDEX_REQUIRE_CUDA").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "KVDEX_REQUIRE_CUDA=1 but CUDA is unavailable: {e}"
            );
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: cuda_ipc_gather_lands_in_another_process: no CUDA ({e})"
            );
            return;
        }
    };
    let mut engine = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "ipc_engine_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the engine process");
    let mut out = BufReader::new(engine.stdout.take().expect("stdout"));
    let mut tagged = |tag: &str| -> Vec<String> {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(out.read_line(&mut line).expect("read") > 0, "engine exited");
            // The test harness prints "test ipc_engine_process ... " with no newline before
            // the engine's own output, so the tag can start mid-line.
            if let Some(at) = line.find(tag) {
                return line[at + tag.len()..]
                    .split_whitespace()
                    .map(String::from)
                    .collect();
            }
        }
    };
    let handles = tagged("HANDLES ");
    let mem = IpcMemHandle(unhex(&handles[0]));
    let ev = IpcEventHandle(unhex(&handles[1]));

    // A range past the allocation is refused, naming it.
    let e = link
        .register_ipc(&mem, ALLOC - 4096, 8192, None)
        .unwrap_err();
    assert!(matches!(e, TransferError::OutOfRange(_)), "{e}");

    let dst = link.register_ipc(&mem, OFFSET, LEN, Some(&ev)).unwrap();
    let src = link.alloc_arena(16 << 20).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // SAFETY: the test owns the arena and no gather is in flight.
    let arena = unsafe { std::slice::from_raw_parts_mut(src.as_mut_ptr(), src.len()) };
    rng.fill(arena);
    // 256-byte rows (staged) and two 64 KiB blocks (direct DMA), packed with gaps.
    let mut runs = Vec::new();
    let mut at = 0u64;
    for i in 0..900u64 {
        let len = if i % 450 == 0 { 64 << 10 } else { 256 };
        let src_offset = rng.gen_range(0..(src.len() as u64 - len) / 256) * 256;
        runs.push(Run {
            src_offset,
            dst_offset: at,
            len,
        });
        at += len + if i % 7 == 0 { 256 } else { 0 };
    }
    assert!(at <= LEN as u64);
    let t = link.gather(&src, &runs, dst).unwrap();
    link.wait(t).unwrap();

    let mut want = vec![0xABu8; ALLOC];
    for r in &runs {
        let (s, d, l) = (
            r.src_offset as usize,
            OFFSET + r.dst_offset as usize,
            r.len as usize,
        );
        want[d..d + l].copy_from_slice(&arena[s..s + l]);
    }
    // Closing the daemon's mapping leaves the engine's memory as written.
    link.unregister(dst).unwrap();
    let stdin = engine.stdin.as_mut().expect("stdin");
    writeln!(stdin, "GATHERED").expect("write");
    stdin.flush().expect("flush");
    let hash = tagged("HASH ");
    assert_eq!(
        hash[0],
        format!("{:016x}", fnv(&want)),
        "engine memory differs"
    );
    assert!(engine.wait().expect("engine").success());
    assert_eq!(link.dest_stats(), kvdex_transfer::DestStats::default());
}
