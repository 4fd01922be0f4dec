"""Prompt formatting and fitting a sample to a context length in tokens.

Formats:

- ``chat``: the tokenizer's chat template, one user turn (instruction, context, question), then
  the assistant turn opened with the answer prefix, which the model continues;
- ``plain``: the same parts as plain text, the answer prefix last.

``auto`` picks ``chat`` when the tokenizer has a chat template (SmolLM2-Instruct) and ``plain``
otherwise (Gemma-3-270M is a base model).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

from .tasks import Sample, cwe_entries, haystack_words

FORMATS = ("auto", "chat", "plain")
_FIT_TRIES = 4


@dataclass
class Prompt:
    """A sample rendered and tokenized: ``ids`` is the whole prompt, ``len(ids)`` the context."""

    sample: Sample
    ids: List[int]
    text: str


class Haystack:
    """A plain-text haystack cut into lines, each with its token count."""

    def __init__(self, text: str, tokenizer: Any) -> None:
        self.lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(self.lines) < 2:
            raise ValueError("the haystack needs at least two non-empty lines of text")
        counts = tokenizer(self.lines, add_special_tokens=False)["input_ids"]
        self.counts = [max(1, len(c)) for c in counts]
        self.words = haystack_words(text)

    def filler(self, rng: random.Random, tokens: int) -> Tuple[List[str], List[int]]:
        """Consecutive lines (from a random start, wrapping around) of about ``tokens`` tokens,
        with their token counts; the last line is cut at a word to come close."""
        i = rng.randrange(len(self.lines))
        lines: List[str] = []
        counts: List[int] = []
        total = 0
        while total < tokens:
            line, count = self.lines[i], self.counts[i]
            if total + count > tokens:
                words = line.split()
                keep = len(words) * (tokens - total) // count
                if keep == 0:
                    break
                line, count = " ".join(words[:keep]), (tokens - total)
            lines.append(line)
            counts.append(count)
            total += count
            i = (i + 1) % len(self.lines)
        return lines, counts


def resolve_format(fmt: str, tokenizer: Any) -> str:
    """``chat`` or ``plain`` for ``fmt`` in :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; known: {', '.join(FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "chat" and not has_template:
        raise ValueError("--format chat: this tokenizer has no chat template")
    if fmt == "auto":
        return "chat" if has_template else "plain"
    return fmt


def render(tokenizer: Any, fmt: str, sample: Sample, context: str) -> List[int]:
    """Token ids of ``sample`` with ``context`` in the format ``fmt`` (``chat`` or ``plain``)."""
    user = f"{sample.instruction}\n\n{context}\n\n{sample.question}"
    if fmt == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text + sample.answer_prefix, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"{user}\n\n{sample.answer_prefix}", add_special_tokens=True)["input_ids"])


def plant(lines: Sequence[str], counts: Sequence[int], sample: Sample) -> str:
    """``lines`` with each needle inserted as a line where ``depth`` of the tokens lie before it."""
    total = sum(counts)
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    inserts: List[List[str]] = [[] for _ in range(len(lines) + 1)]
    for needle in sample.needles:
        at = min(range(len(bounds)), key=lambda j: abs(bounds[j] - needle.depth * total))
        inserts[at].append(needle.text)
    out: List[str] = []
    for j, line in enumerate(lines):
        out.extend(inserts[j])
        out.append(line)
    out.extend(inserts[len(lines)])
    return "\n".join(out)


def _context(sample: Sample, hay: Haystack, rng_key: str, tokens: int, per_entry: float) -> str:
    rng = random.Random(rng_key)
    if sample.task == "cwe":
        entries, common = cwe_entries(rng, hay.words, max(20, int(tokens / per_entry)))
        sample.entries, sample.answers = entries, common
        return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
    lines, counts = hay.filler(rng, tokens)
    return plant(lines, counts, sample)


def build(sample: Sample, hay: Haystack, tokenizer: Any, fmt: str, context: int, margin: float = 0.01) -> Prompt:
    """Fit ``sample`` to ``context`` tokens (within ``margin``, or 16 tokens, of it)."""
    if context < 256:
        raise ValueError(f"--context {context}: need at least 256 tokens")
    overhead = len(render(tokenizer, fmt, sample, "\n".join(n.text for n in sample.needles)))
    per_entry = 1.0
    if sample.task == "cwe":
        probe = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(hay.words[:200]))
        per_entry = len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / min(200, len(hay.words))
    want = context - overhead
    tol = max(16, int(margin * context))
    ids: List[int] = []
    text = ""
    for _ in range(_FIT_TRIES):
        if want <= 0:
            raise ValueError(f"--context {context}: the {sample.task} prompt alone has {overhead} tokens")
        text = _context(sample, hay, sample.key + ":context", want, per_entry)
        ids = render(tokenizer, fmt, sample, text)
        if abs(len(ids) - context) <= tol:
            break
        want += context - len(ids)
    return Prompt(sample=sample, ids=ids, text=text)
