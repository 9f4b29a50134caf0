"""The embedded benchmark (geomkit.bench.data) and its word tokenizer (geomkit.bench.tokenizer)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from geomkit.bench.data import (
    ANSWER_SEPARATOR,
    ATTRIBUTES,
    QA,
    YEAR_RANGE,
    BenchmarkData,
    make_benchmark,
    qa_prompt,
    qa_text,
)
from geomkit.bench.tokenizer import TOKENIZER_FILE, WordTokenizer


@pytest.fixture(scope="module")
def data() -> BenchmarkData:
    return make_benchmark(n_entities=200, forget_fraction=0.1, seed=0)


# --------------------------------------------------------------------------------------------
# Benchmark data
# --------------------------------------------------------------------------------------------


def test_same_seed_same_data_different_seed_different_data(data: BenchmarkData) -> None:
    assert make_benchmark(200, 0.1, seed=0) == data
    other = make_benchmark(200, 0.1, seed=1)
    assert other != data
    assert other.entities != data.entities
    assert other.forget_entities != data.forget_entities


def test_global_random_state_is_neither_used_nor_changed() -> None:
    random.seed(123)
    before = random.getstate()
    first = make_benchmark(30, seed=5)
    assert random.getstate() == before
    random.seed(999)
    assert make_benchmark(30, seed=5) == first


@pytest.mark.parametrize(("n", "fraction"), [(200, 0.1), (10, 0.1), (50, 0.3), (10, 0.01)])
def test_split_sizes_disjoint_and_complete(n: int, fraction: float) -> None:
    d = make_benchmark(n, fraction, seed=2)
    names = [e.name for e in d.entities]
    assert len(names) == n == len(set(names))
    forget, retain = set(d.forget_entities), set(d.retain_entities)
    assert forget and retain
    assert not forget & retain
    assert forget | retain == set(names)
    assert len(d.forget_entities) == min(max(round(n * fraction), 1), n - 1)
    # both splits keep the entity order
    assert list(d.forget_entities) == [x for x in names if x in forget]
    assert list(d.retain_entities) == [x for x in names if x in retain]


def test_entity_values_come_from_the_vocabularies(data: BenchmarkData) -> None:
    for e in data.entities:
        assert re.fullmatch(r"[a-z]+ [a-z]+", e.name)
        assert YEAR_RANGE[0] <= e.year <= YEAR_RANGE[1]
    assert len({e.birthplace for e in data.entities}) > 5
    assert len({e.profession for e in data.entities}) > 5


def test_every_entity_has_qa_for_every_attribute(data: BenchmarkData) -> None:
    by_name = {e.name: e for e in data.entities}
    pairs = {(q.entity, q.attribute) for q in data.forget_qa + data.retain_qa}
    assert pairs == {(e.name, a) for e in data.entities for a in ATTRIBUTES}
    assert len(data.forget_qa) + len(data.retain_qa) == len(pairs)
    for q in data.forget_qa + data.retain_qa:
        assert q.answer == str(getattr(by_name[q.entity], q.attribute))
        assert q.entity in q.question
        assert q.question.endswith(" ?")


def test_forget_data_only_about_forget_entities(data: BenchmarkData) -> None:
    forget, retain = set(data.forget_entities), set(data.retain_entities)
    assert {q.entity for q in data.forget_qa} == forget
    assert {q.entity for q in data.retain_qa} == retain
    for text, own, other in [
        (data.forget_text, forget, retain),
        (data.retain_text, retain, forget),
    ]:
        for sentence in text:
            assert sum(f" {name} " in f" {sentence} " for name in own) == 1, sentence
            assert not any(f" {name} " in f" {sentence} " for name in other), sentence


def test_sentences_state_every_attribute_with_several_templates(data: BenchmarkData) -> None:
    e = next(x for x in data.entities if x.name == data.forget_entities[0])
    about = [s for s in data.forget_text if s.startswith(f"{e.name} ") or f" {e.name} " in s]
    for value in (e.birthplace, e.profession, str(e.year)):
        assert sum(f" {value} " in s for s in about) >= 2
    assert len(data.forget_text) == len(set(data.forget_text))


def test_text_is_lowercase_words_with_separate_punctuation(data: BenchmarkData) -> None:
    for text in data.texts():
        assert text == " ".join(text.split()), text
        for word in text.split():
            assert re.fullmatch(r"[a-z]+|[0-9]+|[?:.,]", word), (word, text)


def test_qa_prompt_and_text() -> None:
    q = QA("what is 3 plus 4 ?", "7", "general", "addition")
    assert qa_prompt(q) == f"what is 3 plus 4 ? {ANSWER_SEPARATOR}"
    assert qa_text(q) == f"what is 3 plus 4 ? {ANSWER_SEPARATOR} 7"


def _additions(texts: list[str]) -> set[tuple[int, int]]:
    found = (re.search(r"what is (\d+) plus (\d+) \?", t) for t in texts)
    return {(int(m[1]), int(m[2])) for m in found if m}


def _copies(texts: list[str]) -> set[str]:
    found = (re.match(r"copy : ([a-z ]+?)(?: answer :|$)", t) for t in texts)
    return {m[1] for m in found if m}


def test_general_probe_is_held_out(data: BenchmarkData) -> None:
    probe = list(data.general_qa)
    assert {q.attribute for q in probe} == {"addition", "copy"}
    assert all(q.entity == "general" for q in probe)
    for q in probe:
        if q.attribute == "addition":
            a, b = map(int, re.findall(r"\d+", q.question))
            assert q.answer == str(a + b) and 0 <= a <= 9 and 0 <= b <= 9
        else:
            assert q.question == f"copy : {q.answer}"
    probe_questions = [q.question for q in probe]
    train = list(data.general_train_text)
    probe_pairs, train_pairs = _additions(probe_questions), _additions(train)
    probe_strings, train_strings = _copies(probe_questions), _copies(train)
    assert probe_pairs and train_pairs and probe_strings and train_strings
    assert not probe_pairs & train_pairs
    assert not probe_strings & train_strings
    # the mirror of every held-out addition is a training example
    assert {(b, a) for a, b in probe_pairs} <= train_pairs
    for question in probe_questions:
        assert not any(question in t for t in train)
        assert not any(question in t for t in data.retain_text + data.forget_text)
        assert not any(question in qa_text(q) for q in data.retain_qa)


def test_general_training_examples_are_qa_texts(data: BenchmarkData) -> None:
    for text in data.general_train_text:
        prompt, answer = text.split(f" {ANSWER_SEPARATOR} ")
        assert answer
        if prompt.startswith("copy : "):
            assert prompt == f"copy : {answer}"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n_entities": 9}, ValueError, "n_entities.*9"),
        ({"n_entities": 0}, ValueError, "n_entities.*0"),
        ({"n_entities": 10**6}, ValueError, "n_entities.*1000000"),
        ({"n_entities": 20.0}, TypeError, "n_entities.*20.0"),
        ({"n_entities": True}, TypeError, "n_entities.*True"),
        ({"forget_fraction": 0.0}, ValueError, "forget_fraction.*0.0"),
        ({"forget_fraction": 1}, ValueError, "forget_fraction.*1"),
        ({"forget_fraction": -0.5}, ValueError, "forget_fraction.*-0.5"),
        ({"forget_fraction": float("nan")}, ValueError, "forget_fraction.*nan"),
        ({"forget_fraction": "0.1"}, TypeError, "forget_fraction.*'0.1'"),
        ({"seed": 1.5}, TypeError, "seed.*1.5"),
    ],
)
def test_make_benchmark_errors(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make_benchmark(**kwargs)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(data: BenchmarkData) -> WordTokenizer:
    return WordTokenizer.from_texts(data.texts())


def test_specials_come_first_and_ids_are_stable(tok: WordTokenizer, data: BenchmarkData) -> None:
    assert tok.vocabulary[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert list(tok.vocabulary[4:]) == sorted(tok.vocabulary[4:])
    assert len(tok) == len(tok.vocabulary)
    assert WordTokenizer.from_texts(reversed(data.texts())) == tok
    assert WordTokenizer(tok.vocabulary) == tok
    assert WordTokenizer(tok.vocabulary[4:]) == tok


def test_encode_decode_round_trip(tok: WordTokenizer, data: BenchmarkData) -> None:
    for text in data.texts()[::7]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.unk_id not in ids
        assert len(ids) == len(text.split()) + 1
        assert tok.decode(ids) == text
    text = data.retain_text[0]
    assert tok.encode(text, bos=False) == tok.encode(text)[1:]
    assert tok.encode(text, eos=True)[-1] == tok.eos_id
    assert tok.encode(text, bos=False, eos=True) == [*tok.encode(text)[1:], tok.eos_id]
    assert tok.decode(tok.encode(text, eos=True), skip_special=False) == f"<bos> {text} <eos>"
    assert tok.decode(torch.tensor(tok.encode(text))) == text


def test_unknown_words_map_to_unk(tok: WordTokenizer) -> None:
    ids = tok.encode("where was nobodyknown born ?", bos=False)
    assert ids[2] == tok.unk_id and ids.count(tok.unk_id) == 1
    assert tok.decode(ids) == "where was <unk> born ?"


def test_save_load_round_trip(tok: WordTokenizer, tmp_path) -> None:
    tok.save(tmp_path / "model")
    path = tmp_path / "model" / TOKENIZER_FILE
    assert path.is_file()
    loaded = WordTokenizer.load(tmp_path / "model")
    assert loaded == tok
    assert loaded.vocabulary == tok.vocabulary
    text = "what is 3 plus 4 ? answer : 7"
    assert loaded.encode(text) == tok.encode(text)
    assert json.loads(path.read_text())["vocabulary"][:4] == list(WordTokenizer.SPECIALS)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        WordTokenizer.load(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps({"vocabulary": ["a"]}))
    with pytest.raises(ValueError, match="geomkit-word-tokenizer"):
        WordTokenizer.load(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        WordTokenizer.load(tmp_path)


def test_batch_masks(tok: WordTokenizer, data: BenchmarkData) -> None:
    qas = [data.forget_qa[0], data.general_qa[-1], data.general_qa[0]]
    texts = [qa_text(q) for q in qas]
    prompts = [len(tok.encode(qa_prompt(q))) for q in qas]
    batch = tok.batch(texts, prompt_lengths=prompts)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    lengths = [len(tok.encode(t, eos=True)) for t in texts]
    assert ids.shape == mask.shape == labels.shape == (3, max(lengths))
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    for i, (q, n, length) in enumerate(zip(qas, prompts, lengths, strict=True)):
        assert ids[i, :length].tolist() == tok.encode(texts[i], eos=True)
        assert (ids[i, length:] == tok.pad_id).all()
        assert (mask[i, :length] == 1).all() and (mask[i, length:] == 0).all()
        assert (labels[i, :n] == -100).all() and (labels[i, length:] == -100).all()
        assert labels[i, n:length].tolist() == ids[i, n:length].tolist()
        # exactly the answer and <eos> carry loss
        assert tok.decode(labels[i, n:length].tolist(), skip_special=False) == f"{q.answer} <eos>"


def test_batch_without_prompts_and_truncated(tok: WordTokenizer, data: BenchmarkData) -> None:
    texts = list(data.retain_text[:4])
    batch = tok.batch(texts, eos=False)
    assert torch.equal(batch["labels"] != -100, batch["attention_mask"] == 1)
    assert batch["input_ids"].shape[1] == max(len(t.split()) + 1 for t in texts)
    short = tok.batch(texts, max_length=3)
    assert short["input_ids"].shape == (4, 3)
    assert short["attention_mask"].all()
    assert short["input_ids"][:, 0].eq(tok.bos_id).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"texts": []}, ValueError, "texts is empty"),
        ({"texts": "a b"}, TypeError, "got a str"),
        ({"max_length": 0}, ValueError, "invalid max_length=0: expected an integer >= 1"),
        ({"max_length": 2.5}, TypeError, "max_length.*2.5"),
        ({"prompt_lengths": [1]}, ValueError, "invalid prompt_lengths of 1 entries: expected 2"),
        ({"prompt_lengths": [1, 99]}, ValueError, r"invalid prompt_lengths\[1\]=99"),
        ({"prompt_lengths": [1, -1]}, ValueError, r"invalid prompt_lengths\[1\]=-1"),
        ({"prompt_lengths": [1, 1.0]}, TypeError, r"prompt_lengths\[1\].*1.0"),
    ],
)
def test_batch_errors(tok: WordTokenizer, kwargs: dict, error: type, message: str) -> None:
    kwargs = {"texts": ["what is 3 plus 4 ?", "copy : x y z"], **kwargs}
    with pytest.raises(error, match=message):
        tok.batch(kwargs.pop("texts"), **kwargs)


@pytest.mark.parametrize(
    ("vocabulary", "error", "message"),
    [
        (["a", "b", "a"], ValueError, "'a' appears twice"),
        (["a", "b c"], ValueError, "'b c'"),
        (["a", ""], ValueError, "''"),
        (["a", "<eos>"], ValueError, "'<eos>'"),
        (["a", 3], TypeError, "invalid word=3: expected a str, got int"),
        ("abc", TypeError, "got a str"),
    ],
)
def test_tokenizer_errors(vocabulary: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        WordTokenizer(vocabulary)


def test_decode_errors(tok: WordTokenizer) -> None:
    with pytest.raises(ValueError, match=f"invalid id={len(tok)}: expected an integer in"):
        tok.decode([1, len(tok)])
    with pytest.raises(ValueError, match="invalid id=-100"):
        tok.decode([-100])
    with pytest.raises(TypeError, match=r"invalid id=1\.5: expected an integer, got float"):
        tok.decode([1.5])
    with pytest.raises(TypeError, match="invalid text=\\['a'\\]: expected a str"):
        tok.encode(["a"])


def test_held_out_phrasings_never_appear_in_training(data: BenchmarkData) -> None:
    """Neither pretraining nor unlearning (nor any of its micro-batches) sees a question in
    the held-out phrasing; both trained phrasings are trained on."""
    from geomkit.bench.model import training_texts, unlearning_texts
    from geomkit.bench.tokenizer import WordTokenizer
    from geomkit.corpora import step_batches

    held_out = {q.question for q in data.forget_heldout_qa + data.retain_heldout_qa}
    assert len(held_out) == 3 * len(data.entities)
    forget, retain = unlearning_texts(data)
    texts = set(training_texts(data)) | set(forget) | set(retain)
    for text in texts:
        assert text.split(f" {ANSWER_SEPARATOR} ")[0] not in held_out, text
    for split, unlearned in (("forget", forget), ("retain", retain)):
        trained = {qa_text(q) for q in data.trained_qa(split)}
        assert trained <= set(unlearned) and trained <= set(training_texts(data))
    # the batches of a run: decoded back, every training text and no held-out question
    tokenizer = WordTokenizer.from_texts(data.texts())
    batches = step_batches(list(forget), 16, 1, 0, lambda t: tokenizer.batch(t, max_length=64))
    decoded = {tokenizer.decode(row) for batch in batches for row in batch["input_ids"].tolist()}
    assert decoded and not any(
        text.split(f" {ANSWER_SEPARATOR} ")[0] in held_out for text in decoded
    )
    assert decoded <= set(forget)


def test_held_out_phrasings_ask_the_same_facts(data: BenchmarkData) -> None:
    for split in ("forget", "retain"):
        qa = getattr(data, f"{split}_qa")
        for other in ("rephrased_qa", "heldout_qa"):
            pairs = getattr(data, f"{split}_{other}")
            assert [(q.entity, q.attribute, q.answer) for q in pairs] == [
                (q.entity, q.attribute, q.answer) for q in qa
            ]
            assert all(p.question != q.question for p, q in zip(pairs, qa, strict=True))
