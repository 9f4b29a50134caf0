"""A deterministic TOFU-style "fictitious knowledge" benchmark (docs/method.md#embedded-benchmark).

Invented entities (names built from syllables) carry three attributes, a birthplace (an
invented town), a profession and a birth year. Each attribute is rendered as several
sentences and as one question-answer pair. About ``forget_fraction`` of the entities form the
forget split, the rest the retain split. A general-capability probe of a different kind
(held-out one-digit additions and symbol copying) stands in for MMLU; its training examples
(``general_train_text``) use operand pairs and symbol strings disjoint from the probe's, and
none of it appears in the retain data.

All text is lowercase words separated by single spaces, punctuation included as separate
words (``"?"``, ``":"``, ``"."``), so a whitespace tokenizer
(:class:`geomkit.bench.tokenizer.WordTokenizer`) covers it exactly.

Question-answer pairs are meant for exact-match evaluation with a causal LM: the model is
prompted with :func:`qa_prompt` (the question followed by :data:`ANSWER_SEPARATOR`) and its
greedy continuation is compared with ``qa.answer``; it is trained on :func:`qa_text`.

>>> from geomkit.bench.data import make_benchmark, qa_prompt, qa_text
>>> data = make_benchmark(n_entities=20, seed=0)
>>> len(data.entities), len(data.forget_entities), len(data.retain_entities)
(20, 2, 18)
>>> qa = data.general_qa[0]
>>> qa_text(qa) == qa_prompt(qa) + " " + qa.answer
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from geomkit._validation import check_integer, check_real

__all__ = [
    "ANSWER_SEPARATOR",
    "ATTRIBUTES",
    "QUESTION_PHRASINGS",
    "MAX_ENTITIES",
    "Entity",
    "QA",
    "BenchmarkData",
    "make_benchmark",
    "qa_prompt",
    "qa_text",
]

ANSWER_SEPARATOR: str = "answer :"
"""Words that end every QA prompt; the answer follows after one space."""

ATTRIBUTES: tuple[str, ...] = ("birthplace", "profession", "year")
"""The attributes of an :class:`Entity` that sentences and QA pairs are made of."""

MAX_ENTITIES: int = 10_000
"""Largest ``n_entities`` accepted by :func:`make_benchmark` (names stay quick to draw)."""

YEAR_RANGE: tuple[int, int] = (1700, 1999)
"""Inclusive range of the birth years."""

_SYLLABLES: tuple[str, ...] = (
    "ka", "lo", "ven", "ri", "tha", "mor", "sel", "dra", "qui", "bel",
    "nor", "fe", "zan", "ul", "pim", "ro", "gar", "esh", "tov", "li",
    "mi", "dor", "sa", "vek",
)  # fmt: skip

_TOWNS: tuple[str, ...] = (
    "brindlemoor", "quellhaven", "ostravale", "fennwick", "marrowdeep", "thistlegate",
    "calderwyn", "emberlock", "glimmerford", "hollowmere", "ivystone", "juniperholt",
    "kestrelby", "larkspire", "mossbarrow", "nettlecombe", "orrinsgate", "pebbleton",
    "rookhallow", "saltmarsh", "tallowfield", "umberlee", "vantholm", "wrenfold",
)  # fmt: skip

_PROFESSIONS: tuple[str, ...] = (
    "baker", "sailor", "weaver", "cartographer", "astronomer", "blacksmith",
    "glassblower", "botanist", "clockmaker", "poet", "brewer", "archivist",
)  # fmt: skip

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "{name} was born in {value} .",
        "the birthplace of {name} is {value} .",
        "{name} grew up in the town of {value} .",
    ),
    "profession": (
        "{name} works as a {value} .",
        "by trade , {name} is a {value} .",
        "the profession of {name} is {value} .",
    ),
    "year": (
        "{name} was born in the year {value} .",
        "the birth year of {name} is {value} .",
        "{name} came into the world in {value} .",
    ),
}

_QUESTIONS: dict[str, tuple[str, str, str]] = {
    # (evaluated and trained, trained only, held out: never trained, evaluated)
    "birthplace": (
        "where was {name} born ?",
        "in which town was {name} born ?",
        "what is the home town of {name} ?",
    ),
    "profession": (
        "what is the profession of {name} ?",
        "what does {name} do for a living ?",
        "what job does {name} have ?",
    ),
    "year": (
        "in which year was {name} born ?",
        "what is the birth year of {name} ?",
        "when was {name} born ?",
    ),
}
QUESTION_PHRASINGS: tuple[str, ...] = ("qa", "rephrased_qa", "heldout_qa")
"""The three phrasings of every question, as :class:`BenchmarkData` field suffixes: the first
is trained and evaluated, the second only trained, the third only evaluated (held out)."""

# The general-capability probe and its training examples.
_DIGITS = range(10)  # operands of "what is a plus b ?"
_N_ADDITION_PROBE = 20  # probe pairs; each one's mirror (b, a) stays in the training examples
_COPY_ALPHABET: tuple[str, ...] = ("x", "y", "z", "p", "q", "r", "s", "t", "u", "v", "w", "k")
_COPY_LENGTHS = (3, 5)  # inclusive range of the number of symbols to copy
_N_COPY_TRAIN = 200
_N_COPY_PROBE = 20


@dataclass(frozen=True)
class Entity:
    """An invented person: a two-word ``name`` and three attributes."""

    name: str
    birthplace: str
    profession: str
    year: int


@dataclass(frozen=True)
class QA:
    """A question and its short answer, about ``attribute`` of ``entity``.

    The general probe uses ``entity="general"`` and ``attribute`` ``"addition"`` or ``"copy"``.
    """

    question: str
    answer: str
    entity: str
    attribute: str


@dataclass(frozen=True)
class BenchmarkData:
    """The output of :func:`make_benchmark`; every field is a tuple, so it compares by value.

    Attributes
    ----------
    entities
        All entities, in the order they were drawn.
    forget_entities, retain_entities
        Names of the two splits (disjoint; together all entities, each in entity order).
    forget_text, retain_text
        Sentences about the entities of each split, every template of every attribute.
    forget_qa, retain_qa
        One QA pair per attribute and entity of each split, in the first phrasing (trained,
        and evaluated as ``forget_acc`` / ``retain_acc``).
    forget_rephrased_qa, retain_rephrased_qa
        The same questions in a second phrasing, trained on (pretraining and unlearning) but
        not evaluated.
    forget_heldout_qa, retain_heldout_qa
        The same questions in a third phrasing that no training ever sees (evaluated as
        ``forget_heldout_acc`` / ``retain_heldout_acc``: does forgetting, or keeping, carry
        over to a paraphrase?).
    general_qa
        The general-capability probe: additions and copies held out from the training data.
    general_train_text
        Training examples of the same kinds (as :func:`qa_text`), disjoint from the probe.
    """

    entities: tuple[Entity, ...]
    forget_entities: tuple[str, ...]
    retain_entities: tuple[str, ...]
    forget_text: tuple[str, ...]
    retain_text: tuple[str, ...]
    forget_qa: tuple[QA, ...]
    retain_qa: tuple[QA, ...]
    general_qa: tuple[QA, ...]
    general_train_text: tuple[str, ...]
    forget_rephrased_qa: tuple[QA, ...] = ()
    retain_rephrased_qa: tuple[QA, ...] = ()
    forget_heldout_qa: tuple[QA, ...] = ()
    retain_heldout_qa: tuple[QA, ...] = ()

    def trained_qa(self, split: str) -> tuple[QA, ...]:
        """The QA pairs of ``split`` ("forget" or "retain") that training sees: the first
        two phrasings (never the held-out one)."""
        return getattr(self, f"{split}_qa") + getattr(self, f"{split}_rephrased_qa")

    def texts(self) -> tuple[str, ...]:
        """Every text of the benchmark (sentences, QA texts, probe and its training examples).

        Use it to build a vocabulary that covers the whole benchmark, e.g.
        ``WordTokenizer.from_texts(data.texts())``.
        """
        qa = self.forget_qa + self.retain_qa + self.general_qa
        qa += self.forget_rephrased_qa + self.retain_rephrased_qa
        qa += self.forget_heldout_qa + self.retain_heldout_qa
        return (
            self.forget_text
            + self.retain_text
            + tuple(qa_text(q) for q in qa)
            + self.general_train_text
        )


def qa_prompt(qa: QA) -> str:
    """The prompt of ``qa``: its question followed by :data:`ANSWER_SEPARATOR`."""
    return f"{qa.question} {ANSWER_SEPARATOR}"


def qa_text(qa: QA) -> str:
    """The training text of ``qa``: :func:`qa_prompt` followed by the answer."""
    return f"{qa_prompt(qa)} {qa.answer}"


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_arguments(n_entities: object, forget_fraction: object, seed: object) -> None:
    owner = "make_benchmark"  # both splits need entities: at least 10
    check_integer("n_entities", n_entities, 10, MAX_ENTITIES, owner=owner)
    check_real(
        "forget_fraction", forget_fraction, 0.0, 1.0, strict=True, strict_high=True, owner=owner
    )
    check_integer("seed", seed, owner=owner)


# --------------------------------------------------------------------------------------------
# Entities
# --------------------------------------------------------------------------------------------


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables))


def _entities(rng: random.Random, n: int) -> tuple[Entity, ...]:
    names: set[str] = set()
    entities = []
    while len(entities) < n:
        name = f"{_word(rng, 2)} {_word(rng, rng.randint(2, 3))}"
        if name in names:
            continue
        names.add(name)
        entities.append(
            Entity(
                name=name,
                birthplace=rng.choice(_TOWNS),
                profession=rng.choice(_PROFESSIONS),
                year=rng.randint(*YEAR_RANGE),
            )
        )
    return tuple(entities)


def _value(entity: Entity, attribute: str) -> str:
    return str(getattr(entity, attribute))


def _sentences(entities: list[Entity]) -> tuple[str, ...]:
    return tuple(
        template.format(name=e.name, value=_value(e, attribute))
        for e in entities
        for attribute in ATTRIBUTES
        for template in _TEMPLATES[attribute]
    )


def _entity_qa(entities: list[Entity], phrasing: int = 0) -> tuple[QA, ...]:
    return tuple(
        QA(
            question=_QUESTIONS[attribute][phrasing].format(name=e.name),
            answer=_value(e, attribute),
            entity=e.name,
            attribute=attribute,
        )
        for e in entities
        for attribute in ATTRIBUTES
    )


# --------------------------------------------------------------------------------------------
# General-capability probe
# --------------------------------------------------------------------------------------------


def _addition(a: int, b: int) -> QA:
    return QA(f"what is {a} plus {b} ?", str(a + b), "general", "addition")


def _copy(symbols: tuple[str, ...]) -> QA:
    text = " ".join(symbols)
    return QA(f"copy : {text}", text, "general", "copy")


def _general(rng: random.Random) -> tuple[tuple[QA, ...], tuple[str, ...]]:
    """The probe and the training texts: disjoint ordered operand pairs and symbol strings.

    Each probe addition ``(a, b)`` has ``a != b`` and its mirror ``(b, a)`` in the training
    examples, so a model that learns that ``plus`` commutes can answer it.
    """
    unordered = [(a, b) for a in _DIGITS for b in _DIGITS if a < b]
    held_out = [
        p if rng.random() < 0.5 else p[::-1] for p in rng.sample(unordered, _N_ADDITION_PROBE)
    ]
    probe_pairs = set(held_out)
    train_pairs = [(a, b) for a in _DIGITS for b in _DIGITS if (a, b) not in probe_pairs]

    strings: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    while len(strings) < _N_COPY_PROBE + _N_COPY_TRAIN:
        symbols = tuple(rng.choice(_COPY_ALPHABET) for _ in range(rng.randint(*_COPY_LENGTHS)))
        if symbols not in seen:
            seen.add(symbols)
            strings.append(symbols)
    probe_strings, train_strings = strings[:_N_COPY_PROBE], strings[_N_COPY_PROBE:]

    probe = tuple(_addition(a, b) for a, b in held_out) + tuple(map(_copy, probe_strings))
    train = [_addition(a, b) for a, b in train_pairs] + [_copy(s) for s in train_strings]
    rng.shuffle(train)
    return probe, tuple(qa_text(q) for q in train)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def make_benchmark(
    n_entities: int = 200, forget_fraction: float = 0.1, seed: int = 0
) -> BenchmarkData:
    """Build the benchmark, fully determined by the arguments.

    Parameters
    ----------
    n_entities
        Number of invented entities, 10 to :data:`MAX_ENTITIES`.
    forget_fraction
        Share of the entities in the forget split, in the open interval (0, 1); the split
        holds ``round(n_entities * forget_fraction)`` entities, at least 1 and at most
        ``n_entities - 1``.
    seed
        Seed of the private :class:`random.Random` that draws everything (the global random
        state is neither used nor changed); different seeds give different entities.

    Returns
    -------
    BenchmarkData

    Raises
    ------
    TypeError
        If an argument has the wrong type (``bool`` is not an integer here).
    ValueError
        If ``n_entities`` or ``forget_fraction`` is out of range.
    """
    _check_arguments(n_entities, forget_fraction, seed)
    n_entities = int(n_entities)
    rng = random.Random(int(seed))
    entities = _entities(rng, n_entities)
    n_forget = min(max(round(n_entities * float(forget_fraction)), 1), n_entities - 1)
    forget_index = set(rng.sample(range(n_entities), n_forget))
    forget = [e for i, e in enumerate(entities) if i in forget_index]
    retain = [e for i, e in enumerate(entities) if i not in forget_index]
    general_qa, general_train_text = _general(rng)
    return BenchmarkData(
        entities=entities,
        forget_entities=tuple(e.name for e in forget),
        retain_entities=tuple(e.name for e in retain),
        forget_text=_sentences(forget),
        retain_text=_sentences(retain),
        forget_qa=_entity_qa(forget),
        retain_qa=_entity_qa(retain),
        general_qa=general_qa,
        general_train_text=general_train_text,
        forget_rephrased_qa=_entity_qa(forget, 1),
        retain_rephrased_qa=_entity_qa(retain, 1),
        forget_heldout_qa=_entity_qa(forget, 2),
        retain_heldout_qa=_entity_qa(retain, 2),
    )
