"""Start and stop a local ``kvdex serve`` as a context manager.

    with kvdex.Daemon() as d:
        client = kvdex.connect(d.url)
        ...

The binary is found, in order, from ``$KVDEX_BIN``, the newer of ``target/release/kvdex`` and
``target/debug/kvdex`` in the current directory or any parent (a cargo checkout), or ``kvdex``
on ``$PATH``. The daemon listens on a free loopback port; :meth:`Daemon.start` returns once
``/readyz`` answers 200, and raises :class:`kvdex.DaemonError` with the daemon's own log tail if
it exits or is not ready in time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import DaemonError


def find_binary(explicit: Optional[str] = None) -> str:
    """Returns the path of the ``kvdex`` binary (see the module docs for the search order).

    Raises:
        kvdex.DaemonError: naming every place looked at, when none holds an executable.
    """
    tried: List[str] = []
    for cand in (explicit, os.environ.get("KVDEX_BIN")):
        if cand:
            if os.access(cand, os.X_OK) and os.path.isfile(cand):
                return cand
            tried.append(cand)
    here = Path.cwd().resolve()
    for base in (here, *here.parents):
        built = [p for p in (base / "target" / profile / "kvdex" for profile in ("release", "debug"))
                 if p.is_file() and os.access(p, os.X_OK)]
        if built:
            # The newer build: after a `cargo build` (debug), an old release binary would
            # otherwise run code that no longer matches the checkout.
            return str(max(built, key=lambda p: p.stat().st_mtime))
        if (base / "Cargo.toml").is_file():
            tried.append(f"{base}/target/{{release,debug}}/kvdex")
    on_path = shutil.which("kvdex")
    if on_path:
        return on_path
    tried.append("kvdex on $PATH")
    raise DaemonError(
        "cannot find the kvdex binary (build it with `cargo build --release`, or set KVDEX_BIN); "
        "tried: " + ", ".join(tried)
    )


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A ``kvdex serve`` child process, started on enter and stopped on exit.

    Args:
        binary: path of the ``kvdex`` binary; default: :func:`find_binary`.
        config: a TOML file passed as ``--config``.
        args: extra command-line arguments for ``kvdex serve``.
        env: extra environment variables (e.g. ``KVDEX_LOG``).
        ready_timeout: seconds to wait for ``/readyz``.
    """

    def __init__(
        self,
        binary: Optional[str] = None,
        config: Optional[str] = None,
        args: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.binary = find_binary(binary)
        self.config = config
        self.args = list(args)
        self.env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.port: Optional[int] = None
        self._proc: Optional[subprocess.Popen] = None
        self._log: Optional[tempfile._TemporaryFileWrapper] = None

    @property
    def url(self) -> str:
        """The control plane's base URL, e.g. ``http://127.0.0.1:41234``."""
        if self.port is None:
            raise DaemonError("the daemon is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        """The child's process id while it runs."""
        return self._proc.pid if self._proc else None

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last ``max_bytes`` of the daemon's stderr/stdout (its tracing log)."""
        if self._log is None:
            return ""
        self._log.flush()
        with open(self._log.name, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")

    def start(self) -> "Daemon":
        """Starts the daemon and waits until ``/readyz`` answers 200.

        Raises:
            kvdex.DaemonError: the process exited, or was not ready within ``ready_timeout``;
                the message includes the daemon's log tail.
        """
        if self._proc is not None:
            raise DaemonError("the daemon is already started")
        self.port = free_port()
        cmd = [self.binary, "serve", "--listen", f"127.0.0.1:{self.port}"]
        if self.config:
            cmd += ["--config", self.config]
        cmd += self.args
        self._log = tempfile.NamedTemporaryFile(prefix="kvdex-daemon-", suffix=".log", delete=False)
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                self._cleanup()
                raise DaemonError(f"{' '.join(cmd)} exited with status {code}:\n{tail}")
            if self._ready():
                return self
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise DaemonError(f"daemon not ready on {self.url}/readyz after {self.ready_timeout}s:\n{tail}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=1.0) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """Stops the daemon (SIGTERM, then SIGKILL after ``timeout`` s); returns its exit status."""
        proc, code = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        self._cleanup()
        return code

    def kill(self) -> None:
        """Kills the daemon with SIGKILL (for tests of a dead daemon); the log is kept."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _cleanup(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            try:
                os.unlink(self._log.name)
            except OSError:
                pass
            self._log = None

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Daemon", "find_binary", "free_port"]
