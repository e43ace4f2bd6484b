"""Whether generated answers still vary: length, distinct-n and the most common answer's share.

Reference-based scores alone mislead: after DPO, 70 of 110 test answers were one and the same
string and ROUGE-L still rose, because the answers got shorter. These numbers, before and after
a stage, show such a collapse, and `collapse_reasons` names it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from pipeline.errors import InputError
from pipeline.evaluate.text import normalize_answer

COLLAPSED_SHARE = 0.3
"""Answers have collapsed when the most common answer is at least this share of all of them..."""
DISTINCT_2_FLOOR = 0.5
"""...or when distinct-2 fell below this fraction of the start model's."""
STATS = ("answer_tokens", "answer_words", "distinct_1", "distinct_2", "most_common_answer_share")


def distinct_n(answers: Sequence[Sequence[str]], n: int) -> float:
    """Unique n-grams / all n-grams, over every answer's words (Li et al., 2016); 0 if none."""
    grams = [tuple(words[i : i + n]) for words in answers for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def answer_stats(answers: Sequence[str], count_tokens: Callable[[str], int]) -> dict[str, float]:
    """Mean length in tokens (`count_tokens`) and in words, distinct-1 and distinct-2 over the
    normalised words, and the share of answers equal to the most common one (exact strings,
    surrounding whitespace stripped)."""
    if not answers:
        raise InputError("no answers to describe")
    words = [normalize_answer(a).split() for a in answers]
    _, top = Counter(a.strip() for a in answers).most_common(1)[0]
    return {
        "answer_tokens": sum(count_tokens(a) for a in answers) / len(answers),
        "answer_words": sum(map(len, words)) / len(answers),
        "distinct_1": distinct_n(words, 1),
        "distinct_2": distinct_n(words, 2),
        "most_common_answer_share": top / len(answers),
    }


def collapse_reasons(before: Mapping[str, float], after: Mapping[str, float]) -> list[str]:
    """Why the `after` answers count as collapsed (`answer_stats` of both); empty if they do not."""
    reasons = []
    if after["most_common_answer_share"] >= COLLAPSED_SHARE:
        reasons.append(
            f"{after['most_common_answer_share']:.0%} of the answers are one and the same "
            f"(before: {before['most_common_answer_share']:.0%}; threshold {COLLAPSED_SHARE:.0%})"
        )
    if after["distinct_2"] < DISTINCT_2_FLOOR * before["distinct_2"]:
        reasons.append(
            f"distinct-2 fell from {before['distinct_2']:.3f} to {after['distinct_2']:.3f} "
            f"(below {DISTINCT_2_FLOOR:.0%} of before)"
        )
    return reasons


def compare_answers(
    before: Sequence[str], after: Sequence[str], count_tokens: Callable[[str], int]
) -> tuple[dict[str, float], list[str]]:
    """`answer_stats` of both as `test_<stat>_before` / `test_<stat>_after`, and the reasons the
    after answers count as collapsed."""
    stats = {
        "before": answer_stats(before, count_tokens),
        "after": answer_stats(after, count_tokens),
    }
    metrics = {f"test_{k}_{when}": v for when, values in stats.items() for k, v in values.items()}
    return metrics, collapse_reasons(stats["before"], stats["after"])
