//! Incremental insert: tokens that slide out of the recent window join the layer's indices
//! in the background, a batch at a time, so that no request waits for an insert.

use super::*;
use crate::store::layer::LayerKv;
use kvdex_index::qgraph::guided::InsertGuide;

impl Session {
    /// Schedules a background insert of the tokens that left `layer`'s window since its index
    /// was built or last extended, when at least `insert_batch` are waiting. Never blocks.
    pub fn schedule_insert(self: &Arc<Self>, layer: u32) {
        let cfg = &self.store.decode;
        let (Ok(li), Ok(len)) = (self.index_of(layer), self.len(layer)) else {
            return;
        };
        let (indexed, _) = li.coverage();
        let ready = li.heads.iter().all(|h| {
            h.read()
                .map(|h| matches!(*h, HeadIndex::Ready(_)))
                .unwrap_or(false)
        });
        let pending = cfg.retrievable_end(len).saturating_sub(cfg.sinks + indexed);
        if !ready || pending < cfg.insert_batch.max(1) || li.inserting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        match self.store.pool.get(cfg.build_threads) {
            Ok(pool) => {
                // Weak, like a build: a queued insert does not keep a dropped session alive.
                let session = Arc::downgrade(self);
                pool.spawn(move || {
                    if let Some(session) = session.upgrade() {
                        session.insert_pending(layer);
                    }
                });
            }
            Err(_) => li.inserting.store(false, Ordering::Release),
        }
    }

    /// Inserts every waiting token, `insert_batch` at a time per KV head, releasing the locks
    /// between batches so that searches (which scan what is not inserted) wait at most one
    /// batch. The decode queries captured since the last insert guide each head's first batch
    /// (`MipsIndexMut::insert_guided`); later batches of a backlog, or a head with none
    /// captured, insert keys only.
    pub(super) fn insert_pending(&self, layer: u32) {
        let Ok(li) = self.index_of(layer) else { return };
        li.inserting.store(true, Ordering::Release);
        let mut guides = li.guides.take();
        guides.resize_with(li.heads.len(), Vec::new);
        loop {
            let mut more = false;
            let Ok(l) = self.layer(layer).and_then(|l| l.read().map_err(poisoned)) else {
                break;
            };
            for ((g, head), q) in li.heads.iter().enumerate().zip(guides.iter_mut()) {
                match self.insert_batch(&l, g, head, q) {
                    Ok(Some(done)) => {
                        li.update(|st, _| {
                            st.inserts += u64::from(done.inserted);
                            st.guided_inserts += u64::from(done.guides > 0);
                            st.guide_queries += done.guides as u64;
                            st.guide_secs += done.guide_secs;
                            st.insert_secs += done.insert_secs;
                        });
                        more |= done.more;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(layer, kv_head = g, error = %e, "index insert failed");
                    }
                }
            }
            if !more {
                break;
            }
        }
        li.inserting.store(false, Ordering::Release);
    }

    /// One insert batch of KV head `g` of layer `l` (None: nothing waits, or no index). The
    /// guide queries (taken, so that each is used once) are prepared under the head's shared
    /// lock, so searches go on meanwhile; the exclusive lock is held for the insert alone.
    fn insert_batch(
        &self,
        l: &LayerKv,
        g: usize,
        head: &RwLock<HeadIndex>,
        guides: &mut Vec<f32>,
    ) -> Result<Option<BatchDone>> {
        let cfg = &self.store.decode;
        let (s, d) = (self.shape, self.shape.head_dim as usize);
        let end = cfg.retrievable_end(l.len);
        let t = Instant::now();
        let (from, to, keys, guide) = {
            let h = head.read().map_err(poisoned)?;
            let HeadIndex::Ready(index) = &*h else {
                return Ok(None);
            };
            let from = cfg.sinks + index.len();
            if from >= end {
                return Ok(None);
            }
            let to = end.min(from + cfg.insert_batch.max(1));
            // The keys the index will cover (a view of the layer, which the caller holds).
            let keys = view(&l.keys(g, s.dtype, d)?, cfg.sinks, to)?;
            let q = std::mem::take(guides);
            let guide = if q.is_empty() {
                InsertGuide::default()
            } else {
                index.guide_insert(&keys, &q)?
            };
            (from, to, keys, guide)
        };
        let guide_secs = t.elapsed().as_secs_f64();
        let mut h = head.write().map_err(poisoned)?;
        let HeadIndex::Ready(index) = &mut *h else {
            return Ok(None);
        };
        let t = Instant::now();
        // A rebuild replaced the index meanwhile: the next round starts over from its length.
        let inserted = cfg.sinks + index.len() == from;
        if inserted {
            if guide.is_empty() {
                index.insert(&keys)?;
            } else {
                index.insert_guided(&keys, &guide)?;
            }
        }
        Ok(Some(BatchDone {
            inserted,
            more: to < end || !inserted,
            guides: if inserted { guide.len() } else { 0 },
            guide_secs,
            insert_secs: t.elapsed().as_secs_f64(),
        }))
    }
}

/// What one insert batch did.
struct BatchDone {
    /// The batch went in.
    inserted: bool,
    /// Tokens still wait (or the batch must be retried).
    more: bool,
    /// Guide queries it used.
    guides: usize,
    /// Seconds preparing the guide (shared lock), and inserting (exclusive lock).
    guide_secs: f64,
    insert_secs: f64,
}
