//! The Prometheus registry: request counts and latency per op, memory, sessions, bytes moved.

