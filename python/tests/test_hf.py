"""kvdex.hf against stock transformers attention, on tiny random-weight models built from configs.

With a budget that covers every token (k larger than the context), decoding through kvdex must
reproduce sdpa attention: the same logits up to float32 rounding (1e-4) at every decode step,
and the same greedy tokens. The static set is small (4 sinks, 16 window) and the prompts are
~200 tokens, so most of the context is offloaded and comes back through the daemon.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvdex  # noqa: E402
import kvdex.hf  # noqa: E402
from kvdex.hf import KvdexCache  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

SINKS, WINDOW = 4, 16
ALL = 100_000  # a fixed budget above any context here: every retrievable token is attended
VOCAB = 128


def config(family: str, kv_heads: int = 2, layers: int = 2):
    """A tiny config of ``family``: hidden 64, 4 query heads of 16, ``kv_heads`` KV heads."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                  max_position_embeddings=2048, initializer_range=0.2)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**common, sliding_window=32, query_pre_attn_scalar=24,
                                             layer_types=["sliding_attention", "full_attention",
                                                          "sliding_attention", "full_attention"])
    raise ValueError(family)


def models(cfg, dtype=torch.float32):
    """``(kvdex model, stock sdpa model)`` with the same random weights."""
    torch.manual_seed(0)
    mine = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="kvdex").to(dtype).eval()
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").to(dtype).eval()
    ref.load_state_dict(mine.state_dict())
    return mine, ref


@pytest.fixture(scope="module")
def client(daemon):
    return kvdex.connect(daemon.url)


def prompt(n: int, seed: int = 1, batch: int = 1) -> "torch.Tensor":
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g)


@torch.no_grad()
def greedy(model, cache, ids: "torch.Tensor", steps: int):
    """Prefill ``ids``, then ``steps`` greedy steps; returns (per-step last logits, tokens)."""
    logits = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1].float()]
    tokens = []
    for _ in range(steps):
        t = logits[-1].argmax(-1, keepdim=True)
        tokens.append(t)
        logits.append(model(t, past_key_values=cache, use_cache=True).logits[:, -1].float())
    return logits, torch.cat(tokens, dim=1)


def assert_same_decode(mine, ref, cache, ids, steps=12, tol=1e-4):
    got, got_tokens = greedy(mine, cache, ids, steps)
    want, want_tokens = greedy(ref, DynamicCache(config=ref.config), ids, steps)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a - b).abs().max().item() < tol, f"step {i}: logits differ by {(a - b).abs().max().item()}"
    assert torch.equal(got_tokens, want_tokens)


@pytest.mark.parametrize("family,kv_heads,index", [
    ("llama", 2, "graph"), ("llama", 1, "graph"), ("qwen2", 2, "flat"), ("qwen3", 2, "graph"),
    ("mistral", 2, "hnsw"),
])
def test_full_budget_matches_stock_attention(client, family, kv_heads, index) -> None:
    mine, ref = models(config(family, kv_heads))
    with KvdexCache(mine, client, index=index, k=ALL, sinks=SINKS, window=WINDOW, dtype="f32") as cache:
        assert_same_decode(mine, ref, cache, prompt(200))
        stats = cache.stats()
        assert stats["decode_steps"] == 12
        assert stats["attended_fraction"] == pytest.approx(1.0)
        assert stats["index_ready_s"] is not None and stats["index_ready_s"] >= 0


def test_gemma3_global_layers_through_kvdex(client) -> None:
    cfg = config("gemma3", kv_heads=1, layers=4)
    mine, ref = models(cfg)
    with KvdexCache(mine, client, k=ALL, sinks=SINKS, window=WINDOW, dtype="f32") as cache:
        kinds = [type(layer).__name__ for layer in cache.layers]
        assert kinds == ["DynamicSlidingWindowLayer", "KvdexLayer"] * 2
        assert_same_decode(mine, ref, cache, prompt(200))
        assert len(cache.seq.sessions) == 1 and cache.seq.sessions[0].layers == 2


@pytest.mark.parametrize("dtype,session,tol", [
    (torch.float32, "f16", 2e-2), (torch.float16, None, 5e-2), (torch.bfloat16, None, 2e-1),
])
def test_low_precision(client, dtype, session, tol) -> None:
    mine, ref = models(config("llama"), dtype)
    with KvdexCache(mine, client, k=ALL, sinks=SINKS, window=WINDOW, dtype=session) as cache:
        got, _ = greedy(mine, cache, prompt(200), 6)
        assert cache.stats()["session_dtype"] == (session or {torch.bfloat16: "bf16"}.get(dtype, "f16"))
    want, _ = greedy(ref, DynamicCache(config=ref.config), prompt(200), 6)
    # The same first token; later steps may take other tokens at this precision, so only the
    # prefill's and the first decode step's logits are compared.
    for a, b in zip(got[:2], want[:2]):
        assert (a - b).abs().max().item() < tol


@torch.no_grad()
def test_second_prefill_after_decode(client) -> None:
    mine, ref = models(config("qwen2"))
    ids = prompt(200)
    with KvdexCache(mine, client, k=ALL, sinks=SINKS, window=WINDOW, dtype="f32") as cache:
        _, tokens = greedy(mine, cache, ids, 5)
        turn = prompt(30, seed=7)  # the next chat turn: 30 new tokens at once
        got = mine(turn, past_key_values=cache, use_cache=True).logits.float()
        seq = torch.cat([ids, tokens, turn], dim=1)
        assert cache.get_seq_length() == seq.shape[1]
        want = ref(seq).logits[:, -30:].float()
        assert (got - want).abs().max().item() < 1e-4
        # Decoding goes on after it, still exact.
        t = got[:, -1].argmax(-1, keepdim=True)
        a = mine(t, past_key_values=cache, use_cache=True).logits[:, -1]
        b = ref(torch.cat([seq, t], dim=1)).logits[:, -1]
        assert (a - b).abs().max().item() < 1e-4


@torch.no_grad()
def test_second_prefill_of_a_bf16_model(client) -> None:
    """A bf16 model keeps bf16 sessions, whose gathered rows come back as bf16 bits: the next
    turn's queries must see the same keys as stock attention (to bf16 rounding)."""
    mine, ref = models(config("llama"), torch.bfloat16)
    ids = prompt(200)
    with KvdexCache(mine, client, k=ALL, sinks=SINKS, window=WINDOW) as cache:
        mine(ids, past_key_values=cache, use_cache=True)
        assert cache.stats()["session_dtype"] == "bf16"
        turn = prompt(30, seed=7)
        got = mine(turn, past_key_values=cache, use_cache=True).logits.float()
    want = ref(torch.cat([ids, turn], dim=1)).logits[:, -30:].float()
    assert (got - want).abs().max().item() < 2e-1


@pytest.mark.parametrize("short", [150, 10])
@torch.no_grad()
def test_batch_of_two_prompts_with_left_padding(client, short) -> None:
    """Prompts of 200 and ``short`` tokens; with 10, the short one's static set fills up during
    decode (sinks + window = 20) while the long one's is full from the start."""
    mine, ref = models(config("llama"))
    a, b = prompt(200, seed=3)[0], prompt(short, seed=4)[0]
    pad = 200 - short
    ids = torch.stack([a, torch.cat([torch.zeros(pad, dtype=a.dtype), b])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    new = 16
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    with KvdexCache(mine, client, k=ALL, sinks=SINKS, window=WINDOW, dtype="f32") as cache:
        got = mine.generate(ids, past_key_values=cache, **kw)
        assert len(cache.seq.sessions) == 2
        assert [cache.layers[0].lengths, cache.layers[0].pads] == [[200 + new - 1, short + new - 1], [0, pad]]
    want = ref.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for x, y in zip(got.logits, want.logits):
        assert (x - y).abs().max().item() < 1e-4


@pytest.mark.parametrize("block", [1, 3, 8])
@torch.no_grad()
def test_lazy_appends_across_block_boundaries(client, block) -> None:
    """Decode tokens reach the daemon every ``block`` steps; until then they are attended
    locally. 30 steps cross several block boundaries, for a sequence whose static set is full
    from the start and for a padded one (10 tokens) that outgrows sinks + window meanwhile."""
    mine, ref = models(config("llama"))
    ids = torch.stack([prompt(200, seed=5)[0], torch.cat([torch.zeros(190, dtype=torch.long), prompt(10, seed=6)[0]])])
    mask = torch.ones_like(ids)
    mask[1, :190] = 0
    steps = 30
    kw = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    with KvdexCache(mine, client, k=ALL, sinks=SINKS, window=WINDOW, dtype="f32", append_block=block) as cache:
        got = mine.generate(ids, past_key_values=cache, **kw)
        layer = cache.layers[0]
        unsent = (steps - 1) % block  # generate's last token is not fed back
        assert layer.unsent == unsent
        assert layer.daemon_lengths() == [200 + steps - 1 - unsent, 10 + steps - 1 - unsent]
        static = [int(n) for n in layer.valid.sum(dim=1)] if layer.valid is not None else [layer.keys.shape[-2]] * 2
        assert static == [SINKS + WINDOW + unsent] * 2  # the sinks, the daemon's window, the unsent
        stats = cache.stats()
        assert stats["attended_fraction"] == pytest.approx(1.0)
        # 2 layers x 2 sequences: one retrieve per step while there is something to retrieve,
        # one append per full block.
        assert stats["appends"] == 2 * 2 * ((steps - 1) // block)
    want = ref.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for i, (x, y) in enumerate(zip(got.logits, want.logits)):
        assert (x - y).abs().max().item() < 1e-4, f"step {i}"


def test_append_block_must_be_positive(client) -> None:
    mine, _ = models(config("llama"))
    with pytest.raises(kvdex.BadRequestError, match="append_block"):
        KvdexCache(mine, client, append_block=0)


def test_generate_usage_and_own_daemon(kvdex_bin, monkeypatch) -> None:
    monkeypatch.setenv("KVDEX_BIN", kvdex_bin)
    mine, ref = models(config("llama"))
    ids = prompt(120)
    cache = KvdexCache(mine, k=ALL, sinks=SINKS, window=WINDOW, dtype="f32")  # starts a daemon
    proc = cache.daemon._proc
    out = mine.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=8, do_sample=False))
    cache.close()
    assert proc.poll() is not None, "the cache's own daemon still runs after close()"


@torch.no_grad()
def test_from_prefill_decodes_like_stock(client) -> None:
    mine, ref = models(config("llama"))
    ids = prompt(200)
    stock = DynamicCache(config=mine.config)
    with kvdex.hf.capture_queries(mine) as queries:
        for chunk in ids.split(64, dim=1):  # a chunked stock prefill
            logits = mine(chunk, past_key_values=stock, use_cache=True).logits[:, -1]
    q, pos = queries[0]
    assert sorted(queries) == [0, 1] and q.shape[:2] == (1, 4) and pos[-1] == 199
    kept = stock.layers[0].keys.clone()
    for budget in (dict(k=ALL), dict(k=4)):  # two methods decode from the same prefill state
        with KvdexCache.from_prefill(mine, stock, queries, client, sinks=SINKS, window=WINDOW,
                                     dtype="f32", **budget) as cache:
            t = logits.argmax(-1, keepdim=True)
            got = mine(t, past_key_values=cache, use_cache=True).logits[:, -1]
            want = ref(torch.cat([ids, t], dim=1)).logits[:, -1]
            err = (got - want).abs().max().item()
            if budget["k"] == ALL:
                assert err < 1e-4
            else:
                # Per layer, of 201 tokens: 4 sinks, the 16 window tokens of the 200 the daemon
                # holds, the step's own token (not appended yet) and 4 retrieved.
                assert cache.stats()["attended_tokens"] == [2 * (SINKS + WINDOW + 1 + 4)]
                assert cache.stats()["past_tokens"] == [2 * 201]
    assert torch.equal(stock.layers[0].keys, kept)


def test_small_budget_attends_a_fraction(client) -> None:
    mine, _ = models(config("llama"))
    with KvdexCache(mine, client, coverage=0.5, min_k=1, max_k=8, sinks=SINKS, window=WINDOW) as cache:
        greedy(mine, cache, prompt(300), 4)
        s = cache.stats()
    assert s["decode_steps"] == 4 and s["retrieves"] == 4 * 2
    assert 0 < s["attended_fraction"] < (SINKS + WINDOW + 4 + 8) / 300  # + up to 4 unsent decode tokens


def test_refusals(client) -> None:
    _, ref = models(config("llama"))
    with pytest.raises(kvdex.BadRequestError, match="attn_implementation='kvdex'"):
        KvdexCache(ref, client)
    mine, _ = models(config("llama"))
    with pytest.raises(kvdex.BadRequestError, match="window"):
        KvdexCache(mine, client, window=0)
    with KvdexCache(mine, client, k=ALL, sinks=SINKS, window=WINDOW) as cache:
        with pytest.raises(kvdex.BadRequestError, match="beam search"):
            mine.generate(prompt(40), past_key_values=cache, num_beams=2, max_new_tokens=2, do_sample=False)


def test_plain_client_does_not_import_torch() -> None:
    code = "import sys, kvdex; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gather_mode_on_cuda(client) -> None:
    if not torch.cuda.is_available():
        pytest.skip("gather mode needs a CUDA device (and a daemon running the cuda transfer backend)")
    mine, ref = models(config("llama"))
    mine, ref = mine.cuda(), ref.cuda()
    with KvdexCache(mine, client, k=512, sinks=SINKS, window=WINDOW, dtype="f32", gather=True) as cache:
        assert_same_decode(mine, ref, cache, prompt(200).cuda())
        assert cache.layers[0].gather_bufs, "the CUDA model did not use gather mode"
