//! The identity of a region file, by device and inode: what the daemon looks for in a
//! client's `/proc/<pid>/maps` to check that the client really maps its region.

/// A file's identity: device and inode, as `stat` gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity of `file`.
    pub fn of(file: &std::fs::File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}
