//! Incremental insert: tokens that slide out of the recent window join the layer's indices
//! in the background, a batch at a time, so that no request waits for an insert.

use super::*;
use crate::store::layer::LayerKv;
use kvdex_index::qgraph::guided::InsertGuide;

impl Session {
    /// Schedules a background insert of the tokens that left `layer`'s window since its index
    /// was built or last extended, when at least `insert_batch` are waiting. Never blocks.
    pub fn schedule_insert(self: &Arc<Self>, layer: u32) {
        let cfg = &self.decode;
        let Ok(li) = self.index_of(layer) else {
            return;
        };
        if !self.inserts_waiting(layer) || li.inserting.swap(true, Ordering::AcqRel) {
            return;
        }
        match self.store.pool.get(cfg.build_threads) {
            Ok(pool) => {
                // Weak, like a build: a queued insert does not keep a dropped session alive.
                let session = Arc::downgrade(self);
                pool.spawn(move || {
                    if let Some(session) = session.upgrade() {
                        let done = crate::error::catch_panic("index insert", || {
                            session.insert_pending(layer);
                            Ok(())
                        });
                        if let Err(e) = done {
                            session.insert_failed(layer, &e);
                        }
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
    /// captured, insert keys only. The caller has set the layer's `inserting` flag; it is
    /// cleared here when nothing is left.
    pub(super) fn insert_pending(&self, layer: u32) {
        let Ok(li) = self.index_of(layer) else { return };
        loop {
            let failed = self.insert_backlog(layer, li);
            li.inserting.store(false, Ordering::Release);
            // An append that arrived after the backlog's last look but before the flag was
            // cleared did not schedule an insert (it saw the flag set): look once more, or
            // those tokens would wait for the next append, which may never come. (Not after a
            // failed batch: the next append retries it.)
            if failed || !self.inserts_waiting(layer) || li.inserting.swap(true, Ordering::AcqRel) {
                break;
            }
        }
    }

    /// Whether `layer` has a ready index and at least `insert_batch` tokens that left the
    /// window and are not in it.
    fn inserts_waiting(&self, layer: u32) -> bool {
        let cfg = &self.decode;
        let (Ok(li), Ok(len)) = (self.index_of(layer), self.len(layer)) else {
            return false;
        };
        let (indexed, _) = li.coverage();
        let ready = li.heads.iter().all(|h| {
            h.read()
                .map(|h| matches!(*h, HeadIndex::Ready(_)))
                .unwrap_or(false)
        });
        let pending = cfg.retrievable_end(len).saturating_sub(cfg.sinks + indexed);
        ready && pending >= cfg.insert_batch.max(1)
    }

    /// Inserts the waiting tokens of every KV head of `layer` until none is left. Returns
    /// whether a batch failed.
    fn insert_backlog(&self, layer: u32, li: &LayerIndex) -> bool {
        let mut failed = false;
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
                        if done.keys > 0 {
                            self.store.observer.keys_inserted(done.keys as u64);
                        }
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
                        failed = true;
                        tracing::warn!(layer, kv_head = g, error = %e, "index insert failed");
                    }
                }
            }
            if !more {
                break;
            }
        }
        failed
    }

    /// Records a background insert of `layer` that failed by panicking. Inserts of the layer
    /// stay off (its `inserting` flag is left set), so the bug is not hit again on every
    /// batch; the tokens not inserted are still found, by the exact scan searches make of
    /// what the index does not cover.
    pub(super) fn insert_failed(&self, layer: u32, e: &KvdexError) {
        tracing::error!(layer, error = %e, "index insert failed; inserts of the layer stop");
        if let Ok(li) = self.index_of(layer) {
            li.inserting.store(true, Ordering::Release);
            li.update(|st, _| st.error = Some(format!("insert: {e}")));
        }
    }

    /// One insert batch of KV head `g` of layer `l` (None: nothing waits, or no index). The
    /// guide queries (taken, so that each is used once) are prepared under the head's shared
    /// lock, so searches go on meanwhile. The insert itself runs on a copy of the index with
    /// no lock held, and the copy is swapped in under the exclusive lock (see
    /// [`insert_copy_on_write`]): no search waits for an insert. An index that cannot be
    /// copied (hnsw), or is larger than `decode.insert_copy_max_bytes`, is extended in place
    /// under the exclusive lock.
    fn insert_batch(
        &self,
        l: &LayerKv,
        g: usize,
        head: &RwLock<HeadIndex>,
        guides: &mut Vec<f32>,
    ) -> Result<Option<BatchDone>> {
        let cfg = &self.decode;
        let (s, d) = (self.shape, self.shape.head_dim as usize);
        let end = cfg.retrievable_end(l.len);
        let t = Instant::now();
        let (from, to, keys, guide, copy) = {
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
            let copy = (index.memory_bytes() <= cfg.insert_copy_max_bytes)
                .then(|| index.try_clone_box())
                .flatten()
                .map(|c| (c, origin_of(index.as_ref()), index.len()));
            (from, to, keys, guide, copy)
        };
        let guide_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let insert = |index: &mut dyn MipsIndexMut| -> Result<()> {
            if guide.is_empty() {
                index.insert(&keys)?;
            } else {
                index.insert_guided(&keys, &guide)?;
            }
            Ok(())
        };
        let inserted = match copy {
            Some((copy, origin, len)) => insert_copy_on_write(head, copy, (origin, len), insert)?,
            None => {
                let mut h = head.write().map_err(poisoned)?;
                let HeadIndex::Ready(index) = &mut *h else {
                    return Ok(None);
                };
                // A rebuild replaced the index meanwhile: the next round starts over from its
                // length.
                let same = cfg.sinks + index.len() == from;
                if same {
                    insert(index.as_mut())?;
                }
                same
            }
        };
        Ok(Some(BatchDone {
            inserted,
            keys: if inserted { to - from } else { 0 },
            more: to < end || !inserted,
            guides: if inserted { guide.len() } else { 0 },
            guide_secs,
            insert_secs: t.elapsed().as_secs_f64(),
        }))
    }
}

/// The address of an index, to tell after an insert whether a rebuild replaced it.
fn origin_of(index: &dyn MipsIndexMut) -> usize {
    index as *const dyn MipsIndexMut as *const () as usize
}

/// Runs `insert` on `copy` (a copy of the head's index at address `origin`, `len` keys) with
/// no lock held, so searches go on over the original meanwhile, then swaps the copy in under
/// the exclusive lock, held for the swap alone; the original is freed after the lock is
/// released. Returns false, dropping the copy, when a rebuild replaced the original meanwhile
/// (a different index, or one of another length): the caller retries against the new one.
/// (A rebuild's index is allocated while the one it replaces is alive, so it cannot reuse the
/// original's address; only two rebuilds within one batch could, and then the length must
/// match too.)
fn insert_copy_on_write(
    head: &RwLock<HeadIndex>,
    mut copy: Box<dyn MipsIndexMut>,
    (origin, len): (usize, usize),
    insert: impl FnOnce(&mut dyn MipsIndexMut) -> Result<()>,
) -> Result<bool> {
    insert(copy.as_mut())?;
    let original = {
        let mut h = head.write().map_err(poisoned)?;
        let HeadIndex::Ready(index) = &mut *h else {
            return Ok(false);
        };
        if origin_of(index.as_ref()) != origin || index.len() != len {
            return Ok(false);
        }
        std::mem::replace(index, copy)
    };
    drop(original);
    Ok(true)
}

/// What one insert batch did.
struct BatchDone {
    /// The batch went in.
    inserted: bool,
    /// Keys it put in the index (0 if it did not go in).
    keys: usize,
    /// Tokens still wait (or the batch must be retried).
    more: bool,
    /// Guide queries it used.
    guides: usize,
    /// Seconds preparing the guide (shared lock), and inserting (on a copy, or in place under
    /// the exclusive lock).
    guide_secs: f64,
    insert_secs: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvdex_index::keys::{KeyRows, KeySlice};
    use kvdex_index::FlatIndex;

    fn head_of(len: usize) -> RwLock<HeadIndex> {
        let mut f = FlatIndex::new(0);
        let keys = vec![0f32; len];
        let slice = KeySlice::new(KeyRows::F32(&keys), 1).expect("keys");
        kvdex_index::MipsIndexMut::insert(&mut f, &slice).expect("insert");
        RwLock::new(HeadIndex::Ready(Box::new(f)))
    }

    fn copy_of(head: &RwLock<HeadIndex>) -> (Box<dyn MipsIndexMut>, (usize, usize)) {
        let h = head.read().expect("lock");
        let HeadIndex::Ready(index) = &*h else {
            panic!("not ready")
        };
        let copy = index.try_clone_box().expect("flat copies");
        (copy, (origin_of(index.as_ref()), index.len()))
    }

    #[test]
    fn the_insert_runs_with_no_lock_held_and_the_copy_is_swapped_in() {
        let head = head_of(10);
        let (copy, origin) = copy_of(&head);
        let keys = vec![0f32; 20];
        let done = insert_copy_on_write(&head, copy, origin, |index| {
            // A search (shared) and even a writer could take the lock now.
            assert!(
                head.try_write().is_ok(),
                "the head is locked during the insert"
            );
            let slice = KeySlice::new(KeyRows::F32(&keys), 1)?;
            index.insert(&slice)?;
            Ok(())
        })
        .expect("insert");
        assert!(done);
        let h = head.read().expect("lock");
        let HeadIndex::Ready(index) = &*h else {
            panic!("not ready")
        };
        assert_eq!(index.len(), 20);
    }

    #[test]
    fn a_rebuild_during_the_insert_wins_and_the_batch_is_retried() {
        let head = head_of(10);
        let (copy, origin) = copy_of(&head);
        let done = insert_copy_on_write(&head, copy, origin, |_| {
            // A rebuild installs a new index of the same length while the copy is extended.
            let mut f = FlatIndex::new(0);
            let keys = vec![0f32; 10];
            kvdex_index::MipsIndexMut::insert(&mut f, &KeySlice::new(KeyRows::F32(&keys), 1)?)?;
            *head.write().expect("lock") = HeadIndex::Ready(Box::new(f));
            Ok(())
        })
        .expect("insert");
        assert!(
            !done,
            "the copy of the replaced index must not be installed"
        );
        // A head that went back to exact scans (a rebuild under way) is left alone too.
        let (copy, origin) = copy_of(&head);
        *head.write().expect("lock") = HeadIndex::Exact;
        assert!(!insert_copy_on_write(&head, copy, origin, |_| Ok(())).expect("insert"));
        assert!(matches!(*head.read().expect("lock"), HeadIndex::Exact));
    }

    #[test]
    fn a_failed_insert_leaves_the_original() {
        let head = head_of(10);
        let (copy, origin) = copy_of(&head);
        let r = insert_copy_on_write(&head, copy, origin, |_| {
            Err(KvdexError::BadRequest("boom".into()))
        });
        assert!(r.is_err());
        let h = head.read().expect("lock");
        let HeadIndex::Ready(index) = &*h else {
            panic!("not ready")
        };
        assert_eq!(index.len(), 10);
    }
}
