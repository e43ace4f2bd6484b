"""Scores for generated answers against references: exact match and ROUGE-L F1."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from pipeline.data.instruct import get_template
from pipeline.errors import InputError


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def _strip_punctuation(text: str) -> str:
    """`text` without leading/trailing punctuation or whitespace (Unicode categories P*)."""
    lo, hi = 0, len(text)
    while lo < hi and (text[lo].isspace() or _is_punctuation(text[lo])):
        lo += 1
    while hi > lo and (text[hi - 1].isspace() or _is_punctuation(text[hi - 1])):
        hi -= 1
    return text[lo:hi]


def normalize_answer(text: str) -> str:
    """Lowercased, whitespace runs collapsed to one space, punctuation stripped from both ends.

    So "  The answer is 42. " and "the answer is 42" compare equal, while punctuation inside
    ("4,500", "don't", "e.g.") is kept, since it can change the meaning.
    """
    return " ".join(_strip_punctuation(text.lower()).split())


def _words(text: str) -> list[str]:
    """Normalised words, each with its own surrounding punctuation stripped ("mat," -> "mat")."""
    words = (_strip_punctuation(w) for w in normalize_answer(text).split())
    return [w for w in words if w]


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence by the O(len(a)·len(b)) DP, one row of len(b) + 1 kept."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalised words: P = LCS/len(pred), R = LCS/len(ref), F1 = 2PR/(P+R).

    Two empty texts score 1.0 (nothing was asked and nothing said); one empty, 0.0.
    """
    pred, ref = _words(prediction), _words(reference)
    if not pred and not ref:
        return 1.0
    lcs = _lcs_length(pred, ref) if pred and ref else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def corpus_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Means over the pairs: ``{"exact_match": ..., "rouge_l_f1": ...}``."""
    if len(predictions) != len(references):
        raise InputError(
            f"{len(predictions)} predictions but {len(references)} references; need one each"
        )
    if not predictions:
        raise InputError("no predictions to score")
    n = len(predictions)
    pairs = list(zip(predictions, references, strict=True))
    return {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "rouge_l_f1": sum(rouge_l_f1(p, r) for p, r in pairs) / n,
    }


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (all of it if none occurs)."""
    return text[: min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))]


def extract_response(continuation: str, template: str) -> str:
    """The answer in the text generated after a prompt: without a repeated response header,
    cut before the first marker of a new turn (a small model often starts one), stripped."""
    t = get_template(template)
    text = continuation.lstrip()
    header = t.response.strip()
    if text.startswith(header):
        text = text[len(header) :]
    return cut_at_stops(text, t.stops).strip()
