//! Engine destinations on the wire: `register_dest`, `unregister_dest`, and the retrieve
//! extension ([`ENGINE_ROWS`]) that sends the gathered rows into one of them.
//!
//! | op              | request body | response body |
//! |-----------------|--------------|---------------|
//! | register_dest   | kind u32 (1: CUDA IPC), flags u32 (1: has event), offset u64, len u64, IPC memory handle `[64]`, IPC event handle `[64]` (zeros without the flag) | handle u32, 0 u32 |
//! | unregister_dest | handle u32, 0 u32 | registrations left, u64 |
//!
//! With [`ENGINE_ROWS`] (which needs [`GATHER`]), 16 bytes follow the retrieve header: handle
//! u32, 0 u32, offset u64. The rows, laid out `[q_heads][2][stride][row_bytes]` as in the
//! response, are written at that offset of the destination instead of into the response.

use super::{u32_at, ENGINE_ROWS, GATHER};
use crate::error::{Error, Result};

/// Bytes of the register_dest body.
pub const REGISTER_DEST_BODY: usize = 152;
/// Bytes of the unregister_dest body.
pub const UNREGISTER_DEST_BODY: usize = 8;
/// Bytes that follow the retrieve header when [`ENGINE_ROWS`] is set.
pub const ENGINE_ROWS_EXT: usize = 16;
/// register_dest kind: a CUDA IPC memory handle of the engine's GPU buffer.
pub const DEST_KIND_CUDA_IPC: u32 = 1;
/// register_dest flag: an IPC event handle follows, recorded after each gather into the buffer.
pub const DEST_HAS_EVENT: u32 = 1;

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// An engine GPU buffer offered as a gather destination (`register_dest`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterDest {
    /// Byte offset of the buffer in the allocation the handle names (a caching allocator
    /// hands out tensors inside larger allocations).
    pub offset: u64,
    /// Bytes of the buffer.
    pub len: u64,
    /// `cuIpcGetMemHandle` of the allocation.
    pub mem: [u8; 64],
    /// `cuIpcGetEventHandle` of an interprocess event to record after each gather, if any.
    pub event: Option<[u8; 64]>,
}

impl RegisterDest {
    /// Decodes and checks a register_dest body.
    pub fn decode(body: &[u8]) -> Result<Self> {
        if body.len() != REGISTER_DEST_BODY {
            return Err(Error::BadRequest(format!(
                "register_dest body is {} bytes, needs {REGISTER_DEST_BODY}",
                body.len()
            )));
        }
        let bad = |m: String| Err(Error::BadRequest(m));
        let (kind, flags) = (u32_at(body, 0), u32_at(body, 4));
        let (Some(kind), Some(flags)) = (kind, flags) else {
            return bad("register_dest header is short".into());
        };
        if kind != DEST_KIND_CUDA_IPC {
            return bad(format!(
                "register_dest kind {kind} is unknown (1: CUDA IPC memory handle)"
            ));
        }
        if flags & !DEST_HAS_EVENT != 0 {
            return bad(format!("register_dest flags {flags:#x} are unknown"));
        }
        let (Some(offset), Some(len)) = (u64_at(body, 8), u64_at(body, 16)) else {
            return bad("register_dest header is short".into());
        };
        if len == 0 {
            return bad("register_dest len is 0".into());
        }
        let mut mem = [0u8; 64];
        mem.copy_from_slice(&body[24..88]);
        let mut event = [0u8; 64];
        event.copy_from_slice(&body[88..152]);
        let event = if flags & DEST_HAS_EVENT != 0 {
            Some(event)
        } else if event != [0; 64] {
            return bad("register_dest has an event handle but not the has-event flag".into());
        } else {
            None
        };
        Ok(Self {
            offset,
            len,
            mem,
            event,
        })
    }

    /// Writes the body into `out`; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        let out = out
            .get_mut(..REGISTER_DEST_BODY)
            .ok_or_else(|| Error::BadRequest("register_dest does not fit the arena".into()))?;
        let flags = if self.event.is_some() {
            DEST_HAS_EVENT
        } else {
            0
        };
        out[0..4].copy_from_slice(&DEST_KIND_CUDA_IPC.to_le_bytes());
        out[4..8].copy_from_slice(&flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out[24..88].copy_from_slice(&self.mem);
        out[88..152].copy_from_slice(&self.event.unwrap_or([0; 64]));
        Ok(REGISTER_DEST_BODY)
    }
}

/// Decodes an unregister_dest body: the handle.
pub fn decode_unregister(body: &[u8]) -> Result<u32> {
    match (body.len(), u32_at(body, 0), u32_at(body, 4)) {
        (UNREGISTER_DEST_BODY, Some(handle), Some(0)) => Ok(handle),
        _ => Err(Error::BadRequest(format!(
            "unregister_dest body must be {UNREGISTER_DEST_BODY} bytes: handle u32, 0 u32"
        ))),
    }
}

/// Writes an unregister_dest body; returns its length.
pub fn encode_unregister(handle: u32, out: &mut [u8]) -> Result<usize> {
    let out = out
        .get_mut(..UNREGISTER_DEST_BODY)
        .ok_or_else(|| Error::BadRequest("unregister_dest does not fit the arena".into()))?;
    out[..4].copy_from_slice(&handle.to_le_bytes());
    out[4..].copy_from_slice(&0u32.to_le_bytes());
    Ok(UNREGISTER_DEST_BODY)
}

/// Where a retrieve's rows go instead of the response: a registered engine destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineRows {
    /// The handle `register_dest` returned.
    pub dest: u32,
    /// Byte offset of the rows in the destination (a multiple of 16).
    pub offset: u64,
}

impl EngineRows {
    /// Splits the extension off the bytes after the retrieve header when `flags` has
    /// [`ENGINE_ROWS`].
    pub(super) fn split(flags: u32, rest: &[u8]) -> Result<(Option<Self>, &[u8])> {
        if flags & ENGINE_ROWS == 0 {
            return Ok((None, rest));
        }
        if flags & GATHER == 0 {
            return Err(Error::BadRequest(format!(
                "retrieve flag ENGINE_ROWS ({ENGINE_ROWS:#x}) needs GATHER ({GATHER:#x})"
            )));
        }
        let Some((ext, query)) = rest.split_at_checked(ENGINE_ROWS_EXT) else {
            return Err(Error::BadRequest(format!(
                "retrieve with ENGINE_ROWS needs {ENGINE_ROWS_EXT} bytes after the header"
            )));
        };
        match (u32_at(ext, 0), u32_at(ext, 4), u64_at(ext, 8)) {
            (Some(dest), Some(0), Some(offset)) => Ok((Some(Self { dest, offset }), query)),
            _ => Err(Error::BadRequest(
                "retrieve ENGINE_ROWS extension word 1 is reserved and must be 0".into(),
            )),
        }
    }

    /// Writes the extension into `out` (16 bytes).
    pub(super) fn write(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.dest.to_le_bytes());
        out[4..8].copy_from_slice(&0u32.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
    }
}
