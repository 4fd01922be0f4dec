"""A seal whose training queries do not fit the session's payload arena: the client sends them
in parts (through the Rust client), and the layer builds the index one request would have."""

from __future__ import annotations

import numpy as np
import pytest

import kvdex

H, KV, D, N = 4, 2, 16, 2000
TRAIN = 1000           # 1000 positions x (4 heads x 16 floats + 1) x 4 bytes = 260 KB
SMALL = 64 * 1024      # the smallest arena a session may have
CAP = 1500             # the daemon's decode.seal_max_staged_queries here


@pytest.fixture(scope="module")
def capped_daemon(kvdex_bin: str):
    # A beam of 16: layers over 8 L = 128 tokens are searched through the graph, not scanned,
    # so the answers depend on the training set.
    env = {"KVDEX_DECODE__SEAL_MAX_STAGED_QUERIES": str(CAP), "KVDEX_DECODE__GRAPH_SEARCH_LIST": "16"}
    with kvdex.Daemon(binary=kvdex_bin, env=env) as d:
        yield d


def filled(client: kvdex.Client, payload_bytes: int, k, v) -> kvdex.Session:
    s = client.create_session(layers=1, q_heads=H, kv_heads=KV, head_dim=D, dtype="f32",
                              payload_bytes=payload_bytes)
    for b in range(0, N, 200):  # appends that fit the small arena
        s.append(0, k[:, b:b + 200], v[:, b:b + 200])
    return s


def test_training_larger_than_the_arena_builds_the_same_index(capped_daemon) -> None:
    rng = np.random.default_rng(3)
    k = rng.standard_normal((KV, N, D)).astype(np.float32)
    v = rng.standard_normal((KV, N, D)).astype(np.float32)
    train = rng.standard_normal((H, TRAIN, D)).astype(np.float32)
    pos = np.arange(0, 2 * TRAIN, 2, dtype=np.uint32)
    assert train.nbytes > SMALL
    client = kvdex.connect(capped_daemon.url)
    with filled(client, 16 << 20, k, v) as big, filled(client, SMALL, k, v) as small:
        assert big.seal(0, "graph", train, pos) == N - 128 - 512
        assert small.seal(0, "graph", train, pos) == N - 128 - 512
        for s in (big, small):
            layers = client.wait_index(s, timeout=120)
            assert layers[0]["build"]["state"] == "ready" and layers[0]["staged_queries"] == 0
        for i in range(8):
            q = rng.standard_normal((H, D)).astype(np.float32) * 2
            a, b = big.retrieve(0, q, 16), small.retrieve(0, q, 16)
            np.testing.assert_array_equal(a.ids, b.ids)
        # More positions than the daemon stages: refused by name, and the session still serves.
        many = rng.standard_normal((H, 2 * CAP, D)).astype(np.float32)
        with pytest.raises(kvdex.BadRequestError, match="seal_max_staged_queries allows 1500"):
            small.seal(0, "graph", many, np.arange(2 * CAP, dtype=np.uint32))
        assert client.index_status(small)[0]["staged_queries"] == 0
        assert small.retrieve(0, q, 16).k.tolist() == [16] * H
