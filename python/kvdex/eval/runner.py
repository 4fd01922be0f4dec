"""The evaluation loop: for each task and sample, build the prompt, prefill once, decode each method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import methods as m
from .prompt import Haystack, build
from .tasks import make_sample, score


@dataclass
class Settings:
    """Everything a run needs besides the model."""

    tasks: Sequence[str]
    methods: Sequence[str]
    context: int
    samples: int
    seed: int
    fmt: str  # "chat" or "plain"
    budget: float  # attended fraction for streaming/oracle when no kvdex method runs
    sinks: int
    window: int
    max_new_tokens: Optional[int] = None
    kvdex: Optional[m.KvdexOptions] = None


@dataclass
class Outcome:
    """One (task, sample, method) result."""

    task: str
    index: int
    method: str
    context: int
    solved: bool
    answers: List[str]
    text: str
    attended_fraction: float
    decode_tokens: int
    decode_s: float
    prefill_s: float
    index_ready_s: Optional[float]


def method_order(methods: Sequence[str]) -> List[str]:
    """kvdex methods first: their measured attended fraction sets streaming's and oracle's budget."""
    return sorted(methods, key=lambda x: 0 if x in m.KVDEX_METHODS else 1)


def run(model: Any, tokenizer: Any, hay: Haystack, s: Settings,
        progress: Callable[[Outcome], None] = lambda _: None) -> List[Outcome]:
    """Every outcome of the run; ``progress`` is called with each as soon as it is decoded."""
    order = method_order(s.methods)
    capture = any(x in m.KVDEX_METHODS for x in order)
    out: List[Outcome] = []
    # Sample-major, so that a run stopped early has results for every task.
    for i in range(s.samples):
        for task in s.tasks:
            sample = make_sample(task, i, s.seed, hay.words)
            prompt = build(sample, hay, tokenizer, s.fmt, s.context)
            pre = m.prefill(model, prompt.ids, capture)
            measured: Dict[str, float] = {}
            for method in order:
                fraction = measured.get("kvdex", measured.get("kvdex-flat", s.budget))
                d = m.decode(method, model, tokenizer, pre, s.max_new_tokens or sample.max_new_tokens,
                             fraction=min(1.0, fraction), sinks=s.sinks, window=s.window, kvdex=s.kvdex)
                measured[method] = d.attended_fraction
                out.append(Outcome(task, i, method, len(prompt.ids), score(sample, d.text), list(sample.answers),
                                   d.text, d.attended_fraction, len(d.tokens), d.seconds, pre.seconds,
                                   d.index_ready_s))
                progress(out[-1])
            del pre
    return out
