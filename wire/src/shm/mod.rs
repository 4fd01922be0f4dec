//! The per-client shared-memory region: header, submission and completion rings, payload
//! arena, and the spin-then-park wait.
//!
//! # Layout
//! - [`layout`]: the `#[repr(C)]` header, the ring [`Descriptor`], the section geometry.
//! - [`ring`]: the single-producer single-consumer ring logic (safe code over atomics).
//! - [`wait`]: spin, then park on a futex; a pidfd watch on the peer.
//! - [`bus`]: a SIGBUS on a daemon's region (the client truncated the file) ends that session,
//!   not the daemon.
//!
//! A [`Region`] is a file under /dev/shm (mode 0600) mapped with memmap2. The daemon creates it
//! ([`Region::create`]) and removes the file when its `Region` drops; a client maps it with
//! [`Region::open`], which checks magic, version and geometry before anything else is read.

pub mod bus;
mod file_id;
pub mod layout;
pub mod ring;
pub mod wait;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

pub use file_id::FileId;
pub use layout::{Descriptor, Geometry, Header};
pub use ring::{ConsumerState, ProducerState, RingError, RingRef, RingWord};

use crate::error::{Error, Result};
use layout::{ErrWords, SlotWords, ERR_BYTES, MAGIC, VERSION};

/// One mapped region. The daemon's copy owns the file and unlinks it on drop.
pub struct Region {
    /// The daemon's SIGBUS guard over `map`; declared first so that it drops before the
    /// mapping is unmapped.
    bus: Option<bus::BusGuard>,
    map: MmapMut,
    geometry: Geometry,
    path: PathBuf,
    /// The file's device and inode (daemon side): a client's pid is trusted only if that
    /// process maps this very file (the daemon checks `/proc/<pid>/maps` for it).
    file_id: Option<crate::shm::FileId>,
    owner: bool,
    /// The creator's open file, holding a shared `flock` for the region's life: a daemon's
    /// start-up sweep of stale region files never removes a locked
    /// file, even one whose creator's pid it cannot see (another pid namespace).
    _owner_lock: Option<std::fs::File>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("path", &self.path)
            .field("geometry", &self.geometry)
            .field("owner", &self.owner)
            .finish()
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Io(std::io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", path.display()),
    ))
}

impl Region {
    /// Creates a region file at `path` (which must not exist) with an arena of at least
    /// `payload_bytes`, mode 0600, and writes its header. Daemon side.
    pub fn create(path: impl AsRef<Path>, payload_bytes: u64) -> Result<Self> {
        Self::create_with_slots(path, payload_bytes, layout::DEFAULT_RING_SLOTS)
    }

    /// [`Region::create`] with a chosen ring size (a power of two up to 65536).
    pub fn create_with_slots(
        path: impl AsRef<Path>,
        payload_bytes: u64,
        ring_slots: u64,
    ) -> Result<Self> {
        let path = path.as_ref();
        let geometry = Geometry::new(ring_slots, payload_bytes).ok_or_else(|| {
            Error::BadRequest(format!(
                "region of {payload_bytes} payload bytes and {ring_slots} ring slots is not possible \
                 (payload must be > 0, slots a power of two <= {})",
                layout::MAX_RING_SLOTS
            ))
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io_err("create region", path, e))?;
        // From here on the file exists: remove it again if anything fails.
        let region = (|| {
            allocate(&file, geometry.total_bytes).map_err(|e| match e.raw_os_error() {
                Some(libc::ENOSPC) => Error::Exhausted(format!(
                    "no room for a region of {} bytes in {}: {e}",
                    geometry.total_bytes,
                    path.parent().unwrap_or(path).display()
                )),
                _ => io_err("allocate region", path, e),
            })?;
            // The mapping is only ever accessed through atomics (header, slots, error slots) or
            // bounds-checked byte slices (arena), so a peer writing concurrently cannot cause
            // out-of-bounds access; a peer truncating the file is caught by the SIGBUS guard.
            // SAFETY: we just created the file (O_EXCL, mode 0600; same uid only), see above.
            let map = unsafe { MmapMut::map_mut(&file) };
            let map = map.map_err(|e| io_err("map region", path, e))?;
            let bus = bus::BusGuard::register(map.as_ptr(), map.len())?;
            let file_id =
                crate::shm::FileId::of(&file).map_err(|e| io_err("stat region", path, e))?;
            Ok::<_, Error>(Self {
                bus: Some(bus),
                map,
                geometry,
                path: path.to_owned(),
                file_id: Some(file_id),
                owner: true,
                _owner_lock: None,
            })
        })();
        let mut region = match region {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        // Best effort: without the lock the sweep still spares files of pids it can see alive.
        region._owner_lock = file.try_lock_shared().is_ok().then_some(file);
        let h = region.header();
        let g = &region.geometry;
        for (field, v) in [
            (&h.version, VERSION),
            (&h.total_bytes, g.total_bytes),
            (&h.ring_slots, g.ring_slots),
            (&h.sq_offset, g.sq_offset),
            (&h.cq_offset, g.cq_offset),
            (&h.err_offset, g.err_offset),
            (&h.arena_offset, g.arena_offset),
            (&h.arena_bytes, g.arena_bytes),
            (&h.daemon_pid, std::process::id() as u64),
        ] {
            field.store(v, Ordering::Relaxed);
        }
        h.magic.store(MAGIC, Ordering::Release);
        Ok(region)
    }

    /// Maps an existing region and validates its header. Client side.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("open region", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| io_err("stat region", path, e))?
            .len();
        if len < layout::HEADER_BYTES {
            return Err(Error::Protocol(format!(
                "{} is {len} bytes, too small for a region header",
                path.display()
            )));
        }
        // SAFETY: as in `create`: every access goes through atomics or bounds-checked slices of
        // a length validated against the file's size below.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| io_err("map region", path, e))?;
        let mut region = Self {
            bus: None,
            map,
            geometry: Geometry {
                total_bytes: len,
                ring_slots: 0,
                sq_offset: 0,
                cq_offset: 0,
                err_offset: 0,
                arena_offset: 0,
                arena_bytes: 0,
            },
            path: path.to_owned(),
            file_id: None,
            owner: false,
            _owner_lock: None,
        };
        let h = region.header();
        let magic = h.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(Error::Protocol(format!(
                "{} has bad magic {magic:#x}: not a kvdex region",
                path.display()
            )));
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != VERSION {
            return Err(Error::Protocol(format!(
                "{} has layout version {version}, this client speaks {VERSION}",
                path.display()
            )));
        }
        region.geometry = Geometry::from_header(h, len).map_err(Error::Protocol)?;
        Ok(region)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned (>= Header's 128-byte alignment) and at least
        // HEADER_BYTES long (checked by create/open); Header consists only of atomics, for
        // which every bit pattern is valid and concurrent access from the peer is defined.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn words<T>(&self, offset: u64, count: u64) -> &[T] {
        debug_assert!(
            offset + count * std::mem::size_of::<T>() as u64 <= self.geometry.total_bytes
        );
        // `offset` and `count` come from the validated geometry, so the range lies inside the
        // mapping, and offsets are page-aligned (>= 8-byte alignment of the atomic words T is
        // used with).
        // SAFETY: in bounds and aligned (above); T is an array of AtomicU64, so any bits are
        // valid and shared mutation is defined.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(offset as usize) as *const T,
                count as usize,
            )
        }
    }

    /// The submission ring (client produces, daemon consumes).
    pub fn sq(&self) -> RingRef<'_> {
        let h = self.header();
        let slots = self.words::<SlotWords>(self.geometry.sq_offset, self.geometry.ring_slots);
        RingRef::new("submission", &h.sq_head.0, &h.sq_tail.0, slots)
            .unwrap_or_else(|| unreachable_geometry())
    }

    /// The completion ring (daemon produces, client consumes).
    pub fn cq(&self) -> RingRef<'_> {
        let h = self.header();
        let slots = self.words::<SlotWords>(self.geometry.cq_offset, self.geometry.ring_slots);
        RingRef::new("completion", &h.cq_head.0, &h.cq_tail.0, slots)
            .unwrap_or_else(|| unreachable_geometry())
    }

    fn err_slot(&self, index: u64) -> &ErrWords {
        let slots = self.words::<ErrWords>(self.geometry.err_offset, self.geometry.ring_slots);
        &slots[(index & (self.geometry.ring_slots - 1)) as usize]
    }

    /// Stores an error message for the completion with ring index `index`; returns the bytes
    /// kept (truncated at a char boundary to [`layout::ERR_BYTES`]).
    pub fn write_error(&self, index: u64, msg: &str) -> u32 {
        let mut end = msg.len().min(ERR_BYTES);
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        let mut buf = [0u8; ERR_BYTES];
        buf[..end].copy_from_slice(&msg.as_bytes()[..end]);
        for (w, chunk) in self.err_slot(index).iter().zip(buf.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        end as u32
    }

    /// Reads the error message of completion `index` (`len` from the descriptor's `aux`).
    pub fn read_error(&self, index: u64, len: u32, out: &mut [u8; ERR_BYTES]) -> usize {
        for (w, chunk) in self.err_slot(index).iter().zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        (len as usize).min(ERR_BYTES)
    }

    /// Bytes of the payload arena.
    pub fn arena_len(&self) -> u64 {
        self.geometry.arena_bytes
    }

    /// The section geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The payload arena, for a process's one user of it.
    pub fn arena_mut(&mut self) -> &mut [u8] {
        // SAFETY: `&mut self` rules out any other reference into the arena from this process.
        unsafe { self.arena_unchecked() }
    }

    /// The payload arena through a shared `Region` (the worker shares its region with the
    /// handle that stops it, which only touches header atomics).
    ///
    /// The arena is also mapped by the peer process, which may write it at any time: callers
    /// must treat its bytes as untrusted input and copy out anything they validate before
    /// using it (no offset read from it is ever used twice).
    ///
    /// # Safety
    /// No other reference into the arena may exist in this process while the returned slice
    /// is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn arena_unchecked(&self) -> &mut [u8] {
        let g = &self.geometry;
        // SAFETY: the arena range [arena_offset, arena_offset + arena_bytes) lies inside the
        // mapping (validated geometry); exclusivity within this process is the caller's
        // obligation, stated above.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.map.as_ptr().add(g.arena_offset as usize) as *mut u8,
                g.arena_bytes as usize,
            )
        }
    }

    /// Marks the region closed with a [`layout::close_reason`] and wakes the client.
    pub fn close(&self, reason: u64) {
        let h = self.header();
        h.attach.0.closed.store(reason, Ordering::Release);
        wait::force_wake(&h.client_sleeping.0);
    }

    /// True once the peer truncated the file under the daemon's mapping: the region now reads
    /// zeros (see [`bus`]) and its session must end. Always false on the client side.
    pub fn truncated(&self) -> bool {
        self.bus.as_ref().is_some_and(bus::BusGuard::faulted)
    }

    /// The file's device and inode, on the daemon's side (None on a client's).
    pub fn file_id(&self) -> Option<crate::shm::FileId> {
        self.file_id
    }

    /// The reason the daemon closed the region, if it did.
    pub fn closed(&self) -> Option<u64> {
        match self.header().attach.0.closed.load(Ordering::Acquire) {
            0 => None,
            r => Some(r),
        }
    }
}

/// Gives the file `len` bytes of real storage, not a sparse size: on a full tmpfs the
/// region is refused here, at session creation, rather than raising SIGBUS at the first touch
/// of a page that cannot be had.
fn allocate(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: posix_fallocate on a descriptor we own; it returns an errno, not -1.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

fn unreachable_geometry() -> ! {
    // Geometry::new and Geometry::from_header only accept power-of-two ring sizes, so RingRef::new
    // cannot refuse them. Kept as a function so the invariant is stated once.
    unreachable!("validated geometry has a power-of-two ring size")
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads a u64 field of the header (a small helper for tests and diagnostics).
pub fn load(field: &AtomicU64) -> u64 {
    field.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn temp_path(tag: &str) -> PathBuf {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!(
            "kvdex-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// The creator holds a shared lock for the region's life, so that another daemon's
    /// start-up sweep leaves the file alone.
    #[test]
    fn a_created_region_is_locked_while_it_lives() {
        let path = temp_path("lock");
        let region = Region::create(&path, 4096).unwrap();
        let other = std::fs::File::open(&path).unwrap();
        assert!(other.try_lock().is_err(), "the creator holds the lock");
        drop(region);
        assert!(!path.exists());
    }

    #[test]
    fn create_open_share_the_same_memory() {
        let path = temp_path("region");
        let mut daemon = Region::create(&path, 10_000).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut client = Region::open(&path).unwrap();
        assert_eq!(client.geometry(), daemon.geometry());
        assert_eq!(client.arena_len(), 12288);
        client.arena_mut()[100] = 42;
        assert_eq!(daemon.arena_mut()[100], 42);
        let mut p = ProducerState::new(&client.sq());
        let d = Descriptor {
            request_id: 1,
            code: 1,
            ..Default::default()
        };
        assert!(p.try_push(&client.sq(), &d).unwrap());
        let mut c = ConsumerState::new(&daemon.sq());
        assert_eq!(c.try_pop(&daemon.sq()).unwrap(), Some((0, d)));
        let n = daemon.write_error(3, "bad thing");
        let mut buf = [0u8; ERR_BYTES];
        let len = client.read_error(3, n, &mut buf);
        assert_eq!(&buf[..len], b"bad thing");
        assert!(
            Region::create(&path, 10_000).is_err(),
            "create must not reuse an existing file"
        );
        drop(client);
        drop(daemon);
        assert!(!path.exists(), "the daemon's drop removes the file");
    }

    #[test]
    fn error_messages_truncate_on_char_boundaries() {
        let path = temp_path("err");
        let r = Region::create(&path, 4096).unwrap();
        let long = "é".repeat(200);
        let n = r.write_error(0, &long) as usize;
        assert!(n <= ERR_BYTES && n.is_multiple_of(2));
        let mut buf = [0u8; ERR_BYTES];
        let len = r.read_error(0, n as u32, &mut buf);
        assert!(std::str::from_utf8(&buf[..len]).is_ok());
    }

    #[test]
    fn open_rejects_bad_files() {
        let path = temp_path("bad");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let e = Region::open(&path).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");
        std::fs::write(&path, vec![0u8; 10]).unwrap();
        assert!(Region::open(&path)
            .unwrap_err()
            .to_string()
            .contains("too small"));
        std::fs::remove_file(&path).unwrap();
        {
            let r = Region::create(&path, 4096).unwrap();
            r.header().version.store(99, Ordering::Relaxed);
            assert!(Region::open(&path)
                .unwrap_err()
                .to_string()
                .contains("version"));
            r.header().version.store(VERSION, Ordering::Relaxed);
            r.header().arena_bytes.store(1 << 40, Ordering::Relaxed);
            assert!(Region::open(&path).is_err());
        }
        assert!(Region::open(&path).is_err());
        assert!(Region::create(&path, 0).is_err());
    }
}
