"""End to end: ``python -m kvdex.eval`` on tiny random-weight models saved to a folder (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvdex.eval import report  # noqa: E402
from kvdex.eval.__main__ import main  # noqa: E402
from kvdex.eval.methods import hf_available  # noqa: E402
from test_eval_tasks import byte_tokenizer, haystack_text  # noqa: E402

CONTEXT = 1200
COMMON = ["--context", str(CONTEXT), "--tasks", "passkey,copy", "--samples", "2", "--sinks", "16", "--window",
          "64", "--max-new-tokens", "6", "--threads", "1"]


def _tiny(kind: str):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # A large init makes the logits peaked, so float rounding cannot flip a greedy token.
    shared = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, initializer_range=0.3)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **shared))
    # Gemma-3: sliding-window layers (stock) around one global layer (the only one selected from).
    cfg = Gemma3TextConfig(num_hidden_layers=3, sliding_window=64, query_pre_attn_scalar=16,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"], **shared)
    return Gemma3ForCausalLM(cfg)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model_dir(request, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp(request.param)
    _tiny(request.param).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def haystack(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("hay") / "hay.txt"
    p.write_text(haystack_text(600))
    return p


def _run(capsys, tmp_path: Path, model_dir: Path, haystack: Path, *extra: str):
    samples = tmp_path / "samples.jsonl"
    plot = tmp_path / "plot.png"
    assert main(["--model", str(model_dir), "--haystack", str(haystack), *COMMON, "--json",
                 "--samples-out", str(samples), "--plot", str(plot), *extra]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    outcomes = [json.loads(line) for line in samples.read_text().splitlines()]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    return rows, outcomes


def _texts(outcomes, method):
    return [(o["task"], o["index"], o["text"]) for o in outcomes if o["method"] == method]


def test_oracle_at_fraction_one_equals_full(capsys, tmp_path, model_dir, haystack):
    rows, outcomes = _run(capsys, tmp_path, model_dir, haystack, "--methods", "full,oracle,streaming",
                          "--budget", "1.0")
    assert [(r["task"], r["method"]) for r in rows] == [(t, m) for t in ("passkey", "copy")
                                                        for m in ("full", "oracle", "streaming")]
    for r in rows:
        assert set(report.FIELDS) <= set(r)
        assert r["samples"] == 2 and abs(r["context"] - CONTEXT) <= 16
        assert r["attended_fraction"] == pytest.approx(1.0)
        assert r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0 and r["index_ready_s"] is None
    assert all(o["decode_tokens"] >= 1 for o in outcomes)
    assert _texts(outcomes, "oracle") == _texts(outcomes, "full")
    assert _texts(outcomes, "streaming") == _texts(outcomes, "full")


def test_a_smaller_budget_attends_that_fraction(capsys, tmp_path, model_dir, haystack):
    rows, outcomes = _run(capsys, tmp_path, model_dir, haystack, "--methods", "full,oracle,streaming",
                          "--budget", "0.15")
    for r in rows:
        want = 1.0 if r["method"] == "full" else 0.15
        assert r["attended_fraction"] == pytest.approx(want, abs=0.01), r
        # full_solved is the same on every row of a task, and full solves all it solves.
        assert r["full_solved"] == next(x["full_solved"] for x in rows if x["task"] == r["task"])
        if r["method"] == "full" and r["full_solved"]:
            assert r["solved_of_full"] == 1.0


def test_kvdex_methods(capsys, tmp_path, model_dir, haystack, kvdex_bin, monkeypatch):
    why = hf_available()
    if why:
        pytest.skip(why)
    monkeypatch.setenv("KVDEX_BIN", kvdex_bin)
    rows, outcomes = _run(capsys, tmp_path, model_dir, haystack, "--methods", "full,kvdex,kvdex-flat,oracle",
                          "--k", "100000")
    for r in rows:
        # A budget over every token attends the whole context.
        assert r["attended_fraction"] == pytest.approx(1.0, abs=1e-6), r
        if r["method"].startswith("kvdex"):
            assert r["index_ready_s"] is not None and r["index_ready_s"] >= 0
    assert _texts(outcomes, "oracle") == _texts(outcomes, "full")
    assert _texts(outcomes, "kvdex-flat") == _texts(outcomes, "full")
    assert _texts(outcomes, "kvdex") == _texts(outcomes, "full")
