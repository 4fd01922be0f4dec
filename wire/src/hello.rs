//! The data-socket hello: the first frame of a Unix-socket (or TCP) data-plane connection,
//! naming a session and presenting its token. Every later frame is a 64-byte [`Descriptor`]
//! followed by its body, the same codec as the shared-memory rings.

use crate::error::{Error, Result};
use crate::shm::Descriptor;

/// Bytes of a frame header (one descriptor).
pub const FRAME_HEADER: usize = std::mem::size_of::<Descriptor>();
/// First word of a [`Hello`]: "KVDXSOCK".
pub const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"KVDXSOCK");
/// Version of the data-socket protocol; follows [`crate::shm::layout::VERSION`], since both
/// carry the same request bodies (2: the retrieve body's `SCALE` flag).
pub const HELLO_VERSION: u32 = crate::shm::layout::VERSION as u32;
/// The first frame of a data-socket connection: which session, with which token.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Hello {
    /// [`HELLO_MAGIC`].
    pub magic: u64,
    /// [`HELLO_VERSION`].
    pub version: u32,
    /// Bytes of `id` used.
    pub id_len: u32,
    /// The session token.
    pub token: [u8; 16],
    /// The session id (ASCII hex), zero-padded.
    pub id: [u8; 32],
}

const _: () = assert!(std::mem::size_of::<Hello>() == FRAME_HEADER);

impl Hello {
    /// The hello for session `id` with `token`.
    pub fn new(id: &str, token: &[u8; 16]) -> Result<Self> {
        let mut h = Hello {
            magic: HELLO_MAGIC,
            version: HELLO_VERSION,
            id_len: id.len() as u32,
            token: *token,
            id: [0; 32],
        };
        h.id.get_mut(..id.len())
            .ok_or_else(|| Error::BadRequest(format!("session id {id:?} is longer than 32 bytes")))?
            .copy_from_slice(id.as_bytes());
        Ok(h)
    }

    /// The session id, after checking magic and version.
    pub fn session_id(&self) -> Result<&str> {
        if self.magic != HELLO_MAGIC || self.version != HELLO_VERSION {
            return Err(Error::Protocol(format!(
                "not a kvdex data-socket hello (magic {:#x}, version {}; want {HELLO_MAGIC:#x}, \
                 {HELLO_VERSION})",
                self.magic, self.version
            )));
        }
        self.id
            .get(..self.id_len as usize)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| Error::BadRequest("hello has a malformed session id".into()))
    }
}
