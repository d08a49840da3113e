"""Caption cleaning and the vocabulary (saved as JSON, never pickled)."""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

# Anything that is not a letter, a digit or whitespace (underscore included).
_PUNCTUATION = re.compile(r"[^\w\s]|_", flags=re.UNICODE)
_SPACES = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """NFKC-normalise, lower-case, strip punctuation, collapse whitespace.

    ``"A Surfboard, on the beach."`` and ``"a surfboard on the beach"`` give the
    same words (the tutorial's regex lacked its brackets and stripped nothing).
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCTUATION.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def tokenize(text: str) -> list[str]:
    return clean_caption(text).split()


@dataclass
class Vocabulary:
    tokens: list[str]  # index -> token; the specials first
    min_count: int
    max_size: int

    def __post_init__(self):
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    @property
    def start_id(self) -> int:
        return self.index[START]

    @property
    def end_id(self) -> int:
        return self.index[END]

    @property
    def unk_id(self) -> int:
        return self.index[UNK]

    @property
    def non_words(self) -> tuple[int, ...]:
        """Tokens a decoder must never emit: only words and ``<end>`` make a caption."""
        return (self.pad_id, self.start_id, self.unk_id)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, captions: Iterable[list[str]], min_count: int, max_size: int) -> "Vocabulary":
        counts = Counter(word for words in captions for word in words)
        # Most frequent first; ties broken alphabetically so the result is reproducible.
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        kept = kept[: max(0, max_size - len(SPECIALS))]
        return cls(list(SPECIALS) + kept, min_count, max_size)

    def encode(self, words: list[str], max_length: int) -> list[int]:
        """``<start> words <end>``, truncated so the whole fits ``max_length``."""
        ids = [self.index.get(w, self.unk_id) for w in words[: max_length - 2]]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return " ".join(words)

    def step_words(self, ids: Iterable[int]) -> list[str]:
        """The token of each decoding step up to ``<end>`` included: one label per attention map."""
        steps = []
        for i in ids:
            i = int(i)
            steps.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
            if i == self.end_id:
                break
        return steps

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "min_count": self.min_count, "max_size": self.max_size,
                "specials": {"pad": PAD, "start": START, "end": END, "unk": UNK}}

    def save(self, path: Path) -> None:
        from captioning.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        data = json.loads(Path(path).read_text())
        return cls(data["tokens"], data["min_count"], data["max_size"])


def length_at_percentile(lengths: list[int], percentile: float) -> int:
    """Token count (with <start>/<end>) that ``percentile`` % of captions fit in."""
    if not lengths:
        raise ValueError("no captions to measure")
    return int(np.ceil(np.percentile(np.asarray(lengths), percentile, method="higher")))
