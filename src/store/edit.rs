//! Editing a whole session: `truncate` (speculative decoding's rollback, beam pruning) and
//! `fork` (beam search, a shared prompt): a plain copy charged to the budget; sharing rows
//! copy-on-write is the memory tiers' later work.

use std::sync::atomic::Ordering;

use super::{poisoned, Session, SessionSpec};
use crate::error::{KvdexError, Result};

/// How long a truncate waits for a layer's running background insert before cutting its index.
const INSERT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Session {
    /// Drops every layer's rows from token `tokens` on; returns the bytes given back to the
    /// budget (arenas shrink when the rows left fit in half their capacity).
    ///
    /// A layer's index keeps serving when the cut stays above the tokens it indexed (a
    /// rollback of a few tokens falls in the recent window, which is never indexed); a cut
    /// into the indexed tokens drops the layer's index (searches scan exactly until the layer
    /// is sealed again, and `/stats` says why). Layers shorter than `tokens` are left as they
    /// are. Errors: `tokens` beyond the longest layer, or a cut into tokens a running build
    /// is indexing.
    pub fn truncate(&self, tokens: usize) -> Result<u64> {
        let longest = (0..self.shape.layers)
            .map(|l| self.len(l))
            .try_fold(0, |m, n| n.map(|n| m.max(n)))?;
        if tokens > longest {
            return Err(KvdexError::BadRequest(format!(
                "truncate tokens = {tokens} is beyond the session's length {longest} (its \
                 longest layer)"
            )));
        }
        let sinks = self.decode.sinks;
        for (i, li) in self.index.iter().enumerate() {
            let st = li.status();
            if li.is_building() && tokens < sinks + st.sealed_tokens {
                return Err(KvdexError::BadRequest(format!(
                    "truncate tokens = {tokens} cuts into layer {i}'s index build (tokens up \
                     to {}): wait for the build to finish",
                    sinks + st.sealed_tokens
                )));
            }
        }
        let (kvh, rb) = (self.shape.kv_heads as usize, self.stored_row_bytes());
        let mut released = 0u64;
        for (i, (layer, li)) in self.layers.iter().zip(&self.index).enumerate() {
            if li.coverage().0 + sinks > tokens {
                // Appends come through the same connection as this truncate, so no new insert
                // starts meanwhile; the running one ends within a batch.
                let waited = std::time::Instant::now();
                while li.is_inserting() && waited.elapsed() < INSERT_WAIT {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                li.drop_indices(format!(
                    "index dropped by a truncate to {tokens} tokens, below what it indexed: \
                     seal the layer again"
                ))?;
            }
            let mut l = layer.write().map_err(poisoned)?;
            if l.len <= tokens {
                continue;
            }
            l.truncate(tokens);
            l.update_indices(
                self.shape.group() as usize,
                self.shape.dtype,
                self.shape.head_dim as usize,
            )?;
            let cap = tokens.max(self.store.initial_tokens);
            if 2 * cap <= l.cap {
                let before = l.held_bytes(kvh, rb) as u64;
                l.grow(self.store.link.as_ref(), kvh, rb, cap)?;
                let freed = before - l.held_bytes(kvh, rb) as u64;
                self.store.budget.release(freed);
                self.held.fetch_sub(freed, Ordering::AcqRel);
                released += freed;
            }
            debug_assert!(l.cap >= l.len, "layer {i} lost rows");
        }
        Ok(released)
    }

    /// A new session holding a copy of this one's rows and (where the index kind can copy
    /// itself) built indices, with the same shape and static tokens; charged to the budget
    /// like appends. Slim sessions cannot be forked yet.
    pub fn fork(&self) -> Result<Session> {
        if self.slim.is_some() {
            return Err(KvdexError::BadRequest(
                "fork of a Slim session is not supported (its W_KV is not copied): fork a \
                 session that stores K and V"
                    .into(),
            ));
        }
        let spec = SessionSpec {
            slim: None,
            sinks: Some(self.decode.sinks),
            window: Some(self.decode.window),
            sample_rate: Some(self.sampling.rate()),
            kv_format: self.format,
        };
        let mut copy = self.store.session_spec(self.shape, spec)?;
        let rb = self.stored_row_bytes();
        for i in 0..self.layers.len() {
            let src = self.layers[i].read().map_err(poisoned)?;
            if src.len > 0 {
                let mut dst = copy.layers[i].write().map_err(poisoned)?;
                copy.grow(&mut dst, src.len)?;
                dst.copy_rows_from(&src, rb);
                dst.update_indices(
                    self.shape.group() as usize,
                    self.shape.dtype,
                    self.shape.head_dim as usize,
                )?;
            }
            // Under the source layer's read lock: no append changes what the index covers.
            copy.index[i] = self.index[i].copy_of()?;
        }
        Ok(copy)
    }
}

#[cfg(test)]
mod tests {
    use kvdex_index::KeyDtype;

    use crate::store::{Budget as MemoryBudget, DecodeConfig, Session, Shape, Store};
    use kvdex_transfer::host::HostLink;
    use std::sync::Arc;

    fn rows(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 997) as f32 / 500.0)
            .collect()
    }

    fn store() -> Store {
        let cfg = DecodeConfig {
            sinks: 2,
            window: 4,
            ..Default::default()
        };
        Store::new(
            Arc::new(HostLink::new()),
            Arc::new(MemoryBudget::new(1 << 30)),
            16,
        )
        .with_decode(cfg)
    }

    fn session(store: &Store) -> Session {
        let shape = Shape {
            layers: 2,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 4,
            dtype: KeyDtype::F32,
        };
        store.session(shape).unwrap()
    }

    fn append(s: &Session, layer: u32, n: usize, seed: u32) {
        let (k, v) = (rows(n * 4, seed), rows(n * 4, seed + 1));
        s.append(layer, n, bytemuck::cast_slice(&k), bytemuck::cast_slice(&v))
            .unwrap();
    }

    fn gather_all(s: &Session, layer: u32) -> Vec<u8> {
        let n = s.len(layer).unwrap();
        let ids: Vec<u32> = (0..n as u32).collect();
        let mut out = vec![0u8; 2 * n * 16];
        s.gather(layer, 0, &ids, &mut out).unwrap();
        out
    }

    #[test]
    fn truncate_then_append_equals_a_session_with_the_same_rows_and_returns_memory() {
        let st = store();
        let s = session(&st);
        append(&s, 0, 100, 1);
        append(&s, 1, 90, 1);
        let held = st.budget().used();
        let freed = s.truncate(20).unwrap();
        assert!(freed > 0 && st.budget().used() == held - freed);
        assert_eq!((s.len(0).unwrap(), s.len(1).unwrap()), (20, 20));
        append(&s, 0, 10, 50);
        let fresh = session(&st);
        append(&fresh, 0, 100, 1);
        fresh.truncate(20).unwrap();
        append(&fresh, 0, 10, 50);
        assert_eq!(gather_all(&s, 0), gather_all(&fresh, 0));
        let e = s.truncate(31).unwrap_err().to_string();
        assert!(e.contains("tokens = 31") && e.contains("length 30"), "{e}");
        assert_eq!(s.truncate(30).unwrap(), 0, "a no-op truncate frees nothing");
    }

    #[test]
    fn a_fork_holds_a_copy_and_diverges_without_touching_its_source() {
        let st = store();
        let s = session(&st);
        append(&s, 0, 50, 3);
        let before = gather_all(&s, 0);
        let used = st.budget().used();
        let f = s.fork().unwrap();
        assert!(
            st.budget().used() > used,
            "the copy is charged to the budget"
        );
        assert_eq!(gather_all(&f, 0), before);
        assert_eq!(f.decode_config().sinks, 2);
        append(&f, 0, 5, 9);
        f.truncate(10).unwrap();
        append(&f, 1, 3, 9);
        assert_eq!(gather_all(&s, 0), before);
        assert_eq!((s.len(0).unwrap(), s.len(1).unwrap()), (50, 0));
        assert_eq!((f.len(0).unwrap(), f.len(1).unwrap()), (10, 3));
    }
}
