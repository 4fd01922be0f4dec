//! The decode-path settings of a store ([`DecodeConfig`], from the `[decode]` config table) and
//! the build pool they size.

use super::*;

/// Static-token and build settings of a store. The build settings are shared by every session;
/// `sinks` and `window` are the defaults a session may replace with its own
/// ([`crate::store::SessionSpec`]), and a session's [`crate::store::Session::decode_config`]
/// holds the values it uses.
#[derive(Clone, Debug)]
pub struct DecodeConfig {
    /// S: the first tokens of every layer, kept by the engine and never retrieved.
    pub sinks: usize,
    /// W: the most recent tokens, kept by the engine and never retrieved.
    pub window: usize,
    /// Threads of the build pool (shared by every session of the store).
    pub build_threads: usize,
    /// Tokens inserted per lock hold by the background insert; also how many must be waiting
    /// before an insert is scheduled.
    pub insert_batch: usize,
    /// Decode queries per KV head captured between insert batches to guide them
    /// (`MipsIndexMut::insert_guided`); 0 inserts keys only, through the build's remembered
    /// prefill queries.
    pub insert_guide_queries: usize,
    /// Indices up to this many bytes are extended on a copy that is then swapped in, so no
    /// search waits for an insert; larger ones are extended in place under the head's
    /// exclusive lock (a copy per batch would cost more memory traffic than the searches).
    pub insert_copy_max_bytes: usize,
    /// Index parameters (graph, hnsw and cluster).
    pub params: IndexParams,
    /// The kind every seal builds instead of the one it names (`decode.index_kind`).
    pub kind_override: Option<IndexKind>,
    /// Spread one layer's query heads over cores (rayon) during a retrieve.
    pub parallel_heads: bool,
    /// Keys sampled per head to estimate the unretrieved mass (adaptive budget).
    pub tail_sample: usize,
    /// Training positions a layer may stage in seal parts before its seal (each position is
    /// `q_heads` queries): bounds what a session holds between requests, beyond the budget
    /// the staged bytes are charged to. 0 refuses parts.
    pub seal_max_staged_queries: usize,
    /// Online recall sampling and the drift response ([`crate::store::sampler`]).
    pub sampling: crate::store::sampler::SamplingConfig,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            sinks: 128,
            window: 512,
            build_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            insert_batch: 64,
            insert_guide_queries: 16,
            insert_copy_max_bytes: 16 << 20,
            params: IndexParams::default(),
            kind_override: None,
            parallel_heads: true,
            tail_sample: 256,
            seal_max_staged_queries: 1 << 16,
            sampling: Default::default(),
        }
    }
}

impl DecodeConfig {
    /// The end of the retrievable range `sinks .. end` of a layer of `len` tokens.
    pub fn retrievable_end(&self, len: usize) -> usize {
        len.saturating_sub(self.window).max(self.sinks)
    }
}

/// The build pool, created on first use so that stores which never seal start no threads.
#[derive(Default)]
pub(in crate::store) struct BuildPool(OnceLock<std::result::Result<rayon::ThreadPool, String>>);

impl BuildPool {
    pub(in crate::store) fn get(&self, threads: usize) -> Result<&rayon::ThreadPool> {
        self.0
            .get_or_init(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads.max(1))
                    .thread_name(|i| format!("kvdex-build-{i}"))
                    // Jobs catch their own panics (a failed build or insert); this is the last
                    // line: without a handler rayon aborts the whole process on a panic.
                    .panic_handler(|p| {
                        let e = KvdexError::from_panic("a build pool job", &*p);
                        tracing::error!(error = %e, "background job failed");
                    })
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| KvdexError::Config(format!("cannot start the index build pool: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job that panics on the build pool is reported, not fatal: rayon's default for a
    /// panic in `spawn` is to abort the process (this test binary included), and the pool
    /// goes on running later jobs.
    #[test]
    fn a_panicking_job_does_not_abort_the_process() {
        let pool = BuildPool::default();
        let pool = pool.get(1).unwrap();
        pool.spawn(|| panic!("a bug in a background job"));
        let (tx, rx) = std::sync::mpsc::channel();
        pool.spawn(move || tx.send(7).unwrap());
        assert_eq!(rx.recv().unwrap(), 7);
    }
}
