"""kvdex inside Hugging Face transformers: ``model.generate()`` decodes through kvdex.

    import kvdex.hf
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="kvdex")
    out = model.generate(ids, past_key_values=kvdex.hf.KvdexCache(model), max_new_tokens=64)

Importing this package registers the ``"kvdex"`` attention function
(:func:`~kvdex.hf.attention.kvdex_attention`) and its mask with transformers. The pieces:

- :class:`KvdexCache` (:mod:`.cache`): the ``Cache``; its full-attention layers are
  :class:`~kvdex.hf.layer.KvdexLayer` (:mod:`.layer`), one kvdex session per sequence
  (:mod:`.sequences`).
- :mod:`.attention`: the attention function, and :func:`capture_queries` for
  :meth:`KvdexCache.from_prefill`.
- :mod:`.gather`: kvdex's part of a decode step, attend mode or CUDA gather mode.
- :mod:`.attn_math`: partial attention and the exact LSE merge in torch.

Needs ``torch`` and ``transformers`` (``pip install "./python[hf]"``); tested with
transformers 4.57 and 5.x. ``import kvdex`` alone never imports torch.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
    import transformers
except ImportError as e:  # pragma: no cover (depends on the environment)
    raise ImportError('kvdex.hf needs torch and transformers: pip install "./python[hf]" '
                      "(or -r python/requirements-hf.txt)") from e

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import CapturedQueries, capture_queries, kvdex_attention
from .cache import KvdexCache, full_attention_layers, layer_types
from .layer import KvdexLayer
from .mask import kvdex_mask
from .sequences import Budget

ATTN_IMPLEMENTATION = "kvdex"
"""The name to pass as ``attn_implementation``."""

AttentionInterface.register(ATTN_IMPLEMENTATION, kvdex_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvdex_mask())

__all__ = [
    "KvdexCache",
    "KvdexLayer",
    "Budget",
    "capture_queries",
    "CapturedQueries",
    "kvdex_attention",
    "full_attention_layers",
    "layer_types",
    "ATTN_IMPLEMENTATION",
    "transformers",
]
