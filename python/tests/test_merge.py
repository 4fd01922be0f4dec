"""The exact LSE merge against attention over the union."""

from __future__ import annotations

import numpy as np
import pytest

import kvdex


def test_merge_of_two_parts_equals_attention_over_the_union() -> None:
    rng = np.random.default_rng(1)
    h, d, n = 3, 16, 40
    q = rng.standard_normal((h, d)).astype(np.float32)
    k = rng.standard_normal((h, n, d)).astype(np.float32) * 2
    v = rng.standard_normal((h, n, d)).astype(np.float32)
    full, full_lse = kvdex.partial_attention(q, k, v, 0.25)
    split = rng.permutation(n)
    a, b = split[:13], split[13:]
    oa, la = kvdex.partial_attention(q, k[:, a], v[:, a], 0.25)
    ob, lb = kvdex.partial_attention(q, k[:, b], v[:, b], 0.25)
    out, lse = kvdex.merge(oa, la, ob, lb)
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, full_lse, rtol=1e-6)


def test_empty_part_is_neutral() -> None:
    o = np.arange(6, dtype=np.float32).reshape(2, 3)
    lse = np.array([0.5, -2.0], np.float32)
    e_out, e_lse = kvdex.partial_attention(np.zeros((2, 3), np.float32), np.zeros((2, 0, 3)), np.zeros((2, 0, 3)), 1.0)
    assert np.all(np.isneginf(e_lse))
    out, merged = kvdex.merge(o, lse, e_out, e_lse)
    np.testing.assert_array_equal(out, o)
    np.testing.assert_array_equal(merged, lse)


def test_shape_mismatch_is_a_clear_error() -> None:
    z = np.zeros((2, 4), np.float32)
    with pytest.raises(kvdex.BadRequestError, match="shapes differ"):
        kvdex.merge(z, np.zeros(2, np.float32), np.zeros((3, 4), np.float32), np.zeros(3, np.float32))
