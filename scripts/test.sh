#!/usr/bin/env bash
# The one test command: every Rust test in the workspace, then the Python client's tests.
# README gives it, and .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets
