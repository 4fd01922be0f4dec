//! Slim mode (arXiv 2503.05840, MHA models only): a session stores K alone and recomputes
//! `V = K·W_KV` for the rows a gather or an attend selects.
//!
//! `W_KV` is one `D × D` f32 matrix per layer (`D = kv_heads · head_dim`, row-major; the shape
//! contract is in [`kvdex_index::attend::slim`]). For a Llama-7B-size layer that is 64 MiB,
//! too big for a JSON body, so it travels over the session's shared-memory region in row
//! chunks ([`Session::set_wkv`], op `set_wkv`), and must be complete before the layer's first
//! append: the stored keys are only useful together with it. Once the layer holds tokens its
//! `W_KV` is fixed (replacing it would silently change every stored token's value).
//!
//! Memory: V's arenas are never allocated, so a layer saves `tokens · kv_heads · row_bytes` of
//! stored V (and the same share of arena capacity) and spends `4 · D²` on `W_KV`;
//! [`Session::slim_stats`] reports both.

use std::sync::{Arc, Mutex, RwLock};

use half::{bf16, f16};
use kvdex_index::attend::{HeadKeys, RopeSpec, WKv};
use kvdex_index::{KeyDtype, KeyStore};

use super::layer::LayerKv;
use super::{poisoned, Session, SlimSpec};
use crate::error::{KvdexError, Result};

/// One layer's `W_KV`: installed, or being uploaded in row chunks.
#[derive(Default)]
pub(super) struct SlimLayer {
    wkv: RwLock<Option<Arc<WKv>>>,
    /// The rows received so far of an upload in progress.
    upload: Mutex<Option<(Vec<f32>, usize)>>,
}

/// A Slim session's per-layer `W_KV` and its RoPE.
pub(super) struct SlimState {
    pub(super) rope: Option<RopeSpec>,
    layers: Vec<SlimLayer>,
}

impl SlimState {
    pub(super) fn new(spec: SlimSpec, layers: usize) -> Self {
        Self {
            rope: spec.rope,
            layers: (0..layers).map(|_| SlimLayer::default()).collect(),
        }
    }
}

/// Slim mode's memory account, for `/stats` and `GET /v1/sessions/{id}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct SlimStats {
    /// Bytes of V not stored (tokens x kv_heads x row_bytes, all layers).
    pub v_bytes_saved: u64,
    /// Bytes of arena capacity not allocated for V.
    pub v_capacity_saved: u64,
    /// Bytes the installed `W_KV` matrices hold.
    pub wkv_bytes: u64,
    /// `v_bytes_saved - wkv_bytes` (negative while the context is short).
    pub net_saved_bytes: i64,
    /// Layers whose `W_KV` is installed.
    pub layers_ready: u32,
}

/// A layer's keys across its KV heads, read in place (no per-request list of stores).
pub(super) struct LayerKeys<'a> {
    pub(super) layer: &'a LayerKv,
    pub(super) dtype: KeyDtype,
    pub(super) head_dim: usize,
    pub(super) kv_heads: usize,
}

impl HeadKeys for LayerKeys<'_> {
    fn heads(&self) -> usize {
        self.kv_heads
    }
    fn dim(&self) -> usize {
        self.head_dim
    }
    fn rows(&self) -> usize {
        self.layer.len
    }
    fn row_f32(&self, head: usize, id: u32, out: &mut [f32]) {
        match self.layer.keys(head, self.dtype, self.head_dim) {
            Ok(k) => k.row_f32(id, out),
            Err(_) => out.fill(0.0),
        }
    }
}

/// Writes f32 `values` as rows of `dtype` into `out` (same element count).
pub(super) fn encode_rows(values: &[f32], dtype: KeyDtype, out: &mut [u8]) {
    match dtype {
        KeyDtype::F32 => out.copy_from_slice(bytemuck::cast_slice(values)),
        KeyDtype::F16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
        KeyDtype::Bf16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
            }
        }
    }
}

impl Session {
    /// True for a Slim (K-only) session.
    pub fn is_slim(&self) -> bool {
        self.slim.is_some()
    }

    /// Receives rows `row_start .. row_start + rows.len() / D` of `layer`'s `W_KV` (`D =
    /// kv_heads · head_dim`, row-major f32). Chunks arrive in order; a chunk starting at row 0
    /// restarts the upload. When the last row arrives the matrix is checked (finite) and
    /// installed. Returns the rows received so far (`D` once installed).
    ///
    /// Errors: not a Slim session, an unknown layer, a layer that already holds tokens, a
    /// chunk that is not whole rows, out of order, past row `D`, or a non-finite value.
    pub fn set_wkv(&self, layer: u32, row_start: usize, rows: &[f32]) -> Result<usize> {
        let s = self.shape;
        let slim = self.slim.as_ref().ok_or_else(|| {
            KvdexError::BadRequest(
                "set_wkv: this session was not created in slim mode (\"slim\": true)".into(),
            )
        })?;
        let sl = slim.layers.get(layer as usize).ok_or_else(|| {
            KvdexError::NotFound(format!("layer {layer} (session has {})", s.layers))
        })?;
        if self.len(layer)? > 0 {
            return Err(KvdexError::BadRequest(format!(
                "set_wkv: layer {layer} already holds tokens; its W_KV is fixed once appends start"
            )));
        }
        let d = s.kv_heads as usize * s.head_dim as usize;
        if !rows.len().is_multiple_of(d) {
            return Err(KvdexError::BadRequest(format!(
                "set_wkv chunk of {} floats is not whole rows of D = kv_heads x head_dim = {d}",
                rows.len()
            )));
        }
        let n = rows.len() / d;
        let mut up = sl.upload.lock().map_err(poisoned)?;
        if row_start == 0 {
            *up = Some((Vec::with_capacity(d * d), 0));
        }
        let Some((buf, got)) = up.as_mut() else {
            return Err(KvdexError::BadRequest(format!(
                "set_wkv for layer {layer} starts at row {row_start}: no upload in progress, \
                 start at row 0"
            )));
        };
        if row_start != *got || row_start + n > d {
            return Err(KvdexError::BadRequest(format!(
                "set_wkv for layer {layer}: chunk of rows {row_start}..{} does not follow the \
                 {got} rows received (of {d})",
                row_start + n
            )));
        }
        buf.extend_from_slice(rows);
        *got += n;
        let got = *got;
        if got == d {
            let Some((w, _)) = up.take() else {
                return Err(KvdexError::Protocol("set_wkv upload vanished".into()));
            };
            let w = WKv::new(w, s.kv_heads as usize, s.head_dim as usize)?;
            *sl.wkv.write().map_err(poisoned)? = Some(Arc::new(w));
        }
        Ok(got)
    }

    /// `layer`'s installed `W_KV` (Slim sessions), or the error an append, gather or attend
    /// of a Slim layer without one gets. `None` for a non-Slim session.
    pub(super) fn wkv(&self, layer: u32) -> Result<Option<Arc<WKv>>> {
        let Some(slim) = &self.slim else {
            return Ok(None);
        };
        let sl = slim.layers.get(layer as usize).ok_or_else(|| {
            KvdexError::NotFound(format!("layer {layer} (session has {})", self.shape.layers))
        })?;
        let w = sl.wkv.read().map_err(poisoned)?.clone();
        w.map(Some).ok_or_else(|| {
            KvdexError::BadRequest(format!(
                "slim layer {layer} has no W_KV yet: upload it (set_wkv) before its first append"
            ))
        })
    }

    /// Slim mode's memory account; `None` for a non-Slim session.
    pub fn slim_stats(&self) -> Option<SlimStats> {
        let slim = self.slim.as_ref()?;
        let rb = self.shape.row_bytes() as u64;
        let kvh = self.shape.kv_heads as u64;
        let mut st = SlimStats::default();
        for (l, sl) in self.layers.iter().zip(&slim.layers) {
            if let Ok(l) = l.read() {
                st.v_bytes_saved += l.len as u64 * kvh * rb;
                st.v_capacity_saved += l.held_bytes(kvh as usize, rb as usize) as u64;
            }
            if let Ok(Some(w)) = sl.wkv.read().as_deref() {
                st.wkv_bytes += w.memory_bytes() as u64;
                st.layers_ready += 1;
            }
        }
        st.net_saved_bytes = st.v_bytes_saved as i64 - st.wkv_bytes as i64;
        Some(st)
    }
}
