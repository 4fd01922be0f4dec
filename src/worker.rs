//! The daemon side of a shared-memory region: validates and serves each request.

