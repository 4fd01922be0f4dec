"""The decode path through the daemon: seal, retrieve and attend, against numpy.

The daemon's static tokens are its decode configuration's: 128 sinks and a 512-token window
(``kvdex::store::DecodeConfig::default``); it retrieves from ``[128, len - 512)``.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvdex

SINKS, WINDOW = 128, 512
H, KV, D, N = 4, 2, 16, 1000
SCALE = 1.0 / np.sqrt(D)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    k = rng.standard_normal((KV, N, D)).astype(np.float32)
    v = rng.standard_normal((KV, N, D)).astype(np.float32)
    q = (2.0 * rng.standard_normal((H, D))).astype(np.float32)
    return k, v, q


@pytest.fixture(params=["daemon", "inproc"])
def session(request, data):
    k, v, _ = data
    if request.param == "daemon":
        s = kvdex.connect(request.getfixturevalue("daemon").url).create_session(
            layers=2, q_heads=H, kv_heads=KV, head_dim=D, dtype="f32")
        server = None
    else:
        server = kvdex._native.InProcessServer(layers=2, q_heads=H, kv_heads=KV, head_dim=D, dtype="f32")
        s = kvdex.attach(server.shm_path, server.token)
    s.append(0, k, v)
    yield s
    s.close()
    if server is not None:
        server.stop()


def full_attention(q, k, v):
    kr, vr = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
    return kvdex.partial_attention(q, kr, vr, SCALE)


def static_part(q, k, v):
    idx = np.r_[0:SINKS, N - WINDOW:N]
    return full_attention(q, k[:, idx], v[:, idx])


def test_budget_covering_everything_gives_full_attention(session, data) -> None:
    k, v, q = data
    out_s, lse_s = static_part(q, k, v)
    out_r, lse_r, chosen = session.attend(0, q, N - SINKS - WINDOW, scale=SCALE)
    assert chosen.tolist() == [N - SINKS - WINDOW] * H
    out, lse = kvdex.merge(out_s, lse_s, out_r, lse_r)
    ref_out, ref_lse = full_attention(q, k, v)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-4)


def test_retrieve_ids_scores_rows_match_numpy(session, data) -> None:
    k, v, q = data
    r = session.retrieve(0, q, 20, gather=True)
    assert r.ids.shape == (H, 20) and r.k.tolist() == [20] * H
    assert r.rows is not None and r.rows.shape == (H, 2, 20, D)
    for h in range(H):
        g = h // (H // KV)
        s = k[g, SINKS:N - WINDOW] @ q[h]
        want = np.argsort(-s)[:20] + SINKS
        np.testing.assert_array_equal(np.sort(r.ids[h]), np.sort(want))
        np.testing.assert_allclose(r.scores[h], k[g, r.ids[h]] @ q[h], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(r.rows[h, 0], k[g, r.ids[h]])
        np.testing.assert_array_equal(r.rows[h, 1], v[g, r.ids[h]])
    # the partial attention is over exactly those rows
    kr = np.stack([k[h // 2, r.ids[h]] for h in range(H)])
    vr = np.stack([v[h // 2, r.ids[h]] for h in range(H)])
    out, lse = kvdex.partial_attention(q, kr, vr, SCALE)
    np.testing.assert_allclose(r.out, out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.lse, lse, rtol=1e-5, atol=1e-4)


def sealed_session(client: kvdex.Client, data, kind: str) -> kvdex.Session:
    """900 tokens sealed into a ``kind`` index (built), then 100 more appended after the seal."""
    k, v, _ = data
    s = client.create_session(layers=1, q_heads=H, kv_heads=KV, head_dim=D, dtype="f32")
    s.append(0, k[:, :900], v[:, :900])
    pos = np.arange(0, 900, 9, dtype=np.uint32)
    train = np.random.default_rng(1).standard_normal((H, len(pos), D)).astype(np.float32)
    assert s.seal(0, kind, train, pos) > 0
    layers = client.wait_index(s, timeout=120)
    assert layers[0]["build"]["state"] == "ready" and layers[0]["build"]["kind"] == kind
    s.append(0, k[:, 900:], v[:, 900:])  # inserted incrementally (or scanned until then)
    return s


@pytest.mark.parametrize("kind", ["graph", "hnsw", "flat"])
def test_sealed_index_with_full_budget_gives_full_attention(daemon, data, kind) -> None:
    k, v, q = data
    client = kvdex.connect(daemon.url)
    with sealed_session(client, data, kind) as s:
        out_s, lse_s = static_part(q, k, v)
        out_r, lse_r, chosen = s.attend(0, q, N - SINKS - WINDOW)
        assert chosen.tolist() == [N - SINKS - WINDOW] * H
        out, _ = kvdex.merge(out_s, lse_s, out_r, lse_r)
        np.testing.assert_allclose(out, full_attention(q, k, v)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["graph", "hnsw", "flat"])
def test_sealed_index_adaptive_budget(daemon, data, kind) -> None:
    _, _, q = data
    client = kvdex.connect(daemon.url)
    with sealed_session(client, data, kind) as s:
        r = s.retrieve(0, q, coverage=0.9, max_k=64)
        assert (r.k >= 1).all() and (r.k <= 64).all() and r.ids.shape == (H, 64)
        assert ((r.coverage > 0) & (r.coverage <= 1.0 + 1e-5)).all()
        assert (np.diff(r.scores, axis=1) <= 1e-6).all()  # best first


def test_static_only_context_is_an_empty_part(daemon) -> None:
    with kvdex.connect(daemon.url).create_session(layers=1, q_heads=H, kv_heads=KV, head_dim=D, dtype="f32") as s:
        x = np.ones((KV, 100, D), np.float32)
        s.append(0, x, x)
        out, lse, chosen = s.attend(0, np.ones((H, D), np.float32), 10)
        assert chosen.tolist() == [0] * H and np.isneginf(lse).all()


def test_bad_input_is_a_clear_exception(session, data) -> None:
    _, _, q = data
    with pytest.raises(kvdex.BadRequestError, match="budget"):
        session.retrieve(0, q)  # no budget
    with pytest.raises(kvdex.BadRequestError, match="k = 0"):
        session.attend(0, q, 0)
    with pytest.raises(kvdex.BadRequestError, match="min_k"):
        session.retrieve(0, q, coverage=0.9, min_k=10, max_k=5)
    with pytest.raises(kvdex.BadRequestError, match="coverage"):
        session.retrieve(0, q, coverage=1.5, max_k=5)
    with pytest.raises(kvdex.BadRequestError, match="q_heads, head_dim"):
        session.attend(0, q[:, :3], 5)
    bad = q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(kvdex.BadRequestError, match="nan|NaN"):
        session.attend(0, bad, 5)
    with pytest.raises(kvdex.BadRequestError, match="scale"):
        session.attend(0, q, 5, scale=-1.0)
    with pytest.raises(kvdex.KvdexError, match="layer"):
        session.attend(7, q, 5)
    with pytest.raises(kvdex.BadRequestError, match="kind"):
        session.seal(0, "btree")
    with pytest.raises(kvdex.BadRequestError, match="both"):
        session.seal(0, "graph", np.zeros((H, 3, D), np.float32))
    with pytest.raises(kvdex.BadRequestError, match="queries"):
        session.seal(0, "graph", np.zeros((H, 3, D + 1), np.float32), np.arange(3))
    session.close()
    with pytest.raises(kvdex.DisconnectedError):
        session.attend(0, q, 5)
