//! Sessions and their KV storage.
//!
//! A [`Session`] is one sequence: its [`Shape`], and per layer, per KV head, the K and V rows
//! appended so far. Requests from the data plane ([`crate::worker`]) call the methods here; this
//! is the seam between the protocol and the storage.
//!
//! NOTE: this is the first, minimal store (growable vectors, exact flat search). The budgeted,
//! arena-backed store replaces the internals behind the same methods.

use std::sync::RwLock;

use kvdex_index::keys::KeyRows;
use kvdex_index::{flat::FlatIndex, Hits, KeyDtype, KeySlice, MipsIndex, SearchScratch};

use crate::error::{KvdexError, Result};

/// The shape of a session's KV cache, fixed when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// Transformer layers.
    pub layers: u32,
    /// Query heads per layer.
    pub q_heads: u32,
    /// KV heads per layer; query head `h` reads KV head `h / (q_heads / kv_heads)` (GQA).
    pub kv_heads: u32,
    /// Elements per head vector.
    pub head_dim: u32,
    /// Storage dtype of K and V.
    #[serde(with = "dtype_serde")]
    pub dtype: KeyDtype,
}

impl Shape {
    /// Checks the shape is usable: all dimensions non-zero and GQA-divisible.
    pub fn validate(&self) -> Result<()> {
        if self.layers == 0 || self.q_heads == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err(KvdexError::BadRequest(format!("shape has a zero dimension: {self:?}")));
        }
        if self.q_heads % self.kv_heads != 0 {
            return Err(KvdexError::BadRequest(format!(
                "q_heads ({}) is not a multiple of kv_heads ({})",
                self.q_heads, self.kv_heads
            )));
        }
        Ok(())
    }
    /// Query heads per KV head.
    pub fn group(&self) -> u32 {
        self.q_heads / self.kv_heads
    }
    /// Bytes of one token's row for one head.
    pub fn row_bytes(&self) -> usize {
        self.head_dim as usize * self.dtype.size()
    }
}

/// Serde for [`KeyDtype`] as "f16" | "bf16" | "f32".
pub mod dtype_serde {
    use kvdex_index::KeyDtype;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses "f16", "bf16" or "f32".
    pub fn parse(s: &str) -> Option<KeyDtype> {
        match s {
            "f16" | "float16" => Some(KeyDtype::F16),
            "bf16" | "bfloat16" => Some(KeyDtype::Bf16),
            "f32" | "float32" => Some(KeyDtype::F32),
            _ => None,
        }
    }
    /// The canonical name.
    pub fn name(d: KeyDtype) -> &'static str {
        match d {
            KeyDtype::F16 => "f16",
            KeyDtype::Bf16 => "bf16",
            KeyDtype::F32 => "f32",
        }
    }
    /// serde hook.
    pub fn serialize<S: Serializer>(d: &KeyDtype, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name(*d))
    }
    /// serde hook.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeyDtype, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("unknown dtype {s:?}: expected f16, bf16 or f32"))
        })
    }
}

/// One layer's rows: per KV head, K and V, row-major, `len` tokens.
#[derive(Default)]
struct LayerKv {
    /// Backed by u64 so that the bytes are 8-aligned and cast safely to f16/bf16/f32.
    k: Vec<Vec<u64>>,
    v: Vec<Vec<u64>>,
    len: usize,
}

/// One sequence's KV cache.
pub struct Session {
    shape: Shape,
    layers: Vec<RwLock<LayerKv>>,
}

fn bytes(v: &[u64]) -> &[u8] {
    bytemuck::cast_slice(v)
}

impl Session {
    /// An empty session of the given shape.
    pub fn new(shape: Shape) -> Result<Self> {
        shape.validate()?;
        let layers = (0..shape.layers)
            .map(|_| {
                RwLock::new(LayerKv {
                    k: vec![Vec::new(); shape.kv_heads as usize],
                    v: vec![Vec::new(); shape.kv_heads as usize],
                    len: 0,
                })
            })
            .collect();
        Ok(Self { shape, layers })
    }

    /// The session's shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    fn layer(&self, layer: u32) -> Result<&RwLock<LayerKv>> {
        self.layers.get(layer as usize).ok_or_else(|| {
            KvdexError::NotFound(format!("layer {layer} (session has {})", self.shape.layers))
        })
    }

    /// Tokens stored for `layer`.
    pub fn len(&self, layer: u32) -> Result<usize> {
        Ok(self.layer(layer)?.read().map_err(poisoned)?.len)
    }

    /// Appends `tokens` tokens to `layer`. `k` and `v` are `[kv_heads][tokens][head_dim]` in the
    /// session dtype. Returns the layer's new token count.
    pub fn append(&self, layer: u32, tokens: usize, k: &[u8], v: &[u8]) -> Result<usize> {
        let s = &self.shape;
        let per_head = tokens * s.row_bytes();
        let want = per_head * s.kv_heads as usize;
        if k.len() != want || v.len() != want {
            return Err(KvdexError::BadRequest(format!(
                "append of {tokens} tokens needs {want} bytes each of K and V, got {} and {}",
                k.len(),
                v.len()
            )));
        }
        let mut guard = self.layer(layer)?.write().map_err(poisoned)?;
        let l = &mut *guard;
        let old = l.len * s.row_bytes();
        for h in 0..s.kv_heads as usize {
            for (dst, src) in [(&mut l.k[h], k), (&mut l.v[h], v)] {
                dst.resize((old + per_head).div_ceil(8), 0);
                bytemuck::cast_slice_mut::<u64, u8>(dst)[old..old + per_head]
                    .copy_from_slice(&src[h * per_head..(h + 1) * per_head]);
            }
        }
        l.len += tokens;
        Ok(l.len)
    }

    /// Top-`k` keys by inner product for every query head of `layer`.
    ///
    /// `q` is `[q_heads][head_dim]`; `ids` and `scores` are `[q_heads][k]`. Returns the k used
    /// (clamped to the layer's length); only the first `q_heads * k_used` entries are written.
    pub fn search(
        &self,
        layer: u32,
        q: &[f32],
        k: usize,
        scratch: &mut SearchScratch,
        hits: &mut Hits,
        ids: &mut [u32],
        scores: &mut [f32],
    ) -> Result<usize> {
        let s = &self.shape;
        let d = s.head_dim as usize;
        if q.len() != s.q_heads as usize * d {
            return Err(KvdexError::BadRequest(format!(
                "query has {} values, expected q_heads*head_dim = {}",
                q.len(),
                s.q_heads as usize * d
            )));
        }
        let l = self.layer(layer)?.read().map_err(poisoned)?;
        let k = k.min(l.len);
        if ids.len() < s.q_heads as usize * k || scores.len() < s.q_heads as usize * k {
            return Err(KvdexError::BadRequest("output buffers too small".into()));
        }
        let flat = FlatIndex::new(l.len);
        for qh in 0..s.q_heads as usize {
            let kvh = qh / s.group() as usize;
            let rows = typed_rows(s.dtype, bytes(&l.k[kvh]), l.len * d);
            let keys = KeySlice::new(rows, d)?;
            flat.search(&keys, &q[qh * d..(qh + 1) * d], k, scratch, hits)?;
            ids[qh * k..(qh + 1) * k].copy_from_slice(&hits.ids);
            scores[qh * k..(qh + 1) * k].copy_from_slice(&hits.scores);
        }
        Ok(k)
    }

    /// Copies the K rows then the V rows of `ids` (for one KV head) into `out`. Returns bytes
    /// written: `2 * ids.len() * row_bytes`.
    pub fn gather(&self, layer: u32, kv_head: u32, ids: &[u32], out: &mut [u8]) -> Result<usize> {
        let s = &self.shape;
        if kv_head >= s.kv_heads {
            return Err(KvdexError::BadRequest(format!(
                "kv_head {kv_head} out of range (session has {})",
                s.kv_heads
            )));
        }
        let rb = s.row_bytes();
        let need = 2 * ids.len() * rb;
        if out.len() < need {
            return Err(KvdexError::BadRequest(format!(
                "gather of {} rows needs {need} bytes, buffer has {}",
                ids.len(),
                out.len()
            )));
        }
        let l = self.layer(layer)?.read().map_err(poisoned)?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= l.len) {
            return Err(KvdexError::BadRequest(format!(
                "token id {bad} out of range (layer {layer} has {} tokens)",
                l.len
            )));
        }
        let (kb, vb) = (bytes(&l.k[kv_head as usize]), bytes(&l.v[kv_head as usize]));
        let (ko, vo) = out[..need].split_at_mut(ids.len() * rb);
        for (i, &id) in ids.iter().enumerate() {
            let r = id as usize * rb..(id as usize + 1) * rb;
            ko[i * rb..(i + 1) * rb].copy_from_slice(&kb[r.clone()]);
            vo[i * rb..(i + 1) * rb].copy_from_slice(&vb[r]);
        }
        Ok(need)
    }

    /// Bytes of K and V held.
    pub fn resident_bytes(&self) -> u64 {
        self.layers
            .iter()
            .filter_map(|l| l.read().ok())
            .map(|l| (2 * l.len * self.shape.row_bytes() * self.shape.kv_heads as usize) as u64)
            .sum()
    }
}

fn typed_rows(dtype: KeyDtype, b: &[u8], n: usize) -> KeyRows<'_> {
    match dtype {
        KeyDtype::F16 => KeyRows::F16(&bytemuck::cast_slice(b)[..n]),
        KeyDtype::Bf16 => KeyRows::Bf16(&bytemuck::cast_slice(b)[..n]),
        KeyDtype::F32 => KeyRows::F32(&bytemuck::cast_slice(b)[..n]),
    }
}

fn poisoned<T>(_: T) -> KvdexError {
    KvdexError::Protocol("internal lock poisoned by an earlier panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_search_gather_round_trip() {
        let shape = Shape { layers: 1, q_heads: 2, kv_heads: 1, head_dim: 2, dtype: KeyDtype::F32 };
        let s = Session::new(shape).unwrap();
        let k: Vec<f32> = vec![1.0, 0.0, 0.0, 1.0, 2.0, 2.0];
        let v: Vec<f32> = vec![9.0; 6];
        s.append(0, 3, bytemuck::cast_slice(&k), bytemuck::cast_slice(&v)).unwrap();
        let (mut ids, mut sc) = (vec![0u32; 2], vec![0f32; 2]);
        let mut scratch = SearchScratch::new();
        let mut hits = Hits::default();
        let kk = s.search(0, &[1.0, 0.0, 0.0, -1.0], 1, &mut scratch, &mut hits, &mut ids, &mut sc).unwrap();
        assert_eq!(kk, 1);
        assert_eq!(ids, vec![2, 0]);
        let mut out = vec![0u8; 16];
        assert_eq!(s.gather(0, 0, &[1], &mut out).unwrap(), 16);
        let f: &[f32] = bytemuck::cast_slice(&out);
        assert_eq!(f, &[0.0, 1.0, 9.0, 9.0]);
    }
}
