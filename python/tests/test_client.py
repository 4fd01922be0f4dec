"""The client against a real daemon started by a fixture: round trips and bad input.

Each session test runs twice: through a daemon (`kvdex serve`, HTTP + shared memory), and through
an in-process server (a real region and worker thread, attached with `kvdex.attach`), so the
binding is exercised against the real worker even on a daemon build without a data plane.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import kvdex

SHAPE = dict(layers=2, q_heads=4, kv_heads=2, head_dim=8)


def new_session(client: kvdex.Client, dtype: str = "f16") -> kvdex.Session:
    try:
        return client.create_session(dtype=dtype, **SHAPE)
    except kvdex.DisconnectedError as e:
        # The daemon answers 503 while its shared-memory data plane is not wired in: say so.
        if "not built" in str(e):
            pytest.skip(f"this daemon build has no data plane: {e}")
        raise


@pytest.fixture
def client(daemon: kvdex.Daemon) -> kvdex.Client:
    return kvdex.connect(daemon.url)


@pytest.fixture(params=["daemon", "inproc"])
def session(request):
    if request.param == "daemon":
        s = new_session(kvdex.connect(request.getfixturevalue("daemon").url))
        yield s
        s.close()
    else:
        server = kvdex._native.InProcessServer(dtype="f16", **SHAPE)
        s = kvdex.attach(server.shm_path, server.token)
        yield s
        s.close()
        server.stop()


def test_round_trip_matches_numpy(session: kvdex.Session) -> None:
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 40, 8)).astype(np.float16)
    v = rng.standard_normal((2, 40, 8)).astype(np.float16)
    assert session.append(1, k, v) == 40
    q = rng.standard_normal((4, 8)).astype(np.float32)
    ids, scores = session.search(1, q, 6)
    assert ids.shape == (4, 6) and ids.dtype == np.uint32
    for h in range(4):
        exact = k[h // 2].astype(np.float32) @ q[h]
        np.testing.assert_array_equal(np.sort(ids[h]), np.sort(np.argsort(-exact)[:6]))
        np.testing.assert_allclose(scores[h], np.sort(exact)[::-1][:6], rtol=2e-3, atol=2e-3)
    gk, gv = session.gather(1, 1, ids[3])
    assert gk.dtype == np.float16
    np.testing.assert_array_equal(gk, k[1, ids[3]])
    np.testing.assert_array_equal(gv, v[1, ids[3]])
    assert session.ping(b"abc") == b"abc"


def test_search_into_caller_buffers(session: kvdex.Session) -> None:
    k = np.eye(8, dtype=np.float32)[None].repeat(2, 0)  # token i = e_i
    session.append(0, k, k)
    ids = np.zeros((4, 2), np.uint32)
    scores = np.zeros((4, 2), np.float32)
    q = np.tile(np.arange(8, dtype=np.float32), (4, 1))
    assert session.search_into(0, q, 2, ids, scores) == 2
    assert ids.tolist() == [[7, 6]] * 4
    with pytest.raises(kvdex.BadRequestError, match=r"ids has shape \[4, 3\]"):
        session.search_into(0, q, 2, np.zeros((4, 3), np.uint32), scores)


def test_f32_input_into_f16_session_and_dlpack_objects(session: kvdex.Session) -> None:
    class Tensorish:  # exports DLPack only, like a CPU torch.Tensor
        def __init__(self, a: np.ndarray) -> None:
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    k = np.linspace(-1, 1, 2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    assert session.append(0, Tensorish(k), Tensorish(k)) == 3
    gk, _ = session.gather(0, 0, [2, 0])
    np.testing.assert_array_equal(gk, k[0, [2, 0]].astype(np.float16))


def test_torch_tensors_when_installed(session: kvdex.Session) -> None:
    torch = pytest.importorskip("torch")
    k = torch.randn(2, 5, 8, dtype=torch.float16)
    assert session.append(0, k, k) == 5
    ids, _ = session.search(0, torch.randn(4, 8), 2)
    assert ids.shape == (4, 2)


def test_bad_input_is_a_clear_exception(session: kvdex.Session) -> None:
    z = np.zeros((2, 3, 8), np.float64)
    with pytest.raises(kvdex.BadRequestError, match="k must be float16 or float32, got float64"):
        session.append(0, z, z)
    good = np.zeros((2, 3, 8), np.float16)
    with pytest.raises(kvdex.BadRequestError, match=r"v has shape \[2, 3, 7\], expected \[2, 3, 8\]"):
        session.append(0, good, np.zeros((2, 3, 7), np.float16))
    with pytest.raises(kvdex.BadRequestError, match=r"q has shape \[4, 9\]"):
        session.search(0, np.zeros((4, 9), np.float32), 1)
    with pytest.raises(kvdex.KvdexError, match="layer"):
        session.append(5, good, good)  # the daemon's message names the layer
    session.append(0, good, good)
    with pytest.raises(kvdex.BadRequestError, match="out of range"):
        session.gather(0, 0, [0, 99])
    with pytest.raises(kvdex.BadRequestError):
        session.search(0, "not an array", 1)


def test_bad_shape_at_create(client: kvdex.Client) -> None:
    with pytest.raises(kvdex.BadRequestError, match="not a multiple"):
        client.create_session(layers=1, q_heads=3, kv_heads=2, head_dim=8)
    with pytest.raises(kvdex.BadRequestError, match="unknown dtype"):
        client.create_session(layers=1, q_heads=2, kv_heads=2, head_dim=8, dtype="int4")


def test_closed_session(session: kvdex.Session) -> None:
    s = session
    s.close()
    s.close()  # idempotent
    assert s.closed
    with pytest.raises(kvdex.DisconnectedError, match="closed"):
        s.search(0, np.zeros((4, 8), np.float32), 1)


def test_dead_daemon(kvdex_bin: str) -> None:
    d = kvdex.Daemon(binary=kvdex_bin).start()
    try:  # stop the daemon even when the test skips or fails half-way
        url = d.url
        s = new_session(kvdex.connect(url))
        d.kill()
        with pytest.raises(kvdex.DisconnectedError):
            s.search(0, np.zeros((4, 8), np.float32), 1)
    finally:
        d.stop()
    with pytest.raises(kvdex.DisconnectedError):
        kvdex.connect(url)


def test_stopped_server_is_a_disconnect() -> None:
    server = kvdex._native.InProcessServer(dtype="f16", **SHAPE)
    s = kvdex.attach(server.shm_path, server.token)
    assert s.ping(b"x") == b"x"
    server.stop()
    with pytest.raises(kvdex.DisconnectedError, match="stopped"):
        s.ping(b"x")


def test_wrong_token_is_unauthorized() -> None:
    server = kvdex._native.InProcessServer(dtype="f16", **SHAPE)
    try:
        with pytest.raises(kvdex.UnauthorizedError, match="refused the token"):
            kvdex.attach(server.shm_path, "0" * 32)
    finally:
        server.stop()


def test_connect_to_nothing_names_the_url() -> None:
    with pytest.raises(kvdex.DisconnectedError, match="healthz"):
        kvdex.connect(f"http://127.0.0.1:{kvdex.daemon.free_port()}")


def test_attach_with_a_wrong_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(kvdex.KvdexError):
        kvdex.attach(str(tmp_path / "missing-region"), "00" * 16)
    with pytest.raises(kvdex.BadRequestError, match="32 hex"):
        kvdex.attach("/dev/shm/x", "abc")


def test_misused_arguments_name_the_argument(session: kvdex.Session) -> None:
    good = np.zeros((2, 3, 8), np.float16)
    q = np.zeros((4, 8), np.float32)
    with pytest.raises(kvdex.BadRequestError, match=r"layer = -1 is out of range"):
        session.append(-1, good, good)
    with pytest.raises(kvdex.BadRequestError, match="layer must be an integer, got float"):
        session.search(1.5, q, 1)
    with pytest.raises(kvdex.BadRequestError, match=r"q has shape \[32\], expected 2 dimensions"):
        session.search(0, np.zeros(32, np.float32), 1)
    with pytest.raises(kvdex.BadRequestError, match=r"k = -1 is out of range"):
        session.search(0, q, -1)
    with pytest.raises(kvdex.BadRequestError, match=r"k = 1099511627776 is out of range"):
        session.retrieve(0, q, 2**40)
    session.append(0, good, good)
    with pytest.raises(kvdex.BadRequestError, match=r"token id -1 is out of range"):
        session.gather(0, 0, [0, -1])
    with pytest.raises(kvdex.BadRequestError, match="integer token ids, got float64"):
        session.gather(0, 0, [0.5])
    # Nothing above reached the daemon as garbage: the session still serves.
    k_rows, _ = session.gather(0, 1, np.array([2, 0], np.int64))
    assert k_rows.shape == (2, 8)


def test_a_layer_with_nothing_appended_is_empty_not_fatal(session: kvdex.Session) -> None:
    """Searching, gathering or retrieving a layer before its first append once panicked the
    daemon's worker (an unaligned empty key slice) and ended the session."""
    q = np.ones((4, 8), np.float32)
    ids, scores = session.search(1, q, 5)
    assert ids.shape == (4, 0) and scores.shape == (4, 0)
    r = session.retrieve(1, q, 5, gather=True)
    assert r.k.tolist() == [0, 0, 0, 0]
    with pytest.raises(kvdex.BadRequestError, match="out of range"):
        session.gather(1, 0, [0])
    k_rows, v_rows = session.gather(1, 0, [])
    assert k_rows.shape[0] == 0 and v_rows.shape[0] == 0
    good = np.ones((2, 3, 8), np.float16)
    assert session.append(1, good, good) == 3
    assert session.search(1, q, 5)[0].shape == (4, 3)


def test_a_dead_daemon_inside_a_with_block_reports_the_real_error(kvdex_bin: str) -> None:
    """__exit__ closes best effort: the DELETE that fails against a dead daemon used to
    replace the error that said what happened."""
    d = kvdex.Daemon(binary=kvdex_bin).start()
    try:
        client = kvdex.connect(d.url)
        with pytest.raises(kvdex.DisconnectedError, match="daemon exited|stopped|gone") as info:
            with new_session(client) as s:
                d.kill()
                s.search(0, np.zeros((4, 8), np.float32), 1)
        assert "DELETE" not in str(info.value)
        assert s.closed
    finally:
        d.stop()


def test_an_explicit_scale_must_be_positive(session: kvdex.Session) -> None:
    """Protocol version 1 encoded "default scale" as 0, so scale=0.0 meant 1/sqrt(head_dim).
    Version 2 has a flag for "a scale is given"; 0, negative and NaN scales are refused."""
    good = np.ones((2, 3, 8), np.float16)
    session.append(0, good, good)
    for scale in (0.0, -1.0, float("nan")):
        with pytest.raises(kvdex.BadRequestError, match="scale .* must be finite and positive"):
            session.retrieve(0, np.ones((4, 8), np.float32), 2, scale=scale)
    assert session.retrieve(0, np.ones((4, 8), np.float32), 2, scale=0.5).k is not None


def test_a_budget_over_u32_is_refused_by_the_wire_encoder(session: kvdex.Session) -> None:
    """The Python layer refuses k >= 2**32 itself; under it, the binding's Rust encoder used to
    send such a k as ``k as u32`` (2**32 -> 0). It now refuses it naming k."""
    good = np.ones((2, 3, 8), np.float16)
    session.append(0, good, good)
    q = np.ones((4, 8), np.float32)
    with pytest.raises(kvdex.BadRequestError, match="budget k = 4294967296 does not fit"):
        session._s.retrieve(0, q, 2**32, None, 1, None, True, False, None)
    with pytest.raises(kvdex.BadRequestError, match="budget max_k = 4294967297 does not fit"):
        session._s.retrieve(0, q, None, 0.9, 1, 2**32 + 1, True, False, None)
    assert session.retrieve(0, q, 2**32 - 1).k is not None


def test_bad_urls_shapes_and_merge_inputs_name_what_is_wrong(client: kvdex.Client) -> None:
    with pytest.raises(kvdex.BadRequestError, match="url must look like http://"):
        kvdex.connect("127.0.0.1:7070")
    with pytest.raises(kvdex.BadRequestError, match="url must look like http://"):
        kvdex.connect("https://127.0.0.1:7070")
    with pytest.raises(kvdex.BadRequestError, match="layers = -1 is out of range"):
        client.create_session(layers=-1, q_heads=4, kv_heads=2, head_dim=8)
    with pytest.raises(kvdex.BadRequestError, match="head_dim must be an integer, got str"):
        client.create_session(layers=1, q_heads=4, kv_heads=2, head_dim="8")
    with pytest.raises(kvdex.BadRequestError, match="payload_bytes = -5 is out of range"):
        client.create_session(layers=1, q_heads=4, kv_heads=2, head_dim=8, payload_bytes=-5)
    with pytest.raises(kvdex.BadRequestError, match=r"merge: lse_a has shape \[1, 4\], expected \[heads\]"):
        kvdex.merge(np.ones((4, 8)), np.ones((1, 4)), np.ones((4, 8)), np.ones(4))
    with pytest.raises(kvdex.BadRequestError, match=r"merge: out_a has shape \[8\]"):
        kvdex.merge(np.ones(8), np.ones(1), np.ones(8), np.ones(1))


def test_ctrl_c_interrupts_a_request_to_a_hung_daemon(kvdex_bin: str) -> None:
    """A SIGSTOPped daemon used to make a call block until it resumed, deaf to Ctrl-C."""
    import signal
    import threading
    import time

    d = kvdex.Daemon(binary=kvdex_bin).start()
    stopped = False
    # A process started in the background by a non-interactive shell (`cmd &`, some CI
    # runners) inherits SIGINT ignored, and Python then leaves it ignored: install Python's
    # own handler for this test, so that the SIGINT below is a KeyboardInterrupt wherever the
    # suite runs.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # If the interrupt is lost anyway, resume the daemon so the test fails instead of hanging.
    watchdog = threading.Timer(30.0, lambda: os.kill(d.pid, signal.SIGCONT))
    try:
        s = new_session(kvdex.connect(d.url))
        assert s.ping(b"x") == b"x"
        os.kill(d.pid, signal.SIGSTOP)
        stopped = True
        while Path(f"/proc/{d.pid}/stat").read_text().rsplit(") ", 1)[1][0] != "T":
            time.sleep(0.005)  # kill(2) only queues the signal
        watchdog.start()
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            s.ping(b"hung")
        with pytest.raises(kvdex.DisconnectedError, match="cannot be used any more"):
            s.ping(b"again")
        os.kill(d.pid, signal.SIGCONT)
        stopped = False
        s.close()
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGINT, previous)
        if stopped:
            os.kill(d.pid, signal.SIGCONT)
        d.stop()
