//! The blocking Rust client: connect, create and drop sessions, append, search, gather.

