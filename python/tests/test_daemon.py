"""kvdex.Daemon: finding the binary and reporting a failed start with the daemon's own words."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import kvdex


def fake_binary(tmp_path: Path, body: str) -> str:
    p = tmp_path / "kvdex"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def test_missing_binary_names_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVDEX_BIN", str(tmp_path / "nope"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(kvdex.DaemonError, match="cannot find the kvdex binary.*nope"):
        kvdex.find_binary()


def test_env_var_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    b = fake_binary(tmp_path, "exit 0")
    monkeypatch.setenv("KVDEX_BIN", b)
    assert kvdex.find_binary() == b


def test_the_newer_of_the_release_and_debug_builds_is_found(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """A stale release binary used to win over a fresh `cargo build` (debug)."""
    monkeypatch.delenv("KVDEX_BIN", raising=False)
    monkeypatch.chdir(tmp_path)
    built = {}
    for profile, mtime in (("release", 1_000_000), ("debug", 2_000_000)):
        (tmp_path / "target" / profile).mkdir(parents=True)
        built[profile] = fake_binary(tmp_path / "target" / profile, "exit 0")
        os.utime(built[profile], (mtime, mtime))
    assert kvdex.find_binary() == built["debug"]
    os.utime(built["release"], (3_000_000, 3_000_000))
    assert kvdex.find_binary() == built["release"]


def test_daemon_that_exits_reports_its_message(tmp_path: Path) -> None:
    b = fake_binary(tmp_path, 'echo "config: port already taken" >&2; exit 3')
    with pytest.raises(kvdex.DaemonError, match=r"(?s)exited with status 3.*port already taken"):
        with kvdex.Daemon(binary=b):
            pass


def test_daemon_never_ready_times_out_and_is_stopped(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    b = fake_binary(tmp_path, f"echo $$ > {pidfile}; exec sleep 30")
    d = kvdex.Daemon(binary=b, ready_timeout=0.5)
    with pytest.raises(kvdex.DaemonError, match="not ready"):
        d.start()
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child was stopped, not leaked


def test_url_before_start_is_an_error(tmp_path: Path) -> None:
    d = kvdex.Daemon(binary=fake_binary(tmp_path, "exit 0"))
    with pytest.raises(kvdex.DaemonError, match="not started"):
        _ = d.url
