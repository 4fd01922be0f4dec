"""Shared fixtures: the kvdex binary and the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kvdex

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root (holds Cargo.toml, examples/, target/)."""
    return REPO


@pytest.fixture(scope="session")
def kvdex_bin() -> str:
    """The kvdex binary; scripts/test.sh builds it, so a miss only skips ad-hoc runs."""
    old = os.getcwd()
    try:
        os.chdir(REPO)
        return kvdex.find_binary()
    except kvdex.DaemonError as e:
        pytest.skip(f"no kvdex binary: {e}")
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def daemon(kvdex_bin: str):
    """A daemon on a free port for one test module (its sessions do not leak into others)."""
    with kvdex.Daemon(binary=kvdex_bin) as d:
        yield d
