//! `PendingRetrieve`: a retrieve submitted without waiting, until `Session.wait_retrieve`
//! reads it (once).

use std::sync::Mutex;

use kvdex_client::{PendingRetrieve as Pending, SessionHandle};
use kvdex_index::KeyDtype;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{bad_request, to_py};

/// A retrieve in flight on its session (made by `Session.submit_retrieve`).
#[pyclass(module = "kvdex._native", frozen)]
pub struct PendingRetrieve {
    /// Taken by the wait.
    inner: Mutex<Option<Pending>>,
    /// The query had a positions axis: results keep it.
    multi: bool,
    request_id: u64,
}

impl PendingRetrieve {
    pub(crate) fn new(p: Pending, multi: bool) -> Self {
        Self {
            request_id: p.request_id(),
            inner: Mutex::new(Some(p)),
            multi,
        }
    }

    /// True once the results are ready; a retrieve already waited on is an error.
    pub(crate) fn ready(&self, py: Python<'_>, h: &mut SessionHandle) -> PyResult<bool> {
        let guard = self
            .inner
            .lock()
            .map_err(|_| bad_request(py, "pending retrieve lock poisoned"))?;
        match guard.as_ref() {
            Some(p) => h.is_ready(p).map_err(|e| to_py(py, e)),
            None => Err(bad_request(py, "this retrieve was already waited on")),
        }
    }

    /// Waits for the results (the GIL released meanwhile) and copies them out.
    pub(crate) fn wait<'py>(
        &self,
        py: Python<'py>,
        dtype: KeyDtype,
        h: &mut SessionHandle,
    ) -> PyResult<Bound<'py, PyDict>> {
        let p = self
            .inner
            .lock()
            .map_err(|_| bad_request(py, "pending retrieve lock poisoned"))?
            .take()
            .ok_or_else(|| bad_request(py, "this retrieve was already waited on"))?;
        let r = py
            .detach(move || h.wait_retrieve(p))
            .map_err(|e| to_py(py, e))?;
        crate::decode::results(py, dtype, self.multi, &r)
    }
}

#[pymethods]
impl PendingRetrieve {
    /// The request's id on the session's ring.
    #[getter]
    fn request_id(&self) -> u64 {
        self.request_id
    }
}
