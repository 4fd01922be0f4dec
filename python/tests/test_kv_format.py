"""Int8 storage (``create_session(..., kv_format="int8")``) through the Python client and a real
daemon: the full-context merge stays within int8's rounding of full attention, the session holds
about half of f16's bytes, and a bad ``kv_format`` is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

import kvdex

SINKS, WINDOW = 4, 16
H, KV, D, N = 4, 2, 64, 300
SCALE = 1.0 / np.sqrt(D)


def attention(q, k, v, idx):
    """Exact attention of every query head over tokens ``idx`` of its KV head."""
    return kvdex.partial_attention(q, np.repeat(k[:, idx], H // KV, 0), np.repeat(v[:, idx], H // KV, 0), SCALE)


def test_int8_sessions_merge_to_full_attention_within_rounding(daemon) -> None:
    rng = np.random.default_rng(5)
    k = rng.standard_normal((KV, N, D)).astype(np.float16)
    v = rng.standard_normal((KV, N, D)).astype(np.float16)
    q = (2.0 * rng.standard_normal((H, D))).astype(np.float32)
    client = kvdex.connect(daemon.url)
    with client.create_session(1, H, KV, D, dtype="f16", sinks=SINKS, window=WINDOW, kv_format="int8") as s8, \
            client.create_session(1, H, KV, D, dtype="f16", sinks=SINKS, window=WINDOW) as s16:
        s8.append(0, k, v)
        s16.append(0, k, v)
        listed = {s["id"]: s for s in client.stats()["per_session"]}
        assert listed[s8.id]["kv_format"] == "int8" and listed[s16.id]["kv_format"] == "f16"
        assert listed[s8.id]["resident_bytes"] <= 0.53 * listed[s16.id]["resident_bytes"]
        r = s8.retrieve(0, q, N, gather=True)
        assert r.k.tolist() == [N - SINKS - WINDOW] * H
        kf, vf = k.astype(np.float32), v.astype(np.float32)
        out_s, lse_s = attention(q, kf, vf, np.r_[0:SINKS, N - WINDOW:N])
        out, lse = kvdex.merge(out_s, lse_s, r.out, r.lse)
        ref_out, ref_lse = attention(q, kf, vf, np.arange(N))
        # int8 with one scale per row: about 0.4% of the row's largest element per value.
        err = np.linalg.norm(out - ref_out, axis=-1) / np.linalg.norm(ref_out, axis=-1)
        assert err.max() < 0.02, err
        np.testing.assert_allclose(lse, ref_lse, atol=0.05)
        # Gathered rows come back in the session dtype, within half a step (plus f16 rounding)
        # of the appended ones: the step is the row's largest |element| / 127.
        assert r.rows.dtype == np.float16
        for h in range(H):
            ids = r.ids[h][: r.k[h]]
            for plane, src in ((0, kf), (1, vf)):
                want = src[h // (H // KV), ids]
                got = r.rows[h, plane, : r.k[h]].astype(np.float32)
                step = np.abs(want).max(-1, keepdims=True) / 127.0
                assert (np.abs(got - want) <= 0.5 * step * 1.01 + 1e-3 * np.abs(want)).all()

def test_a_bad_kv_format_is_refused_by_name(daemon) -> None:
    client = kvdex.connect(daemon.url)
    with pytest.raises(kvdex.BadRequestError, match="int4"):
        client.create_session(1, 2, 1, 8, dtype="f16", kv_format="int4")
