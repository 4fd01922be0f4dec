"""kvdex.eval without a model: task generators, prompt fitting, scoring and the report's schema."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvdex.eval import report, tasks  # noqa: E402
from kvdex.eval.prompt import Haystack, build, plant, render, resolve_format  # noqa: E402
from kvdex.eval.runner import Outcome  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer(chat: bool = False):
    """A real fast tokenizer with one token per byte (no download): lengths in tokens are exact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def haystack_text(lines: int = 400, seed: int = 7) -> str:
    """Plain English-like text: sentences of random words from a fixed vocabulary."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}{c}" for a in ("tal", "mor", "ven", "sil", "dra", "pon", "kew", "bru")
             for b in ("in", "es", "ar", "oo", "um", "an", "il", "or") for c in "bdgkmprt"]
    return "\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(lines))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def hay(tok):
    return Haystack(haystack_text(), tok)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_samples_are_deterministic_and_differ_by_index_and_seed(task, hay):
    a = tasks.make_sample(task, 3, 0, hay.words)
    assert a == tasks.make_sample(task, 3, 0, hay.words)
    assert a != tasks.make_sample(task, 4, 0, hay.words)
    assert a != tasks.make_sample(task, 3, 1, hay.words)


def test_depths_cycle_over_point_one_to_point_nine(hay):
    depths = [tasks.make_sample("niah", i, 0, hay.words).depth for i in range(10)]
    assert depths == list(tasks.DEPTHS) * 2
    assert min(depths) == 0.1 and max(depths) == 0.9


def test_unknown_task_is_refused(hay):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.make_sample("nope", 0, 0, hay.words)


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("context", [1024, 3000])
def test_prompt_hits_the_context_length_and_holds_the_answer(task, context, tok, hay):
    sample = tasks.make_sample(task, 1, 0, hay.words)
    p = build(sample, hay, tok, "plain", context)
    assert abs(len(p.ids) - context) <= max(16, context // 100), (task, len(p.ids))
    text = tok.decode(p.ids)
    assert text.endswith(sample.answer_prefix)
    for needle in sample.needles:
        assert text.count(needle.text) == 1
    if task == "copy":
        # The continuation is in the planted list, and not in the prompt's end.
        assert " ".join(sample.answers) in p.text
        assert " ".join(sample.answers) not in sample.answer_prefix
    elif task == "cwe":
        counts = {w: p.sample.entries.count(w) for w in set(p.sample.entries)}
        top = sorted(counts, key=counts.get, reverse=True)[: tasks.CWE_COMMON]
        assert sorted(top) == sorted(sample.answers)
        assert min(counts[w] for w in sample.answers) > max(c for w, c in counts.items() if w not in top)
    else:
        for answer in sample.answers:
            assert answer in p.text


@pytest.mark.parametrize("depth", tasks.DEPTHS)
def test_needle_depth_is_honoured(depth, tok, hay):
    sample = next(s for s in (tasks.make_sample("passkey", i, 0, hay.words) for i in range(10)) if s.depth == depth)
    p = build(sample, hay, tok, "plain", 4096)
    at = p.text.index(sample.needles[0].text)
    assert abs(at / len(p.text) - depth) < 0.02


def test_multi_needles_and_vt_chain_order(tok, hay):
    s = tasks.make_sample("niah-multi", 2, 0, hay.words)
    p = build(s, hay, tok, "plain", 2048)
    assert len(s.needles) == 4 and all(n.text in p.text for n in s.needles)
    assert len(set(n.text.split(" is: ")[0] for n in s.needles)) == 4  # four different keys
    v = tasks.make_sample("vt", 0, 0, hay.words)
    pv = build(v, hay, tok, "plain", 2048)
    at = [pv.text.index(n.text) for n in v.needles]
    assert at == sorted(at) and len(v.answers) == tasks.VT_HOPS


def test_chat_format_uses_the_template(hay):
    tok = byte_tokenizer(chat=True)
    assert resolve_format("auto", tok) == "chat"
    assert resolve_format("auto", byte_tokenizer()) == "plain"
    with pytest.raises(ValueError, match="no chat template"):
        resolve_format("chat", byte_tokenizer())
    sample = tasks.make_sample("passkey", 0, 0, hay.words)
    text = tok.decode(render(tok, "chat", sample, "CONTEXT"))
    assert text.startswith("<|user|>" + sample.instruction)
    assert text.endswith("<|assistant|>" + sample.answer_prefix)


def test_plant_puts_needles_at_line_boundaries(hay):
    s = tasks.make_sample("passkey", 2, 0, hay.words)  # depth 0.5
    out = plant(["a", "b", "c", "d"], [10, 10, 10, 10], s).split("\n")
    assert out == ["a", "b", s.needles[0].text, "c", "d"]


def test_scoring(hay):
    s = tasks.make_sample("passkey", 0, 0, hay.words)
    key = s.answers[0]
    assert tasks.score(s, f" {key}.")
    assert not tasks.score(s, f" {key[:-1]}.")
    assert not tasks.score(s, f" 9{key}.")  # a whole number, not a substring
    c = tasks.make_sample("copy", 0, 0, hay.words)
    assert tasks.score(c, " " + " ".join(c.answers) + " and more")
    assert not tasks.score(c, " " + " ".join(reversed(c.answers)))
    v = tasks.make_sample("vt", 0, 0, hay.words)
    assert tasks.score(v, " " + ", ".join(v.answers) + ".")
    assert not tasks.score(v, " " + ", ".join(v.answers[:-1]))


def _outcome(task: str, index: int, method: str, solved: bool, frac: float = 0.1) -> Outcome:
    return Outcome(task, index, method, 1000, solved, ["1"], "x", frac, 4, 2.0, 3.0,
                   0.5 if method == "kvdex" else None)


def test_report_rows_schema_and_solved_of_full():
    solved = {"full": [1, 1, 1, 0], "kvdex": [1, 0, 1, 1], "streaming": [0, 0, 0, 1]}
    outcomes = [_outcome("niah", i, m, bool(v)) for m, vs in solved.items() for i, v in enumerate(vs)]
    data = report.rows(outcomes, ["full", "kvdex", "streaming"])
    assert [r["method"] for r in data] == ["full", "kvdex", "streaming"]
    for r in data:
        assert set(report.FIELDS) <= set(r)
        json.loads(json.dumps(r))
    full, kv, st = data
    assert full["full_solved"] == 3 and full["solved_of_full"] == 1.0 and full["accuracy"] == 0.75
    assert kv["solved_of_full"] == pytest.approx(2 / 3) and kv["accuracy"] == 0.75
    assert st["solved_of_full"] == 0.0 and st["accuracy"] == 0.25
    assert kv["index_ready_s"] == 0.5 and full["index_ready_s"] is None
    assert kv["decode_tokens_per_s"] == pytest.approx(16 / 8.0)
    assert "niah" in report.table(data)


def test_report_without_full_has_no_solved_of_full():
    data = report.rows([_outcome("cwe", 0, "kvdex", True)], ["kvdex"])
    assert data[0]["full_solved"] is None and data[0]["solved_of_full"] is None


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    outcomes = [_outcome(t, 0, m, True) for t in ("niah", "copy") for m in ("full", "oracle")]
    path = tmp_path / "p.png"
    report.plot(report.rows(outcomes, ["full", "oracle"]), str(path), "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarize_pools_files_and_drops_unfinished_samples(tmp_path, capsys):
    from kvdex.eval import summarize

    a = [_outcome("niah", 0, "full", True), _outcome("niah", 0, "kvdex", True),
         _outcome("niah", 1, "full", True)]  # sample 1 stopped before its kvdex decode
    b = [_outcome("niah", 0, "full", True), _outcome("niah", 0, "kvdex", False)]
    for name, rows in (("a", a), ("b", b)):
        (tmp_path / name).write_text("".join(json.dumps(o.__dict__) + "\n" for o in rows))
    pooled = summarize.load([str(tmp_path / "a"), str(tmp_path / "b")])
    assert len(pooled) == 4
    assert summarize.main([str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    kv = [json.loads(x) for x in capsys.readouterr().out.splitlines()][1]
    assert kv["method"] == "kvdex" and kv["full_solved"] == 2 and kv["solved_of_full"] == 0.5


def test_decoding_stops_at_eos_or_a_line_break_after_the_answer(tok):
    from kvdex.eval.methods import stopper

    stop = stopper(tok)

    def ids(text: str):
        return tok(text, add_special_tokens=False)["input_ids"]

    assert not stop(ids(" 1234"))
    assert not stop(ids(":\n"))  # the answer may follow on the next line
    assert not stop(ids("\n\n"))
    assert stop(ids(":\n 1234\n"))
    assert stop(ids(" 1234.\n"))
    assert stop(ids(" 12") + [tok.eos_token_id])
