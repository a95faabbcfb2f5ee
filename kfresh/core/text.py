"""Plain-text helpers every wing may use: sentences of a document (the reading step quotes them, the
finetuner builds questions around them)."""

from __future__ import annotations

import re

# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by space and a capital,
# a digit or an opening quote. Abbreviations such as "U.S. officials" stay whole; "Mr. Smith" is split,
# which costs a choice nothing but length.
_BOUNDARY = re.compile(r"""(?<=[.!?])["'”’)\]]?\s+(?=["'“‘(]?[A-Z0-9])""")
_ABBREV = re.compile(r"(?:\b[A-Z]\.){2,}$|\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Gen|Gov|Sen|Rep|No|vs|Inc|Co|Corp|Ltd)\.$")
MIN_CHARS = 12  # shorter pieces ("Yes.", "(AP)") are never a quote on their own
MAX_CHARS = 600  # a quote is a sentence, not a page


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, whitespace-normalised, in order; pieces shorter than MIN_CHARS join their neighbour."""
    text = " ".join(text.split())
    if not text:
        return []
    pieces: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        piece = text[start : m.start()].strip()
        if _ABBREV.search(piece.rstrip("\"'”’)]")):
            continue
        pieces.append(piece + text[m.start() : m.end()].strip())
        start = m.end()
    pieces.append(text[start:].strip())
    merged: list[str] = []
    for piece in (p for p in pieces if p):
        if merged and (len(piece) < MIN_CHARS or len(merged[-1]) < MIN_CHARS):
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    return [m[:MAX_CHARS] for m in merged]


# Function words carry no evidence of which passage answers a question.
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "as",
        "and",
        "or",
        "but",
        "nor",
        "not",
        "no",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "done",
        "has",
        "have",
        "had",
        "having",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "which",
        "who",
        "whom",
        "whose",
        "what",
        "when",
        "where",
        "why",
        "how",
        "than",
        "then",
        "so",
        "such",
        "into",
        "onto",
        "over",
        "under",
        "about",
        "after",
        "before",
        "during",
        "since",
        "until",
        "while",
        "also",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "i",
        "you",
        "he",
        "she",
        "we",
        "they",
        "me",
        "him",
        "her",
        "us",
        "them",
        "my",
        "your",
        "his",
        "our",
        "their",
        "one",
        "ones",
        "said",
        "says",
        "say",
        "new",
        "week",
        "weeks",
        "year",
        "years",
        "last",
        "first",
    ]
)
_WORD = re.compile(r"[a-z0-9]+(?:['’\-][a-z0-9]+)*")


def content_words(text: str) -> set[str]:
    """The distinct lower-case words of `text` that are not function words; a possessive 's is dropped
    ("Biden's" -> "biden")."""
    words = (w.removesuffix("'s").removesuffix("’s") for w in _WORD.findall(text.lower()))
    return {w for w in words if w and w not in STOPWORDS}


_NAME = re.compile(r"\b[A-Z][A-Za-z0-9]*(?:['’\-][A-Za-z0-9]+)*")
# Days and months: capitalised, but no name of anything a question asks about.
CALENDAR_WORDS = frozenset(
    [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
        "january",
        "february",
        "march",
        "april",
        "may",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
    ]
)


def names(text: str) -> set[str]:
    """The capitalised words of `text`, lower-cased, possessive dropped, at least three letters, neither function
    words nor days or months: its proper names, roughly ("Halvorne Shipping's" -> {"halvorne", "shipping"})."""
    out = set()
    for word in _NAME.findall(text):
        w = word.lower().removesuffix("'s").removesuffix("’s")
        if len(w) >= 3 and w not in STOPWORDS and w not in CALENDAR_WORDS:
            out.add(w)
    return out
