"""The long-context tasks, generated from a plain-text haystack and a seed.

Each task builds a :class:`Sample`: an instruction, a context (haystack text with needles planted
at chosen depths, or for ``cwe`` a word list), a question, an answer prefix that the model
continues, and the answers that must appear in what it generates. The prompt is fitted to a
context length in tokens by :mod:`kvdex.eval.prompt`; here everything is text.

Tasks (RULER-style; Hsieh et al. 2024, "RULER: What's the real context size..."):

- ``passkey``: one pass key (5 digits) hidden in the haystack.
- ``niah``: one "special magic number" needle for a key word.
- ``niah-multi``: four needles with different keys; one of them is asked.
- ``copy``: a list of random words planted in the haystack; at the end its first words are
  given again and the model must continue the list (an induction task).
- ``vt``: variable tracking, a chain ``VAR A = 12345``, ``VAR B = VAR A``, ...; all names asked.
- ``cwe``: common-words extraction from a numbered word list; the three most frequent asked.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

#: Depths (share of the context before the needle) that samples cycle through.
DEPTHS: Tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)

COPY_LIST_WORDS = 24  # words in the planted list
COPY_GIVEN_WORDS = 8  # of them, repeated at the end
COPY_SCORED_WORDS = 5  # the continuation that must be right
CWE_COMMON = 3  # words asked in cwe
VT_HOPS = 4  # variables in a vt chain


@dataclass
class Needle:
    """Text planted in the haystack at ``depth`` (0 = start of the context, 1 = its end)."""

    text: str
    depth: float


@dataclass
class Sample:
    """One generated prompt and what solves it."""

    task: str
    index: int
    depth: float
    #: Seeds this sample's other random choices (the cwe list).
    key: str
    instruction: str
    question: str
    answer_prefix: str
    answers: List[str]
    needles: List[Needle] = field(default_factory=list)
    #: For ``cwe``: the list entries that replace the haystack (else empty).
    entries: List[str] = field(default_factory=list)
    #: ``copy`` scores the words that follow the prefix, in order; the others search ``answers``.
    ordered: bool = False
    max_new_tokens: int = 16


def haystack_words(text: str) -> List[str]:
    """Distinct lower-case alphabetic words (4 to 10 letters) of ``text``, sorted."""
    return sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,10}", text)})


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _var(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _passkey(rng: random.Random, words: Sequence[str], depth: float) -> Dict:
    key = _number(rng, 5)
    return dict(
        instruction="There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.",
        needles=[Needle(f"The pass key is {key}. Remember it. {key} is the pass key.", depth)],
        question="What is the pass key?",
        answer_prefix="The pass key is",
        answers=[key],
        max_new_tokens=10,
    )


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _niah_question(key: str) -> Dict:
    return dict(
        question=f"What is the special magic number for {key} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
    )


_NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. "
                     "Make sure to memorize them. I will quiz you about the numbers afterwards.")


def _niah(rng: random.Random, words: Sequence[str], depth: float) -> Dict:
    key, value = rng.choice(words), _number(rng, 7)
    return dict(instruction=_NIAH_INSTRUCTION, needles=[Needle(_magic(key, value), depth)],
                answers=[value], max_new_tokens=14, **_niah_question(key))


def _niah_multi(rng: random.Random, words: Sequence[str], depth: float) -> Dict:
    keys = rng.sample(list(words), 4)
    values = [_number(rng, 7) for _ in keys]
    # The asked needle sits at the sample's depth; the distractors anywhere else.
    depths = [depth] + [rng.uniform(0.05, 0.95) for _ in keys[1:]]
    needles = [Needle(_magic(k, v), d) for k, v, d in zip(keys, values, depths)]
    return dict(instruction=_NIAH_INSTRUCTION, needles=needles, answers=[values[0]], max_new_tokens=14,
                **_niah_question(keys[0]))


def _copy(rng: random.Random, words: Sequence[str], depth: float) -> Dict:
    seq = rng.sample(list(words), COPY_LIST_WORDS)
    given = " ".join(seq[:COPY_GIVEN_WORDS])
    return dict(
        instruction="A list of words is hidden inside the following text. Memorize it.",
        needles=[Needle("Here is the list of words: " + " ".join(seq) + ".", depth)],
        question="Repeat the list of words.",
        answer_prefix="Here is the list of words: " + given,
        answers=seq[COPY_GIVEN_WORDS:COPY_GIVEN_WORDS + COPY_SCORED_WORDS],
        ordered=True,
        max_new_tokens=4 * COPY_SCORED_WORDS + 4,
    )


def _vt(rng: random.Random, words: Sequence[str], depth: float) -> Dict:
    names: List[str] = []
    while len(names) < VT_HOPS:
        v = _var(rng)
        if v not in names:
            names.append(v)
    value = _number(rng, 5)
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    # The chain starts at the sample's depth and is spread, in order, over the rest.
    step = (0.95 - depth) / VT_HOPS
    needles = [Needle(line, depth + i * step) for i, line in enumerate(lines)]
    return dict(
        instruction="Memorize and track the chain of variable assignments hidden in the following text.",
        needles=needles,
        question=f"Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=f"According to the chain of variable assignments in the text above, {VT_HOPS} variables "
        f"are assigned the value {value}, they are:",
        answers=names,
        max_new_tokens=6 * VT_HOPS + 4,
    )


def cwe_entries(rng: random.Random, words: Sequence[str], n: int) -> Tuple[List[str], List[str]]:
    """A shuffled list of ``n`` words in which ``CWE_COMMON`` words are clearly the most frequent.

    Each common word fills 6% of the list; every other word appears at most 3 times (at least 3
    fewer than a common word, once ``n`` >= 100). Returns (entries, common words).
    """
    common = rng.sample(list(words), CWE_COMMON)
    rest = [w for w in words if w not in common]
    freq = max(6, round(0.06 * n))
    entries = [w for w in common for _ in range(freq)]
    if len(rest) * 3 < n - len(entries):
        raise ValueError(f"cwe: the haystack has {len(words)} distinct words, too few for {n} list entries")
    while len(entries) < n:
        entries.extend(rng.sample(rest, min(len(rest), n - len(entries))))
    rng.shuffle(entries)
    return entries, common


def _cwe(rng: random.Random, words: Sequence[str], depth: float) -> Dict:
    return dict(
        instruction="Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.",
        needles=[],
        question=f"What are the {CWE_COMMON} most common words in the above list?",
        answer_prefix=f"The top {CWE_COMMON} words that appear most often in the list are:",
        answers=[],  # filled by the prompt builder, which knows how many entries fit
        max_new_tokens=6 * CWE_COMMON + 4,
    )


GENERATORS: Dict[str, Callable[[random.Random, Sequence[str], float], Dict]] = {
    "passkey": _passkey,
    "niah": _niah,
    "niah-multi": _niah_multi,
    "copy": _copy,
    "vt": _vt,
    "cwe": _cwe,
}
TASKS: Tuple[str, ...] = tuple(GENERATORS)


def make_sample(task: str, index: int, seed: int, words: Sequence[str]) -> Sample:
    """Sample ``index`` of ``task``: the same (task, index, seed, words) give the same sample."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if len(words) < COPY_LIST_WORDS:
        raise ValueError(f"the haystack has {len(words)} distinct words of 4-10 letters; need {COPY_LIST_WORDS}")
    key = f"{seed}:{task}:{index}"
    depth = DEPTHS[index % len(DEPTHS)]
    return Sample(task=task, index=index, depth=depth, key=key, **GENERATORS[task](random.Random(key), words, depth))


def _words_of(text: str) -> List[str]:
    return re.findall(r"[A-Za-z0-9]+", text.lower())


def score(sample: Sample, generated: str) -> bool:
    """Whether ``generated`` (the text after the answer prefix) solves ``sample``.

    Unordered tasks: every answer appears as a whole word. ``copy``: the first generated words are
    exactly the expected continuation.
    """
    got = _words_of(generated)
    if sample.ordered:
        want = [w.lower() for w in sample.answers]
        return got[: len(want)] == want
    return all(a.lower() in got for a in sample.answers)
