"""Static tokens of a session's own (``create_session(..., sinks=, window=)``) through the
Python client and a real daemon, whose ``[decode]`` values stay 128 and 512."""

from __future__ import annotations

import numpy as np
import pytest

import kvdex

SINKS, WINDOW = 4, 16  # the session's own, as a StreamingLLM-tuned engine keeps
H, KV, D, N = 4, 2, 16, 300
SCALE = 1.0 / np.sqrt(D)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    k = rng.standard_normal((KV, N, D)).astype(np.float32)
    v = rng.standard_normal((KV, N, D)).astype(np.float32)
    q = (2.0 * rng.standard_normal((H, D))).astype(np.float32)
    return k, v, q


def attention(q, k, v, idx):
    """Exact attention of every query head over tokens ``idx`` of its KV head."""
    return kvdex.partial_attention(q, np.repeat(k[:, idx], H // KV, 0), np.repeat(v[:, idx], H // KV, 0), SCALE)


def test_own_sinks_and_window_are_kept_and_the_merge_is_exact(daemon, data) -> None:
    k, v, q = data
    client = kvdex.connect(daemon.url)
    with client.create_session(1, H, KV, D, dtype="f32", sinks=SINKS, window=WINDOW) as own, \
            client.create_session(1, H, KV, D, dtype="f32") as plain:
        listed = {s["id"]: (s["sinks"], s["window"]) for s in client.stats()["per_session"]}
        assert listed[own.id] == (SINKS, WINDOW) and listed[plain.id] == (128, 512)
        own.append(0, k, v)
        plain.append(0, k, v)
        # The daemon's values leave nothing to retrieve from 300 tokens; the session's own do.
        assert plain.retrieve(0, q, 10).k.tolist() == [0] * H
        r = own.retrieve(0, q, N, gather=True)
        assert r.k.tolist() == [N - SINKS - WINDOW] * H
        for h in range(H):
            np.testing.assert_array_equal(np.sort(r.ids[h]), np.arange(SINKS, N - WINDOW))
        # Engine part over the session's static tokens, merged with kvdex's: full attention.
        out_s, lse_s = attention(q, k, v, np.r_[0:SINKS, N - WINDOW:N])
        out, lse = kvdex.merge(out_s, lse_s, r.out, r.lse)
        ref_out, ref_lse = attention(q, k, v, np.arange(N))
        np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-4)
        # Sealed over the session's range; decode tokens leaving its window stay retrievable.
        assert own.seal(0, "flat") == N - SINKS - WINDOW
        client.wait_index(own, timeout=60)
        rng = np.random.default_rng(2)
        for step in range(1, 21):
            x = rng.standard_normal((KV, 1, D)).astype(np.float32)
            assert own.append(0, x, x) == N + step
            ids = own.retrieve(0, q, N + step, attend=False).ids
            assert ids.shape == (H, N + step - SINKS - WINDOW)
            assert ((ids >= SINKS) & (ids < N + step - WINDOW)).all()


def test_bad_static_tokens_raise_naming_the_field(daemon) -> None:
    client = kvdex.connect(daemon.url)
    for kwargs, field in [({"sinks": 2**24 + 1}, "sinks"), ({"window": 2**40}, "window"),
                          ({"sinks": -1}, "sinks"), ({"window": "16"}, "window"), ({"sinks": 2.0}, "sinks")]:
        with pytest.raises(kvdex.BadRequestError, match=field):
            client.create_session(1, H, KV, D, dtype="f32", **kwargs)
    assert client.stats()["sessions"] == 0
