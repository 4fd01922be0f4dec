//! The per-client shared-memory region: header, submission and completion rings, payload
//! arena, and the spin-then-park wait.

