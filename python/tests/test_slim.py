"""Slim mode and neighbour-list seals through the Python client and a real daemon."""

from __future__ import annotations

import numpy as np
import pytest

import kvdex

SINKS, WINDOW = 128, 512
H, D, N = 2, 16, 1000


def slim_data():
    rng = np.random.default_rng(3)
    k = rng.standard_normal((H, N, D)).astype(np.float32)
    w = (0.3 * rng.standard_normal((H * D, H * D))).astype(np.float32)
    # V = K @ W_KV with K concatenated across heads: [N, H*D] @ [H*D, H*D] -> per head columns.
    kc = np.transpose(k, (1, 0, 2)).reshape(N, H * D).astype(np.float64)
    v = (kc @ w.astype(np.float64)).reshape(N, H, D).transpose(1, 0, 2).astype(np.float32)
    q = (2.0 * rng.standard_normal((H, D))).astype(np.float32)
    return k, v, w, q


def test_slim_equals_stored_v_and_reports_savings(daemon) -> None:
    k, v, w, q = slim_data()
    client = kvdex.connect(daemon.url)
    with client.create_session(1, H, H, D, dtype="f32") as full, \
            client.create_session(1, H, H, D, dtype="f32", slim=True) as slim:
        full.append(0, k, v)
        with pytest.raises(kvdex.BadRequestError, match="no W_KV"):
            slim.append(0, k)
        slim.set_wkv(0, w)
        slim.append(0, k)
        a = full.retrieve(0, q, 64, gather=True)
        b = slim.retrieve(0, q, 64, gather=True)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(b.out, a.out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.rows, a.rows, rtol=1e-5, atol=1e-6)
        stats = next(s for s in client.stats()["per_session"] if s["id"] == slim.id)
        assert stats["slim"]["v_bytes_saved"] == N * H * D * 4
    with pytest.raises(kvdex.BadRequestError, match="MHA"):
        client.create_session(1, 4, 2, D, dtype="f32", slim=True)


def test_seal_with_neighbour_lists(daemon) -> None:
    rng = np.random.default_rng(5)
    k = rng.standard_normal((H, N, D)).astype(np.float32)
    client = kvdex.connect(daemon.url)
    with client.create_session(1, H, H, D, dtype="f32") as s:
        s.append(0, k, k)
        # The engine's top-16 keys of 50 prefill queries per head: [q_heads, n, m].
        qs = rng.standard_normal((H, 50, D)).astype(np.float32)
        top = np.argsort(-np.einsum("hnd,htd->hnt", qs, k), axis=2)[:, :, :16]
        assert s.seal(0, "graph", neighbours=top) == N - SINKS - WINDOW
        layers = client.wait_index(s, timeout=120)
        assert layers[0]["build"]["state"] == "ready"
        r = s.retrieve(0, qs[:, 0], 8)
        assert r.ids.shape == (H, 8)
        with pytest.raises(kvdex.BadRequestError, match="query head 7"):
            s.seal(0, "graph", neighbours=[(7, [200, 201])])


def test_v_for_a_slim_session_or_none_for_a_full_one_is_refused(daemon) -> None:
    """The daemon dropped a Slim session's v without a word; a full session missing v got a
    byte count ("needs N bytes each of K and V, got N and 0")."""
    k, _, w, _ = slim_data()
    client = kvdex.connect(daemon.url)
    with client.create_session(1, H, H, D, dtype="f32", slim=True) as slim, \
            client.create_session(1, H, H, D, dtype="f32") as full:
        assert slim.slim is True and full.slim is False
        slim.set_wkv(0, w)
        with pytest.raises(kvdex.BadRequestError, match="Slim session, which stores K alone"):
            slim.append(0, k, k)
        with pytest.raises(kvdex.BadRequestError, match="v is missing"):
            full.append(0, k)
        with pytest.raises(kvdex.BadRequestError, match=r"w_kv has shape \[1024\], expected 2 dimensions"):
            slim.set_wkv(0, w.reshape(-1))
        assert slim.append(0, k) == N
