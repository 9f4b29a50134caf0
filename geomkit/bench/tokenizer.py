"""A tiny word-level tokenizer for the embedded benchmark, saved next to the model.

Words are whatever :meth:`str.split` separates; ids are the positions in the vocabulary, whose
first four entries are the special tokens ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>`` (ids
0 to 3). Unknown words map to ``<unk>``. :meth:`WordTokenizer.batch` produces batches in the
Hugging Face causal-LM convention of :mod:`geomkit.objectives` (``labels`` aligned with
``input_ids``, ``-100`` where a position carries no loss).

>>> from geomkit.bench.tokenizer import WordTokenizer
>>> tok = WordTokenizer.from_texts(["what is 3 plus 4 ? answer : 7"])
>>> tok.encode("what is 3 plus 4 ?")
[1, 12, 10, 4, 11, 5, 8]
>>> tok.decode(tok.encode("what is 3 plus 5 ?", eos=True))
'what is 3 plus <unk> ?'
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from geomkit._validation import check_integer, invalid

__all__ = ["TOKENIZER_FILE", "WordTokenizer"]

TOKENIZER_FILE: str = "geomkit_tokenizer.json"
"""Name of the file that :meth:`WordTokenizer.save` writes into a model directory."""

_FORMAT = "geomkit-word-tokenizer"
_VERSION = 1
_IGNORE_INDEX = -100  # geomkit.objectives.IGNORE_INDEX, not imported to keep this module light


class WordTokenizer:
    """Map whitespace-separated words to integer ids and back.

    Parameters
    ----------
    vocabulary
        The words, in id order. The special tokens (:attr:`PAD`, :attr:`BOS`, :attr:`EOS`,
        :attr:`UNK`) always take ids 0 to 3: if ``vocabulary`` starts with them (as
        :attr:`vocabulary` of another tokenizer does) they are used as they are, otherwise they
        are put in front. Words must be unique, non-empty and free of whitespace.

    Raises
    ------
    TypeError
        If a word is not a string.
    ValueError
        If a word is empty, contains whitespace, repeats, or is a special token out of place.
    """

    PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
    SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)

    def __init__(self, vocabulary: Sequence[str]) -> None:
        if isinstance(vocabulary, str):
            raise invalid(
                "vocabulary",
                vocabulary,
                "a sequence of words, got a str",
                owner="WordTokenizer",
                error=TypeError,
            )
        words = list(vocabulary)
        if tuple(words[: len(self.SPECIALS)]) == self.SPECIALS:
            words = words[len(self.SPECIALS) :]
        index: dict[str, int] = {s: i for i, s in enumerate(self.SPECIALS)}
        for word in words:
            if not isinstance(word, str):
                raise invalid(
                    "word",
                    word,
                    f"a str, got {type(word).__name__}",
                    owner="WordTokenizer",
                    error=TypeError,
                )
            if not word or word.split() != [word]:
                raise invalid(
                    "word", word, "a non-empty str free of whitespace", owner="WordTokenizer"
                )
            if word in self.SPECIALS:
                raise ValueError(
                    f"WordTokenizer: the special token {word!r} may only appear at the start "
                    f"of the vocabulary, in the order {list(self.SPECIALS)}"
                )
            if word in index:
                raise ValueError(f"WordTokenizer: the word {word!r} appears twice")
            index[word] = len(index)
        self._index = index
        self._words: tuple[str, ...] = tuple(index)

    # ----------------------------------------------------------------------------------------
    # Construction, persistence
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WordTokenizer:
        """A tokenizer whose words are the sorted unique words of ``texts`` (special tokens
        among them are not counted twice)."""
        if isinstance(texts, str):
            raise invalid(
                "texts",
                texts,
                "an iterable of str, got a str",
                owner="WordTokenizer.from_texts",
                error=TypeError,
            )
        words: set[str] = set()
        for text in texts:
            if not isinstance(text, str):
                raise invalid(
                    "text",
                    text,
                    f"a str, got {type(text).__name__}",
                    owner="WordTokenizer.from_texts",
                    error=TypeError,
                )
            words.update(text.split())
        return cls(sorted(words - set(cls.SPECIALS)))

    def save(self, directory: str | os.PathLike) -> None:
        """Write the vocabulary to ``directory/geomkit_tokenizer.json`` (creating
        ``directory`` if needed)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        payload = {"format": _FORMAT, "version": _VERSION, "vocabulary": list(self._words)}
        (path / TOKENIZER_FILE).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> WordTokenizer:
        """Read the tokenizer that :meth:`save` wrote into ``directory``.

        Raises
        ------
        FileNotFoundError
            If ``directory`` holds no ``geomkit_tokenizer.json``.
        ValueError
            If the file is not a tokenizer of this format and version.
        """
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"WordTokenizer.load: no tokenizer file {str(path)!r}")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"WordTokenizer.load: {str(path)!r} is not valid JSON") from error
        if (
            not isinstance(payload, dict)
            or payload.get("format") != _FORMAT
            or payload.get("version") != _VERSION
            or not isinstance(payload.get("vocabulary"), list)
        ):
            raise ValueError(
                f"WordTokenizer.load: {str(path)!r} is not a {_FORMAT} file of version {_VERSION}"
            )
        return cls(payload["vocabulary"])

    # ----------------------------------------------------------------------------------------
    # Vocabulary
    # ----------------------------------------------------------------------------------------

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """All tokens in id order, the special tokens first."""
        return self._words

    @property
    def pad_id(self) -> int:
        return self._index[self.PAD]

    @property
    def bos_id(self) -> int:
        return self._index[self.BOS]

    @property
    def eos_id(self) -> int:
        return self._index[self.EOS]

    @property
    def unk_id(self) -> int:
        return self._index[self.UNK]

    def __len__(self) -> int:
        return len(self._words)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WordTokenizer):
            return NotImplemented
        return self._words == other._words

    def __hash__(self) -> int:
        return hash(self._words)

    def __repr__(self) -> str:
        return f"WordTokenizer({len(self)} tokens)"

    # ----------------------------------------------------------------------------------------
    # Encoding, decoding
    # ----------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """The ids of the whitespace-separated words of ``text``, ``<unk>`` for unknown words,
        with ``<bos>`` in front and ``<eos>`` at the end if asked for."""
        if not isinstance(text, str):
            raise invalid(
                "text",
                text,
                f"a str, got {type(text).__name__}",
                owner="WordTokenizer.encode",
                error=TypeError,
            )
        unk = self.unk_id
        ids = [self._index.get(word, unk) for word in text.split()]
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The words of ``ids`` joined by single spaces.

        With ``skip_special``, ``<pad>``, ``<bos>`` and ``<eos>`` are left out; ``<unk>`` is
        always kept, so that an unknown word never passes for a correct answer.

        Raises
        ------
        ValueError
            If an id is not in ``range(len(self))``.
        """
        skipped = {self.pad_id, self.bos_id, self.eos_id} if skip_special else set()
        words = []
        for raw in ids:
            if isinstance(raw, Tensor):
                raw = raw.item()
            check_integer("id", raw, owner="WordTokenizer.decode")
            i = int(raw)
            if not 0 <= i < len(self._words):
                raise invalid(
                    "id",
                    i,
                    f"an integer in [0, {len(self._words) - 1}] (a vocabulary of "
                    f"{len(self._words)} tokens)",
                    owner="WordTokenizer.decode",
                )
            if i not in skipped:
                words.append(self._words[i])
        return " ".join(words)

    # ----------------------------------------------------------------------------------------
    # Batches
    # ----------------------------------------------------------------------------------------

    def batch(
        self,
        texts: Sequence[str],
        *,
        prompt_lengths: Sequence[int] | None = None,
        max_length: int | None = None,
        eos: bool = True,
    ) -> dict[str, Tensor]:
        """A right-padded causal-LM batch of ``texts``.

        Every text is encoded with ``<bos>`` (and ``<eos>`` if ``eos``), cut to ``max_length``
        tokens if given, and padded with ``<pad>`` to the longest row.

        Parameters
        ----------
        texts
            The texts, one per row.
        prompt_lengths
            Per text, the number of leading tokens (``<bos>`` included, e.g.
            ``len(tok.encode(qa_prompt(qa)))``) that carry no loss, so that only the answer
            counts. At most the number of tokens of the text.
        max_length
            Largest number of tokens per row (>= 1); longer rows lose their end.
        eos
            Whether to end every text with ``<eos>``, so that a model learns where answers stop.

        Returns
        -------
        dict
            ``input_ids``, ``attention_mask`` (1 on tokens, 0 on padding) and ``labels``
            (``input_ids`` with ``-100`` on padding and on prompt tokens), all int64 [B, T].

        Raises
        ------
        ValueError
            If ``texts`` is empty, ``max_length`` < 1, or ``prompt_lengths`` has another
            length than ``texts`` or an entry out of range.
        """
        if isinstance(texts, str):
            raise invalid(
                "texts",
                texts,
                "a sequence of str, got a str",
                owner="WordTokenizer.batch",
                error=TypeError,
            )
        texts = list(texts)
        if not texts:
            raise ValueError("WordTokenizer.batch: texts is empty")
        check_integer("max_length", max_length, 1, optional=True, owner="WordTokenizer.batch")
        rows = [self.encode(text, bos=True, eos=eos) for text in texts]
        if prompt_lengths is None:
            prompts = [0] * len(rows)
        else:
            prompts = list(prompt_lengths)
            if len(prompts) != len(rows):
                raise ValueError(
                    f"WordTokenizer.batch: invalid prompt_lengths of {len(prompts)} entries: "
                    f"expected {len(rows)}, one per text"
                )
            for i, (n, row) in enumerate(zip(prompts, rows, strict=True)):
                check_integer(f"prompt_lengths[{i}]", n, 0, len(row), owner="WordTokenizer.batch")
        if max_length is not None:
            rows = [row[:max_length] for row in rows]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), _IGNORE_INDEX, dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, prompts, strict=True)):
            ids = torch.tensor(row, dtype=torch.long)
            input_ids[i, : len(row)] = ids
            attention_mask[i, : len(row)] = 1
            labels[i, n : len(row)] = ids[n:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
