//! Incremental insert: tokens that slide out of the recent window join the layer's indices
//! in the background, a batch at a time, so that no request waits for an insert.

use super::*;

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
        let cfg = &self.store.decode;
        let (s, d) = (self.shape, self.shape.head_dim as usize);
        li.inserting.store(true, Ordering::Release);
        let mut guides = li.guides.take();
        loop {
            let mut more = false;
            let Ok(l) = self.layer(layer).and_then(|l| l.read().map_err(poisoned)) else {
                break;
            };
            let end = cfg.retrievable_end(l.len);
            for (g, head) in li.heads.iter().enumerate() {
                let Ok(mut h) = head.write() else { continue };
                let HeadIndex::Ready(index) = &mut *h else {
                    continue;
                };
                let from = cfg.sinks + index.len();
                if from >= end {
                    continue;
                }
                let to = end.min(from + cfg.insert_batch.max(1));
                let q = guides.get_mut(g).map(std::mem::take).unwrap_or_default();
                let t = Instant::now();
                let res = l
                    .keys(g, s.dtype, d)
                    .and_then(|k| view(&k, cfg.sinks, to))
                    .and_then(|v| match q.is_empty() {
                        true => Ok(index.insert(&v)?),
                        false => Ok(index.insert_guided(&v, &q)?),
                    });
                let secs = t.elapsed().as_secs_f64();
                li.update(|st, _| {
                    st.inserts += 1;
                    st.guided_inserts += u64::from(!q.is_empty());
                    st.guide_queries += (q.len() / d.max(1)) as u64;
                    st.insert_secs += secs;
                });
                if let Err(e) = res {
                    tracing::warn!(layer, kv_head = g, error = %e, "index insert failed");
                    continue;
                }
                more |= to < end;
            }
            if !more {
                break;
            }
        }
        li.inserting.store(false, Ordering::Release);
    }
}
