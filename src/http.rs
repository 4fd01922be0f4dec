//! The axum control plane: sessions, health, stats and `/metrics`.

