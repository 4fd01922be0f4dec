"""``kvdex.eval``: a long-context accuracy harness for kvdex inside Hugging Face transformers.

Run it as ``python -m kvdex.eval`` (see :mod:`kvdex.eval.__main__`). Layout:

- :mod:`.tasks`: the tasks (passkey, niah, niah-multi, copy, vt, cwe), generated from a seed and
  a haystack's words, and their scoring;
- :mod:`.prompt`: prompt formatting (chat template or plain) and fitting to a length in tokens;
- :mod:`.attention`: the ``kvdex-eval`` attention (stock SDPA, sinks + window, exact top-k);
- :mod:`.methods`: one stock prefill per sample, then each method's greedy decode from a copy;
- :mod:`.models`: the packaged GGUF models by name;
- :mod:`.runner` and :mod:`.report`: the loop, then the per-(task, method) rows, table and plot.

Needs torch and transformers (the ``hf`` extra); the kvdex methods also need ``kvdex.hf``.
"""
