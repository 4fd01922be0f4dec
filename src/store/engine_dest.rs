//! Engine destinations of a session: GPU buffers the engine offered through CUDA IPC, into
//! which retrieves gather rows directly.
//!
//! The session owns each registration ([`Registration`] unregisters on drop, waiting out
//! gathers still writing), so a session that ends, or whose client dies and is reaped, closes
//! its IPC mappings with it. Handles are small numbers, never reused within a session, so a
//! stale handle is an error rather than someone else's buffer.

use std::collections::HashMap;
use std::sync::PoisonError;

use kvdex_transfer::{DestId, IpcEventHandle, IpcMemHandle, Registration, TransferError};

use super::Session;
use crate::error::{KvdexError, Result};

/// Registrations one session may hold at once: an engine needs one buffer per layer or per
/// pipeline slot, and each open IPC mapping costs driver resources.
pub const MAX_ENGINE_DESTS: usize = 1024;

/// A session's engine destinations by handle.
#[derive(Debug, Default)]
pub(crate) struct EngineDests {
    next: u32,
    by_handle: HashMap<u32, Registration>,
}

impl Session {
    /// Opens the engine's GPU buffer (the `len` bytes at `offset` of the allocation that `mem`
    /// names) as a gather destination of this session; returns its handle. `event`, if given,
    /// is recorded after each gather into it. Needs the CUDA transfer backend.
    pub fn register_cuda_dest(
        &self,
        mem: &IpcMemHandle,
        offset: u64,
        len: u64,
        event: Option<&IpcEventHandle>,
    ) -> Result<u32> {
        let (offset, len) = match (usize::try_from(offset), usize::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(KvdexError::BadRequest("destination range overflows".into())),
        };
        let mut dests = self.lock_dests();
        if dests.by_handle.len() >= MAX_ENGINE_DESTS {
            return Err(KvdexError::BadRequest(format!(
                "session already holds {MAX_ENGINE_DESTS} engine destinations: unregister one"
            )));
        }
        let link = self.link();
        let id = link
            .register_ipc(mem, offset, len, event)
            .map_err(|e| match e {
                TransferError::Unsupported { .. } => KvdexError::BadRequest(format!(
                    "engine GPU destinations need the cuda transfer backend; this daemon runs \
                     on `{}` (no CUDA driver or device): {e}",
                    link.name()
                )),
                other => KvdexError::BadRequest(format!("engine destination refused: {other}")),
            })?;
        let handle = dests.next;
        dests.next = dests.next.checked_add(1).ok_or_else(|| {
            KvdexError::BadRequest("this session has used up its destination handles".into())
        })?;
        dests
            .by_handle
            .insert(handle, Registration::new(link.clone(), id));
        Ok(handle)
    }

    /// Releases destination `handle` (after gathers still writing it); returns how many the
    /// session still holds.
    pub fn unregister_dest(&self, handle: u32) -> Result<usize> {
        let (gone, left) = {
            let mut dests = self.lock_dests();
            let gone = dests.by_handle.remove(&handle);
            (gone, dests.by_handle.len())
        };
        // The registration drops here, outside the lock: unregistering waits for gathers.
        gone.map(|_registration| left)
            .ok_or_else(|| Self::unknown(handle))
    }

    /// The link's id of destination `handle`.
    pub(crate) fn engine_dest(&self, handle: u32) -> Result<DestId> {
        self.lock_dests()
            .by_handle
            .get(&handle)
            .map(Registration::id)
            .ok_or_else(|| Self::unknown(handle))
    }

    /// Engine destinations held now (for /stats).
    pub fn engine_dest_count(&self) -> usize {
        self.lock_dests().by_handle.len()
    }

    fn unknown(handle: u32) -> KvdexError {
        KvdexError::NotFound(format!(
            "engine destination {handle} (never registered in this session, or unregistered)"
        ))
    }

    fn lock_dests(&self) -> std::sync::MutexGuard<'_, EngineDests> {
        self.engine_dests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Shape;
    use kvdex_index::KeyDtype;

    #[test]
    fn the_host_link_refuses_by_name_and_unknown_handles_are_not_found() {
        let s = Session::new(Shape {
            layers: 1,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 8,
            dtype: KeyDtype::F32,
        })
        .unwrap();
        let e = s
            .register_cuda_dest(&IpcMemHandle([0; 64]), 0, 4096, None)
            .unwrap_err()
            .to_string();
        // Without a GPU the host link says why; with one, the zeroed handle is refused.
        if s.link().name() == "host" {
            assert!(
                e.contains("cuda transfer backend") && e.contains("`host`"),
                "{e}"
            );
        } else {
            assert!(e.contains("cuIpcOpenMemHandle"), "{e}");
        }
        assert_eq!(s.engine_dest_count(), 0);
        let e = s.unregister_dest(0).unwrap_err();
        assert!(matches!(e, KvdexError::NotFound(_)), "{e}");
        let e = s.engine_dest(3).unwrap_err().to_string();
        assert!(e.contains("engine destination 3"), "{e}");
        let e = s
            .register_cuda_dest(&IpcMemHandle([0; 64]), u64::MAX, u64::MAX, None)
            .unwrap_err();
        assert!(matches!(e, KvdexError::BadRequest(_)), "{e}");
    }
}
