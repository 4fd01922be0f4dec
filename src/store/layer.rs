//! One layer's K/V rows: per KV head, contiguous K and V arenas, and the layer's indices.
//!
//! An int8 layer ([`KvFormat::Int8`]) keeps the rows' codes in the K and V arenas (`head_dim`
//! bytes a row) and their scales in two more arenas per KV head (2 bytes a row).
//!
//! Rows of one (layer, KV head) are contiguous and 64-byte aligned (the arena's alignment), so
//! an index or a kernel sees them as one slice. Capacity grows by copying into a larger arena;
//! the copy happens under the layer's write lock (see [`super::Session`]), so a reader holding
//! the read lock never sees a freed or half-copied arena.

use half::bf16;
use kvdex_index::keys::KeyRows;
use kvdex_index::quant::{QuantRows, SCALE_BYTES};
use kvdex_index::{KeyDtype, KeySlice, MipsIndexMut};
use kvdex_transfer::{Arena, DeviceLink};

use super::quant::{quantize_rows, KvFormat};
use crate::error::Result;

/// Bytes an arena of `tokens` rows takes: rounded up to whole cache lines.
pub(super) fn arena_bytes(tokens: usize, row_bytes: usize) -> usize {
    (tokens * row_bytes).div_ceil(64) * 64
}

/// K and V storage of one KV head (no V in Slim mode: it is recomputed from K), and the rows'
/// scales when the layer is int8.
struct HeadKv {
    k: Arena,
    v: Option<Arena>,
    k_scales: Option<Arena>,
    v_scales: Option<Arena>,
}

impl HeadKv {
    /// Every arena with the bytes one row takes in it: K, V, then the scales.
    fn planes(&self, rb: usize) -> [(Option<&Arena>, usize); 4] {
        [
            (Some(&self.k), rb),
            (self.v.as_ref(), rb),
            (self.k_scales.as_ref(), SCALE_BYTES),
            (self.v_scales.as_ref(), SCALE_BYTES),
        ]
    }
}

/// One layer of a session.
pub(super) struct LayerKv {
    /// Per KV head; empty until the first append allocates.
    heads: Vec<HeadKv>,
    /// Tokens stored.
    pub(super) len: usize,
    /// Tokens the arenas can hold.
    pub(super) cap: usize,
    /// Per query head: the index searches go through. Flat (exact) today; the attention-aware
    /// graph of the index crate replaces an entry once built, over the same KV-head storage.
    pub(super) indices: Vec<Box<dyn MipsIndexMut>>,
    /// Arenas per KV head: 2 (K and V), or 1 in Slim mode (K only).
    planes: usize,
    /// How rows are stored: as appended, or int8 with scales.
    format: KvFormat,
}

impl LayerKv {
    /// An empty layer whose query heads search through `indices`; `slim` stores K alone.
    pub(super) fn new(indices: Vec<Box<dyn MipsIndexMut>>, slim: bool, format: KvFormat) -> Self {
        Self {
            heads: Vec::new(),
            len: 0,
            cap: 0,
            indices,
            planes: if slim { 1 } else { 2 },
            format,
        }
    }

    /// Bytes the arenas of `kv_heads` heads with `planes` planes of `format` take at `cap`
    /// tokens with `row_bytes` per stored row (scales included): what growth is charged.
    pub(super) fn bytes_at(
        planes: usize,
        format: KvFormat,
        kv_heads: usize,
        row_bytes: usize,
        cap: usize,
    ) -> usize {
        if cap == 0 {
            return 0;
        }
        let scales = match format.scale_bytes() {
            0 => 0,
            sb => arena_bytes(cap, sb),
        };
        planes * kv_heads * (arena_bytes(cap, row_bytes) + scales)
    }

    /// The layer's storage format.
    pub(super) fn format(&self) -> KvFormat {
        self.format
    }

    /// Arenas per KV head: 2 (K and V), or 1 in Slim mode.
    pub(super) fn planes(&self) -> usize {
        self.planes
    }

    /// Bytes held by this layer's arenas (what the budget is charged).
    pub(super) fn held_bytes(&self, kv_heads: usize, row_bytes: usize) -> usize {
        Self::bytes_at(self.planes, self.format, kv_heads, row_bytes, self.cap)
    }

    /// Moves the rows into arenas of `new_cap` tokens. Every new arena is allocated before any
    /// old one is released, so a failed allocation leaves the layer as it was.
    pub(super) fn grow(
        &mut self,
        link: &dyn DeviceLink,
        kv_heads: usize,
        row_bytes: usize,
        new_cap: usize,
    ) -> Result<()> {
        let bytes = arena_bytes(new_cap, row_bytes);
        let scale_bytes = arena_bytes(new_cap, SCALE_BYTES);
        let (two, int8) = (self.planes == 2, self.format == KvFormat::Int8);
        let alloc = |want: bool, n: usize| want.then(|| link.alloc_arena(n)).transpose();
        let mut fresh = Vec::with_capacity(kv_heads);
        for _ in 0..kv_heads {
            fresh.push(HeadKv {
                k: link.alloc_arena(bytes)?,
                v: alloc(two, bytes)?,
                k_scales: alloc(int8, scale_bytes)?,
                v_scales: alloc(two && int8, scale_bytes)?,
            });
        }
        for (new, old) in fresh.iter_mut().zip(&self.heads) {
            for ((dst, per_row), (src, _)) in
                new.planes(row_bytes).into_iter().zip(old.planes(row_bytes))
            {
                let (Some(dst), Some(src)) = (dst, src) else {
                    continue;
                };
                let used = self.len * per_row;
                // SAFETY: both arenas hold at least `used` bytes (old: len <= cap rows; new:
                // new_cap >= len rows); they are distinct allocations; `&mut self` means no reader
                // holds the layer while it is copied.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), used) };
            }
        }
        self.heads = fresh;
        self.cap = new_cap;
        Ok(())
    }

    /// Writes `tokens` rows per KV head after the current ones and publishes them.
    /// `k`, `v` are `[kv_heads][tokens][row_bytes]`; the caller checked their lengths and that
    /// `len + tokens <= cap`. In Slim mode `v` is not read.
    pub(super) fn write_rows(&mut self, tokens: usize, row_bytes: usize, k: &[u8], v: &[u8]) {
        let per_head = tokens * row_bytes;
        let offset = self.len * row_bytes;
        debug_assert!(self.len + tokens <= self.cap);
        for (h, head) in self.heads.iter().enumerate() {
            let src = h * per_head..(h + 1) * per_head;
            let v_part = head.v.as_ref().map(|a| (a, &v[src.clone()]));
            for (dst, src) in std::iter::once((&head.k, &k[src])).chain(v_part) {
                assert!(
                    offset + per_head <= dst.len(),
                    "append past the arena's capacity"
                );
                // SAFETY: offset + per_head <= arena length (asserted above); `&mut self` gives
                // exclusive access to the layer's arenas; src is a distinct caller buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        dst.as_mut_ptr().add(offset),
                        per_head,
                    )
                };
            }
        }
        self.len += tokens;
    }

    /// Quantizes `tokens` rows per KV head of `dtype` (`k`, `v`: `[kv_heads][tokens][dim]`, as
    /// [`LayerKv::write_rows`] takes them) into an int8 layer's codes and scales and publishes
    /// them. `row` is an f32 scratch of `dim`; the caller checked lengths and room.
    pub(super) fn write_rows_int8(
        &mut self,
        tokens: usize,
        dtype: KeyDtype,
        row: &mut [f32],
        k: &[u8],
        v: &[u8],
    ) {
        let dim = row.len();
        let per_head = tokens * dim * dtype.size();
        debug_assert!(self.len + tokens <= self.cap && self.format == KvFormat::Int8);
        for (h, head) in self.heads.iter().enumerate() {
            let src = h * per_head..(h + 1) * per_head;
            let k_part = Some((&head.k, head.k_scales.as_ref(), &k[src.clone()]));
            let v_part = head
                .v
                .as_ref()
                .map(|a| (a, head.v_scales.as_ref(), &v[src]));
            for (codes, scales, src) in k_part.into_iter().chain(v_part) {
                let Some(scales) = scales else { continue };
                // SAFETY: `&mut self` holds the layer exclusively.
                unsafe { quantize_at((codes, scales), self.len, src, dtype, row) };
            }
        }
        self.len += tokens;
    }

    /// Forgets every row from `tokens` on (`tokens <= len`); the arenas keep their capacity.
    pub(super) fn truncate(&mut self, tokens: usize) {
        self.len = self.len.min(tokens);
    }

    /// Copies `src`'s rows (same shape and planes) into this layer, which must be empty with
    /// room for them.
    pub(super) fn copy_rows_from(&mut self, src: &LayerKv, row_bytes: usize) {
        assert!(
            self.len == 0 && src.len <= self.cap,
            "fork into a layer without room"
        );
        for (dst, from) in self.heads.iter().zip(&src.heads) {
            for ((d, per_row), (s, _)) in dst
                .planes(row_bytes)
                .into_iter()
                .zip(from.planes(row_bytes))
            {
                let (Some(d), Some(s)) = (d, s) else { continue };
                let n = src.len * per_row;
                assert!(n <= d.len() && n <= s.len(), "rows exceed an arena");
                // SAFETY: both arenas hold at least n bytes (asserted); they are distinct
                // allocations; `&mut self` gives exclusive access to the destination, and the
                // caller holds `src` borrowed, so no one writes it meanwhile.
                unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), d.as_mut_ptr(), n) };
            }
        }
        self.len = src.len;
    }

    /// The stored K bytes of `kv_head` (`len * row_bytes`).
    #[cfg(test)]
    pub(super) fn k_bytes(&self, kv_head: usize, row_bytes: usize) -> &[u8] {
        stored(self.heads.get(kv_head).map(|h| &h.k), self.len * row_bytes)
    }

    /// The stored V bytes of `kv_head` (`len * row_bytes`; empty in Slim mode).
    #[cfg(test)]
    pub(super) fn v_bytes(&self, kv_head: usize, row_bytes: usize) -> &[u8] {
        match self.heads.get(kv_head).and_then(|h| h.v.as_ref()) {
            Some(v) => stored(Some(v), self.len * row_bytes),
            // Empty, but aligned like the arenas, so that it still casts to rows.
            None => &self.k_bytes(kv_head, row_bytes)[..0],
        }
    }

    /// The K arena and (unless Slim) the V arena of `kv_head`: the sources of a
    /// [`DeviceLink::gather`].
    pub(super) fn arenas(&self, kv_head: usize) -> Option<(&Arena, Option<&Arena>)> {
        self.heads.get(kv_head).map(|h| (&h.k, h.v.as_ref()))
    }

    /// K rows of `kv_head` as a key store for the indices.
    pub(super) fn keys(
        &self,
        kv_head: usize,
        dtype: KeyDtype,
        head_dim: usize,
    ) -> Result<KeySlice<'_>> {
        key_slice(&self.heads, self.len, kv_head, dtype, head_dim, self.format)
    }

    /// V rows of `kv_head` as a value store (empty in Slim mode).
    pub(super) fn values(
        &self,
        kv_head: usize,
        dtype: KeyDtype,
        head_dim: usize,
    ) -> Result<KeySlice<'_>> {
        let head = self.heads.get(kv_head);
        let (rows, scales) = match head.and_then(|h| h.v.as_ref()) {
            Some(v) => (Some(v), head.and_then(|h| h.v_scales.as_ref())),
            // Slim: no V, so an empty store (aligned like the arenas).
            None => (None, None),
        };
        let len = if rows.is_some() { self.len } else { 0 };
        slice_of(rows, scales, len, dtype, head_dim, self.format)
    }

    /// Brings every query head's index up to the stored rows (query head `qh` indexes KV head
    /// `qh / group`).
    pub(super) fn update_indices(
        &mut self,
        group: usize,
        dtype: KeyDtype,
        head_dim: usize,
    ) -> Result<()> {
        for (qh, index) in self.indices.iter_mut().enumerate() {
            let keys = key_slice(
                &self.heads,
                self.len,
                qh / group,
                dtype,
                head_dim,
                self.format,
            )?;
            index.insert(&keys)?;
        }
        Ok(())
    }
}

/// The first `n` bytes of `arena` (none when the layer has not allocated yet).
fn stored(arena: Option<&Arena>, n: usize) -> &[u8] {
    // Empty but 8-byte aligned: a plain `&[]` of bytes may sit at address 1, which
    // `bytemuck::cast_slice` refuses (with a panic) as rows of f16/f32.
    let Some(arena) = arena else {
        return bytemuck::cast_slice::<u64, u8>(&[]);
    };
    assert!(n <= arena.len(), "stored rows exceed the arena");
    // SAFETY: the arena holds at least n initialised bytes (zeroed at allocation, then
    // written); writes happen only through `&mut LayerKv`, so none overlaps this shared borrow,
    // which cannot outlive the arena it borrows.
    unsafe { std::slice::from_raw_parts(arena.as_ptr(), n) }
}

/// Quantizes the rows of `src` (`dim` elements of `dtype` each) into the `codes` and `scales`
/// arenas from row `at` on. `row` is an f32 scratch of `dim`.
///
/// # Safety
/// The caller holds the arenas' layer exclusively (`&mut LayerKv`), so nothing else reads or
/// writes these bytes meanwhile.
unsafe fn quantize_at(
    (codes, scales): (&Arena, &Arena),
    at: usize,
    src: &[u8],
    dtype: KeyDtype,
    row: &mut [f32],
) {
    let dim = row.len();
    let tokens = src.len() / (dim * dtype.size()).max(1);
    let (c, s) = (
        (at * dim, tokens * dim),
        (at * SCALE_BYTES, tokens * SCALE_BYTES),
    );
    assert!(
        c.0 + c.1 <= codes.len() && s.0 + s.1 <= scales.len(),
        "rows past the arena's capacity"
    );
    // SAFETY: both ranges lie inside their arenas (asserted); the arenas are distinct
    // allocations; exclusivity is the caller's promise.
    let (c, s) = unsafe {
        (
            std::slice::from_raw_parts_mut(codes.as_mut_ptr().add(c.0), c.1),
            std::slice::from_raw_parts_mut(scales.as_mut_ptr().add(s.0), s.1),
        )
    };
    quantize_rows(
        src,
        dtype,
        row,
        bytemuck::cast_slice_mut(c),
        bytemuck::cast_slice_mut(s),
    );
}

fn key_slice(
    heads: &[HeadKv],
    len: usize,
    kv_head: usize,
    dtype: KeyDtype,
    head_dim: usize,
    format: KvFormat,
) -> Result<KeySlice<'_>> {
    let head = heads.get(kv_head);
    let scales = head.and_then(|h| h.k_scales.as_ref());
    slice_of(head.map(|h| &h.k), scales, len, dtype, head_dim, format)
}

/// `len` rows of `arena` (and their scales, int8) as a key or value store.
fn slice_of<'a>(
    arena: Option<&'a Arena>,
    scales: Option<&'a Arena>,
    len: usize,
    dtype: KeyDtype,
    head_dim: usize,
    format: KvFormat,
) -> Result<KeySlice<'a>> {
    // The arenas are 64-byte aligned and rows are whole elements, so the casts cannot fail.
    let rows = match format {
        KvFormat::Int8 => KeyRows::I8(QuantRows {
            codes: bytemuck::cast_slice(stored(arena, len * head_dim)),
            scales: bytemuck::cast_slice::<u8, bf16>(stored(scales, len * SCALE_BYTES)),
        }),
        KvFormat::Dtype => {
            let b = stored(arena, len * head_dim * dtype.size());
            match dtype {
                KeyDtype::F16 => KeyRows::F16(bytemuck::cast_slice(b)),
                KeyDtype::Bf16 => KeyRows::Bf16(bytemuck::cast_slice(b)),
                KeyDtype::F32 => KeyRows::F32(bytemuck::cast_slice(b)),
            }
        }
    };
    Ok(KeySlice::new(rows, head_dim)?)
}

#[cfg(test)]
mod tests;
