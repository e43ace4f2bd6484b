import logging

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.tokenizer import gpt2_tokenizer
from pipeline.errors import InputError
from pipeline.evaluate.diversity import answer_stats, collapse_reasons, distinct_n
from pipeline.stages.common import report_answer_diversity
from pipeline.tracking import WARNING_TAG, StageRun

VARIED = ["The cat sat.", "A dog ran home", "Water boils at 100 degrees", "Paris"]
COLLAPSED = ["The chemical'.", "The chemical'.", "The chemical'.", "Paris"]


def test_distinct_n_counts_unique_ngrams_over_all_answers():
    answers = [["the", "cat", "the", "cat"], ["the", "dog"]]
    # unigrams: the cat the cat the dog -> 3 unique of 6; bigrams: (the cat) (cat the)
    # (the cat) (the dog) -> 3 unique of 4; an answer shorter than n adds no n-gram
    assert distinct_n(answers, 1) == pytest.approx(3 / 6)
    assert distinct_n(answers, 2) == pytest.approx(3 / 4)
    assert distinct_n([["one"], []], 2) == 0.0


def test_answer_stats_on_a_hand_made_list():
    stats = answer_stats(COLLAPSED, count_tokens=lambda a: len(a))  # characters stand in
    assert stats["answer_tokens"] == pytest.approx((3 * 14 + 5) / 4)
    # normalised words: "the chemical'" x3 and "paris": 7 words, 3 unique; bigrams 3, 1 unique
    assert stats["answer_words"] == pytest.approx(7 / 4)
    assert stats["distinct_1"] == pytest.approx(3 / 7)
    assert stats["distinct_2"] == pytest.approx(1 / 3)
    assert stats["most_common_answer_share"] == pytest.approx(3 / 4)
    assert answer_stats(VARIED, len)["most_common_answer_share"] == pytest.approx(1 / 4)
    with pytest.raises(InputError, match="no answers"):
        answer_stats([], len)


def test_collapse_is_a_share_of_one_answer_or_a_halved_distinct_2():
    varied, collapsed = answer_stats(VARIED, len), answer_stats(COLLAPSED, len)
    assert collapse_reasons(varied, varied) == []
    reasons = collapse_reasons(varied, collapsed)
    assert len(reasons) == 2 and reasons[0].startswith("75% of the answers are one and the same")
    assert "distinct-2 fell from 1.000 to 0.333" in reasons[1]
    shorter = {**varied, "distinct_2": 0.49}  # no repeated answer, but far fewer word pairs
    assert collapse_reasons(varied, shorter) == [
        "distinct-2 fell from 1.000 to 0.490 (below 50% of before)"
    ]


@pytest.fixture
def tracker(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("diversity"))
    return StageRun(client, run.info.run_id)


@pytest.mark.parametrize("after", ["varied", "collapsed"])
def test_collapsed_answers_warn_in_the_log_and_mlflow(after, tracker, mirror, caplog):
    answers = VARIED if after == "varied" else COLLAPSED
    tokenizer = gpt2_tokenizer(mirror / "gpt2-bpe")
    with caplog.at_level(logging.INFO, logger="pipeline.stages"):
        metrics = report_answer_diversity("align-dpo", VARIED, answers, tokenizer, tracker)
    assert metrics["test_answer_tokens_before"] == pytest.approx(
        sum(len(tokenizer.encode_ordinary(a)) for a in VARIED) / 4
    )
    assert metrics["test_most_common_answer_share_after"] == (0.25 if after == "varied" else 0.75)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    tags = tracker.client.get_run(tracker.run_id).data.tags
    if after == "varied":
        assert warnings == [] and WARNING_TAG not in tags
    else:
        assert len(warnings) == 1 and warnings[0].startswith(
            "align-dpo: the test answers collapsed"
        )
        assert tags[WARNING_TAG] == warnings[0]
