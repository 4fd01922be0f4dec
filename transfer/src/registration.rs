//! A destination that unregisters itself, so that a session's registrations end with it.

use std::sync::Arc;

use crate::{DestId, DeviceLink};

/// Owns one registered destination of `link`; dropping it unregisters (waiting out in-flight
/// gathers). A session keeps its registrations in these, so that a session ending, or a dead
/// client's session being reaped, cannot leave a destination (or an IPC mapping) behind.
pub struct Registration {
    link: Arc<dyn DeviceLink>,
    id: DestId,
}

impl Registration {
    /// Takes ownership of `id`, which `link` issued.
    pub fn new(link: Arc<dyn DeviceLink>, id: DestId) -> Self {
        Self { link, id }
    }

    /// The handle, for `gather`.
    pub fn id(&self) -> DestId {
        self.id
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = self.link.unregister(self.id) {
            tracing::error!(dest = self.id.0, "unregister on drop failed: {e}");
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("link", &self.link.name())
            .field("id", &self.id)
            .finish()
    }
}
