"""Splitting a document into chunks that an embedding model sees whole.

semantic-text-splitter (Rust, well kept) splits at the largest semantic boundary that fits:
paragraphs, then sentences, then words, so a chunk rarely cuts a sentence. Sizes are in
characters, so one splitter serves every embedding model, local or upstream: chunks of
CHUNK_MIN to CHUNK_MAX characters, consecutive ones overlapping by up to CHUNK_OVERLAP, so a
passage cut at a boundary is still whole in one of them. 800 characters of English are about
200 word pieces, under all-MiniLM-L6-v2's 256-token window: nothing is truncated away unseen.

Offsets are character offsets into the document text, which is what citations point at.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from semantic_text_splitter import TextSplitter

CHUNK_MIN = 400
CHUNK_MAX = 800
CHUNK_OVERLAP = 100


@dataclass(frozen=True)
class Piece:
    ordinal: int
    start: int
    end: int
    text: str


@lru_cache(maxsize=1)
def _splitter() -> TextSplitter:
    return TextSplitter((CHUNK_MIN, CHUNK_MAX), overlap=CHUNK_OVERLAP, trim=True)


def split(text: str) -> list[Piece]:
    """The chunks of `text` in order; a text with no visible characters has none."""
    return [
        Piece(ordinal, start, start + len(chunk), chunk)
        for ordinal, (start, chunk) in enumerate(_splitter().chunk_indices(text))
    ]
