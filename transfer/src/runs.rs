//! Runs, and the checks every backend applies before it copies a byte.

use crate::TransferError;

/// Every run's source offset, destination offset and length must be a multiple of this many
/// bytes, and a run may not be empty.
///
/// Why 16: it holds for every KV row kvdex stores (head_dim a multiple of 8 at 2 or 4 bytes per
/// element), it lets the copy loops move whole 16-byte vectors, and it catches the common client
/// bug of passing element counts where byte counts are expected.
pub const RUN_ALIGN: u64 = 16;

/// One contiguous copy: `len` bytes from `src_offset` in an arena to `dst_offset` in a
/// destination. `repr(C)`: the CUDA gather kernel reads these as its descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Run {
    /// Byte offset in the source arena.
    pub src_offset: u64,
    /// Byte offset in the destination.
    pub dst_offset: u64,
    /// Bytes to copy.
    pub len: u64,
}

/// What [`check_runs`] learnt about a valid batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunsSummary {
    /// Bytes the batch copies.
    pub total_bytes: u64,
    /// True when destination ranges are in ascending order without overlap: then the runs can
    /// be copied by several threads at once without two of them writing one byte.
    pub disjoint_ascending: bool,
}

/// Checks alignment and bounds of every run against a source of `src_len` bytes and a
/// destination of `dst_len` bytes. The first bad run is named in the error.
pub fn check_runs(runs: &[Run], src_len: u64, dst_len: u64) -> Result<RunsSummary, TransferError> {
    let mut total_bytes = 0u64;
    let mut disjoint_ascending = true;
    let mut prev_end = 0u64;
    for (i, r) in runs.iter().enumerate() {
        if r.len == 0 || r.len % RUN_ALIGN != 0 {
            return Err(TransferError::Misaligned(format!(
                "run {i} has length {}; lengths must be a non-zero multiple of {RUN_ALIGN}",
                r.len
            )));
        }
        if r.src_offset % RUN_ALIGN != 0 || r.dst_offset % RUN_ALIGN != 0 {
            return Err(TransferError::Misaligned(format!(
                "run {i} has source offset {} and destination offset {}; both must be \
                 multiples of {RUN_ALIGN}",
                r.src_offset, r.dst_offset
            )));
        }
        let src_end = r.src_offset.checked_add(r.len).filter(|&e| e <= src_len);
        if src_end.is_none() {
            return Err(TransferError::OutOfRange(format!(
                "run {i} reads [{}, +{}) past the arena's {src_len} bytes",
                r.src_offset, r.len
            )));
        }
        let Some(dst_end) = r.dst_offset.checked_add(r.len).filter(|&e| e <= dst_len) else {
            return Err(TransferError::OutOfRange(format!(
                "run {i} writes [{}, +{}) past the destination's {dst_len} bytes",
                r.dst_offset, r.len
            )));
        };
        disjoint_ascending &= r.dst_offset >= prev_end;
        prev_end = dst_end;
        total_bytes += r.len;
    }
    Ok(RunsSummary {
        total_bytes,
        disjoint_ascending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(src_offset: u64, dst_offset: u64, len: u64) -> Run {
        Run {
            src_offset,
            dst_offset,
            len,
        }
    }

    #[test]
    fn valid_batch_is_summarised() {
        let s = check_runs(&[run(0, 0, 256), run(1024, 256, 512)], 4096, 768).unwrap();
        assert_eq!(
            s,
            RunsSummary {
                total_bytes: 768,
                disjoint_ascending: true
            }
        );
        let s = check_runs(&[run(0, 256, 256), run(0, 0, 256)], 4096, 768).unwrap();
        assert!(!s.disjoint_ascending);
        let s = check_runs(&[run(0, 0, 512), run(0, 256, 256)], 4096, 768).unwrap();
        assert!(!s.disjoint_ascending, "overlapping destinations");
    }

    #[test]
    fn misaligned_runs_are_refused_by_name() {
        let e = check_runs(&[run(0, 0, 256), run(0, 0, 100)], 4096, 4096).unwrap_err();
        assert!(matches!(e, TransferError::Misaligned(_)));
        assert!(e.to_string().contains("run 1 has length 100"), "{e}");
        let e = check_runs(&[run(8, 0, 256)], 4096, 4096).unwrap_err();
        assert!(e.to_string().contains("source offset 8"), "{e}");
        let e = check_runs(&[run(0, 0, 0)], 4096, 4096).unwrap_err();
        assert!(matches!(e, TransferError::Misaligned(_)));
    }

    #[test]
    fn out_of_range_runs_are_refused_by_name() {
        let e = check_runs(&[run(4096, 0, 16)], 4096, 4096).unwrap_err();
        assert!(matches!(e, TransferError::OutOfRange(_)));
        assert!(e.to_string().contains("past the arena's 4096 bytes"), "{e}");
        let e = check_runs(&[run(0, 4080, 32)], 4096, 4096).unwrap_err();
        assert!(
            e.to_string().contains("past the destination's 4096 bytes"),
            "{e}"
        );
        let e = check_runs(&[run(u64::MAX - 15, 0, 32)], 4096, 4096).unwrap_err();
        assert!(
            matches!(e, TransferError::OutOfRange(_)),
            "overflow is out of range"
        );
    }
}
