"""The binding's numpy conversions and error mapping, through the in-process LocalSession."""

from __future__ import annotations

import numpy as np
import pytest

import kvdex


def make(dtype: str = "f16", layers: int = 2, q_heads: int = 4, kv_heads: int = 2, head_dim: int = 8):
    return kvdex.LocalSession(layers, q_heads, kv_heads, head_dim, dtype)


def test_append_search_gather_match_numpy() -> None:
    rng = np.random.default_rng(0)
    s = make("f32")
    k = rng.standard_normal((2, 50, 8), dtype=np.float32)
    v = rng.standard_normal((2, 50, 8), dtype=np.float32)
    assert s.append(1, k, v) == 50
    assert s.len(1) == 50 and s.len(0) == 0
    q = rng.standard_normal((4, 8), dtype=np.float32)
    ids, scores = s.search(1, q, 5)
    assert ids.shape == (4, 5) and ids.dtype == np.uint32 and scores.dtype == np.float32
    for h in range(4):
        exact = k[h // 2] @ q[h]
        want = np.argsort(-exact)[:5]
        np.testing.assert_array_equal(ids[h], want)
        np.testing.assert_allclose(scores[h], exact[want], rtol=1e-5)
    gk, gv = s.gather(1, 1, [3, 0, 49])
    np.testing.assert_array_equal(gk, k[1, [3, 0, 49]])
    np.testing.assert_array_equal(gv, v[1, [3, 0, 49]])
    assert s.resident_bytes() == 2 * 2 * 50 * 8 * 4


def test_f32_input_is_converted_to_an_f16_session() -> None:
    s = make("f16")
    k = np.linspace(-1, 1, 2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    s.append(0, k, k)
    gk, _ = s.gather(0, 0, [0, 1, 2])
    assert gk.dtype == np.float16
    np.testing.assert_array_equal(gk, k[0].astype(np.float16))


def test_search_clamps_k_to_the_stored_tokens() -> None:
    s = make("f16")
    s.append(0, np.ones((2, 3, 8), np.float16), np.ones((2, 3, 8), np.float16))
    ids, _ = s.search(0, np.ones((4, 8), np.float32), 10)
    assert ids.shape == (4, 3)


def test_wrong_dtype_is_a_clear_error() -> None:
    s = make()
    with pytest.raises(kvdex.BadRequestError, match="k must be a float16 or float32 numpy array, got float64"):
        s.append(0, np.zeros((2, 1, 8)), np.zeros((2, 1, 8)))
    with pytest.raises(kvdex.BadRequestError, match="float16 or float32"):
        s.append(0, [[1.0]], [[1.0]])


def test_wrong_shape_names_the_expected_layout() -> None:
    s = make()
    with pytest.raises(ValueError, match=r"v has shape \[2, 4, 7\], expected \[2, 4, 8\]"):
        s.append(0, np.zeros((2, 4, 8), np.float16), np.zeros((2, 4, 7), np.float16))
    with pytest.raises(kvdex.BadRequestError, match=r"q has shape \[3, 8\]"):
        s.search(0, np.zeros((3, 8), np.float32), 1)


def test_unknown_layer_and_bad_ids() -> None:
    s = make()
    with pytest.raises(kvdex.NotFoundError, match="layer 7"):
        s.len(7)
    s.append(0, np.zeros((2, 2, 8), np.float16), np.zeros((2, 2, 8), np.float16))
    with pytest.raises(kvdex.BadRequestError, match="token id 5 out of range"):
        s.gather(0, 0, [1, 5])
    with pytest.raises(kvdex.BadRequestError, match="kv_head 2 out of range"):
        s.gather(0, 2, [0])


def test_bad_shape_and_dtype_at_creation() -> None:
    with pytest.raises(kvdex.BadRequestError, match="not a multiple"):
        kvdex.LocalSession(1, 3, 2, 8, "f16")
    with pytest.raises(kvdex.BadRequestError, match="unknown dtype"):
        kvdex.LocalSession(1, 2, 2, 8, "int8")


def test_non_contiguous_input_is_rejected() -> None:
    s = make()
    k = np.zeros((2, 8, 4), np.float16).transpose(0, 2, 1)
    with pytest.raises(kvdex.BadRequestError, match="C-contiguous"):
        s.append(0, k, k)
