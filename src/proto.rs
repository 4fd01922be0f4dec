//! The request/response codec carried by the shared-memory rings.

