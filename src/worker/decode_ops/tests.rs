//! The engine-destination path of the decode ops (`register_dest`, retrieve with
//! `ENGINE_ROWS`, `unregister_dest`) on a CPU machine: a test link stands in for CUDA IPC by
//! registering a host buffer it owns whenever an "IPC handle" is opened, so everything from the
//! wire to `DeviceLink::gather` runs as on a GPU host.

use std::sync::{Arc, Mutex};

use kvdex_index::KeyDtype;
use kvdex_transfer::{
    AllocStats, Arena, DestId, DestStats, DeviceLink, HostLink, IpcEventHandle, IpcMemHandle, Run,
    Ticket, TransferError,
};

use super::*;
use crate::store::retrieve::RetrieveParams;
use crate::store::{Budget as MemBudget, DecodeConfig, Shape, Store};
use kvdex_wire::decode::dest::encode_unregister;
use kvdex_wire::decode::{EngineRows, RegisterDest};

/// "Engine memory": one host buffer; opening any handle registers `offset..offset + len` of it.
struct FakeIpcLink {
    host: HostLink,
    engine: Mutex<Vec<u8>>,
}

impl FakeIpcLink {
    fn engine_bytes(&self) -> Vec<u8> {
        self.engine.lock().unwrap().clone()
    }
}

impl DeviceLink for FakeIpcLink {
    fn name(&self) -> &'static str {
        "fake-ipc"
    }
    fn alloc_arena(&self, bytes: usize) -> Result<Arena, TransferError> {
        self.host.alloc_arena(bytes)
    }
    fn stats(&self) -> AllocStats {
        self.host.stats()
    }
    fn dest_stats(&self) -> DestStats {
        self.host.dest_stats()
    }
    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<DestId, TransferError> {
        // SAFETY: forwarded contract.
        unsafe { self.host.register_host(ptr, len) }
    }
    fn register_ipc(
        &self,
        _mem: &IpcMemHandle,
        offset: usize,
        len: usize,
        _event: Option<&IpcEventHandle>,
    ) -> Result<DestId, TransferError> {
        let mut buf = self.engine.lock().unwrap();
        if offset + len > buf.len() {
            return Err(TransferError::OutOfRange("past the fake allocation".into()));
        }
        // SAFETY: the buffer is never resized and lives as long as the link, which outlives
        // every registration (sessions hold the link); the test reads it only between requests,
        // after their gathers have been waited on.
        unsafe { self.host.register_host(buf.as_mut_ptr().add(offset), len) }
    }
    fn unregister(&self, dest: DestId) -> Result<(), TransferError> {
        self.host.unregister(dest)
    }
    fn gather(&self, src: &Arena, runs: &[Run], dst: DestId) -> Result<Ticket, TransferError> {
        self.host.gather(src, runs, dst)
    }
    fn poll(&self, ticket: Ticket) -> Result<bool, TransferError> {
        self.host.poll(ticket)
    }
    fn wait(&self, ticket: Ticket) -> Result<(), TransferError> {
        self.host.wait(ticket)
    }
}

const H: usize = 4;
const D: usize = 8;
const K: usize = 6;

fn retrieve_body(into: Option<EngineRows>) -> Vec<u8> {
    let h = RetrieveHeader {
        layer: 0,
        params: RetrieveParams {
            budget: Budget::Fixed(K),
            attend: false,
            gather: true,
            scale: None,
        },
        engine_rows: into,
        positions: 0,
    };
    let q: Vec<f32> = (0..H * D).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
    let mut body = vec![0u8; 1024];
    let n = h.encode(&q, &mut body).unwrap();
    body.truncate(n);
    body
}

#[test]
fn rows_land_in_an_engine_destination_and_bad_ones_are_refused() {
    let link = Arc::new(FakeIpcLink {
        host: HostLink::new(),
        engine: Mutex::new(vec![0xEE; 4096]),
    });
    let store =
        Store::new(link.clone(), Arc::new(MemBudget::unlimited()), 4).with_decode(DecodeConfig {
            sinks: 2,
            window: 4,
            ..Default::default()
        });
    let shape = Shape {
        layers: 1,
        q_heads: H as u32,
        kv_heads: 2,
        head_dim: D as u32,
        dtype: KeyDtype::F32,
    };
    let session = Arc::new(store.session(shape).unwrap());
    let kv: Vec<f32> = (0..2 * 40 * D)
        .map(|i| (i % 23) as f32 * 0.25 - 2.0)
        .collect();
    let bytes: &[u8] = bytemuck::cast_slice(&kv);
    session.append(0, 40, bytes, bytes).unwrap();
    let mut ops = DecodeOps::default();
    let mut out = vec![0u8; 64 << 10];

    // The rows of a plain retrieve, to compare with.
    let n = ops
        .serve(&session, Opcode::Retrieve, &retrieve_body(None), &mut out)
        .unwrap();
    let plain = ResponseHeader::decode(&out[..n]).unwrap();
    let rows_len = H * 2 * plain.stride as usize * plain.row_bytes as usize;
    let want = out[n - rows_len..n].to_vec();

    let reg = RegisterDest {
        offset: 512,
        len: 2048,
        mem: [1; 64],
        event: None,
    };
    let mut body = [0u8; 152];
    reg.encode(&mut body).unwrap();
    assert_eq!(
        ops.serve(&session, Opcode::RegisterDest, &body, &mut out)
            .unwrap(),
        8
    );
    let handle = u32::from_le_bytes(out[..4].try_into().unwrap());
    assert_eq!(session.engine_dest_count(), 1);

    let into = EngineRows {
        dest: handle,
        offset: 64,
    };
    let n = ops
        .serve(
            &session,
            Opcode::Retrieve,
            &retrieve_body(Some(into)),
            &mut out,
        )
        .unwrap();
    let h = ResponseHeader::decode(&out[..n]).unwrap();
    assert_eq!(h.flags & GATHER, 0, "no rows in the response");
    assert_ne!(h.flags & ENGINE_ROWS, 0);
    assert_eq!(n + rows_len, {
        // The response is the plain one without its rows section (and its padding).
        let l = RetrieveLayout::new(H, h.stride as usize, D, h.row_bytes as usize, false, true);
        l.unwrap().len()
    });
    let engine = link.engine_bytes();
    let at = 512 + 64;
    assert_eq!(&engine[at..at + rows_len], &want[..]);
    assert!(
        engine[..at].iter().all(|&b| b == 0xEE),
        "wrote before the rows"
    );
    assert!(
        engine[at + rows_len..].iter().all(|&b| b == 0xEE),
        "wrote after them"
    );

    // Past the destination's end, a misaligned offset, an unknown handle: refused by name, and
    // the session keeps serving.
    for (into, what) in [
        (
            EngineRows {
                dest: handle,
                offset: 2048 - 64,
            },
            "engine destination",
        ),
        (
            EngineRows {
                dest: handle,
                offset: 8,
            },
            "multiples of 16",
        ),
        (EngineRows { dest: 9, offset: 0 }, "engine destination 9"),
    ] {
        let e = ops
            .serve(
                &session,
                Opcode::Retrieve,
                &retrieve_body(Some(into)),
                &mut out,
            )
            .unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
        assert!(!matches!(e, KvdexError::Protocol(_)), "{e}");
    }
    let n = encode_unregister(handle, &mut body).unwrap();
    ops.serve(&session, Opcode::UnregisterDest, &body[..n], &mut out)
        .unwrap();
    assert_eq!(u64::from_le_bytes(out[..8].try_into().unwrap()), 0);
    let e = ops
        .serve(&session, Opcode::UnregisterDest, &body[..n], &mut out)
        .unwrap_err();
    assert!(matches!(e, KvdexError::NotFound(_)), "{e}");

    // A registration still held when the session ends is released with it.
    ops.serve(&session, Opcode::RegisterDest, &body_of(&reg), &mut out)
        .unwrap();
    assert_eq!(link.dest_stats().destinations, 1);
    drop(ops);
    drop(session);
    assert_eq!(link.dest_stats(), DestStats::default());
}

fn body_of(r: &RegisterDest) -> [u8; 152] {
    let mut b = [0u8; 152];
    r.encode(&mut b).unwrap();
    b
}
