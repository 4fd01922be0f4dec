"""The engine API through the daemon: several query positions in one retrieve, asynchronous
retrieves, bf16 input, truncate and fork, each against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

import kvdex

H, KV, D, N = 4, 2, 16, 300
SINKS, WINDOW = 4, 8
SCALE = 1.0 / np.sqrt(D)


@pytest.fixture(scope="module")
def client(daemon):
    return kvdex.connect(daemon.url)


def make(client, dtype="f32", layers=2):
    return client.create_session(layers=layers, q_heads=H, kv_heads=KV, head_dim=D, dtype=dtype,
                                 sinks=SINKS, window=WINDOW)


def rows(seed, n=N):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((KV, n, D)).astype(np.float32),
            rng.standard_normal((KV, n, D)).astype(np.float32))


def exact(q, k, v, lo, hi):
    """Attention of q [H, D] over tokens lo..hi of k, v [KV, n, D]: (out [H, D], lse [H])."""
    out, lse = np.zeros((H, D)), np.full(H, -np.inf)
    for h in range(H):
        g = h // (H // KV)
        s = k[g, lo:hi] @ q[h] * SCALE
        if s.size == 0:
            continue
        m = s.max()
        w = np.exp(s - m)
        out[h] = w @ v[g, lo:hi] / w.sum()
        lse[h] = m + np.log(w.sum())
    return out, lse


def test_a_multi_position_attend_equals_one_attend_per_position_and_numpy(client):
    k, v = rows(1)
    q = np.random.default_rng(2).standard_normal((5, H, D)).astype(np.float32)
    limits = [None, 150, N - 20, N - 2, 3]
    with make(client) as s:
        s.append(0, k, v)
        r = s.retrieve(0, q, k=N, limits=limits)
        assert r.out.shape == (5, H, D) and r.lse.shape == (5, H) and r.k.shape == (5, H)
        assert r.ids.shape[:2] == (5, H)
        for p, lim in enumerate(limits):
            one = s.retrieve(0, q[p:p + 1], k=N, limits=[lim])
            np.testing.assert_array_equal(r.out[p], one.out[0])
            np.testing.assert_array_equal(r.lse[p], one.lse[0])
            end = min(N if lim is None else lim, N - WINDOW)
            want_out, want_lse = exact(q[p], k, v, SINKS, end)
            assert (r.k[p] == max(end - SINKS, 0)).all()
            np.testing.assert_allclose(r.lse[p], want_lse, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(r.out[p], want_out, rtol=1e-4, atol=1e-5)
            for h in range(H):
                assert (r.ids[p, h, :r.k[p, h]] < max(end, SINKS)).all()
        # The unlimited position equals the single-position call.
        plain = s.retrieve(0, q[0], k=N)
        np.testing.assert_array_equal(plain.out, r.out[0])


def test_bad_positions_and_limits_are_refused_by_name(client):
    k, v = rows(3, 50)
    with make(client) as s:
        s.append(0, k, v)
        with pytest.raises(kvdex.BadRequestError, match="P = 0"):
            s.retrieve(0, np.zeros((0, H, D), np.float32), k=4)
        with pytest.raises(kvdex.BadRequestError, match=r"limits\[1\] = 51 is beyond"):
            s.retrieve(0, np.ones((2, H, D), np.float32), k=4, limits=[10, 51])
        with pytest.raises(kvdex.BadRequestError, match="limits has 1 entries"):
            s.retrieve(0, np.ones((2, H, D), np.float32), k=4, limits=[10])
        with pytest.raises(kvdex.BadRequestError, match="limits need q shaped"):
            s.retrieve(0, np.ones((H, D), np.float32), k=4, limits=[10])
        assert s.retrieve(0, np.ones((H, D), np.float32), k=4).k.shape == (H,)


def test_async_retrieves_equal_sync_ones_and_overlap_other_calls(client):
    k, v = rows(4)
    rng = np.random.default_rng(5)
    q0 = rng.standard_normal((H, D)).astype(np.float32)
    q1 = rng.standard_normal((3, H, D)).astype(np.float32)
    with make(client) as s:
        s.append(0, k, v)
        s.append(1, v, k)
        want0 = s.retrieve(0, q0, k=16, gather=True)
        want1 = s.retrieve(1, q1, k=16, limits=[100, None, 250])
        a = s.retrieve_async(0, q0, k=16, gather=True)
        b = s.retrieve_async(1, q1, k=16, limits=[100, None, 250])
        assert s.ping(b"meanwhile") == b"meanwhile"
        s.retrieve(0, -q0, k=16)  # a waiting call while two are in flight
        got1 = b.wait()
        while not a.done():
            pass
        got0 = a.wait()
        assert a.wait() is got0, "a second wait returns the same results"
        for got, want in ((got0, want0), (got1, want1)):
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_array_equal(got.out, want.out)
            np.testing.assert_array_equal(got.lse, want.lse)
        for h in range(H):
            n = got0.k[h]
            np.testing.assert_array_equal(got0.rows[h, :, :n], want0.rows[h, :, :n])
        # The daemon's refusal comes back from wait().
        bad = s.retrieve_async(7, q0, k=4)
        with pytest.raises(kvdex.NotFoundError, match="layer 7"):
            bad.wait()


def test_bf16_round_trips_from_numpy_bits_and_converts_into_other_dtypes(client):
    k, v = rows(6, 64)
    kb, vb = kvdex.float32_to_bf16(k), kvdex.float32_to_bf16(v)
    assert kb.dtype == np.uint16
    kf = kvdex.bf16_to_float32(kb)
    assert np.abs(kf - k).max() <= np.abs(k).max() * 2.0**-8
    ids = list(range(64))
    with make(client, "bf16") as s:
        s.append(0, kb, vb, dtype="bf16")
        gk, gv = s.gather(0, 1, ids)
        assert gk.dtype == np.uint16, "bf16 rows come back unconverted"
        np.testing.assert_array_equal(gk, kb[1])
        np.testing.assert_array_equal(gv, vb[1])
        # bf16 queries: the same answer as their float32 values.
        q = kvdex.float32_to_bf16(np.random.default_rng(7).standard_normal((H, D)))
        a = s.retrieve(0, q, k=8, dtype="bf16")
        b = s.retrieve(0, kvdex.bf16_to_float32(q), k=8)
        np.testing.assert_array_equal(a.out, b.out)
        with pytest.raises(kvdex.BadRequestError, match='dtype="bf16"'):
            s.append(0, kb, vb)
    for dtype, np_dtype in (("f32", np.float32), ("f16", np.float16)):
        with make(client, dtype) as s:
            s.append(0, kb, vb, dtype="bf16")
            gk, _ = s.gather(0, 0, ids)
            np.testing.assert_array_equal(gk, kf[0].astype(np_dtype))


def test_bf16_from_torch_tensors():
    torch = pytest.importorskip("torch")
    k = torch.randn(KV, 16, D, dtype=torch.bfloat16)
    a = kvdex.client.as_numpy(k, "k")
    assert a.dtype == np.uint16
    np.testing.assert_array_equal(kvdex.bf16_to_float32(a), k.float().numpy())
    np.testing.assert_array_equal(kvdex.float32_to_bf16(k.float().numpy()), a)


def test_bf16_torch_append_and_query(client):
    torch = pytest.importorskip("torch")
    k, v = (torch.randn(KV, 64, D, dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(H, D, dtype=torch.bfloat16)
    with make(client, "bf16") as s:
        s.append(0, k, v)
        gk, _ = s.gather(0, 0, list(range(64)))
        np.testing.assert_array_equal(kvdex.bf16_to_float32(gk), k[0].float().numpy())
        a = s.retrieve(0, q, k=8)
        b = s.retrieve(0, q.float().numpy(), k=8)
        np.testing.assert_array_equal(a.out, b.out)


def test_truncate_then_append_equals_a_fresh_session_with_the_same_rows(client):
    k, v = rows(8, 200)
    k2, v2 = rows(9, 30)
    q = np.random.default_rng(10).standard_normal((H, D)).astype(np.float32)
    with make(client) as s, make(client) as fresh:
        s.append(0, k, v)
        s.append(1, k, v)
        assert s.truncate(120) >= 0
        s.append(0, k2, v2)
        fresh.append(0, k[:, :120], v[:, :120])
        fresh.append(0, k2, v2)
        a, b = s.retrieve(0, q, k=1000), fresh.retrieve(0, q, k=1000)
        np.testing.assert_array_equal(a.out, b.out)
        np.testing.assert_array_equal(a.k, b.k)
        ga, _ = s.gather(0, 1, list(range(150)))
        np.testing.assert_array_equal(ga, np.concatenate([k[1, :120], k2[1]]))
        with pytest.raises(kvdex.BadRequestError, match="tokens = 151 is beyond"):
            s.truncate(151)


def test_a_fork_diverges_and_leaves_its_source_untouched(client):
    k, v = rows(11, 100)
    q = np.random.default_rng(12).standard_normal((H, D)).astype(np.float32)
    with make(client) as s:
        s.append(0, k, v)
        want = s.retrieve(0, q, k=1000)
        with s.fork() as f:
            assert f.id != s.id
            np.testing.assert_array_equal(f.retrieve(0, q, k=1000).out, want.out)
            f.truncate(50)
            f.append(0, *rows(13, 10))
            assert f.retrieve(0, q, k=1000).k[0] == 60 - SINKS - WINDOW
        got = s.retrieve(0, q, k=1000)
        np.testing.assert_array_equal(got.out, want.out)
        np.testing.assert_array_equal(s.gather(0, 0, [99])[0], k[0, 99:100])
    with pytest.raises(kvdex.KvdexError):
        s.fork()  # closed
