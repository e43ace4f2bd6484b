import pytest

from pipeline.evaluate.text import (
    corpus_scores,
    cut_at_stops,
    exact_match,
    extract_response,
    normalize_answer,
    rouge_l_f1,
)


def test_normalize_answer():
    assert normalize_answer("  The  Answer\tis\n42. ") == "the answer is 42"
    assert normalize_answer('"Paris!"') == "paris"
    assert normalize_answer("«Yes», he said…") == "yes», he said"
    assert normalize_answer("4,500 don't e.g.") == "4,500 don't e.g"
    assert normalize_answer(" ... ") == ""


def test_exact_match():
    assert exact_match("The cat.", "the CAT") == 1.0
    assert exact_match("the cat", "the cats") == 0.0
    assert exact_match("", "  ") == 1.0


def test_rouge_l_hand_computed():
    # "the cat sat on the mat" vs "the cat is on the mat": LCS "the cat on the mat" = 5,
    # P = 5/6, R = 5/6, F1 = 5/6
    assert rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # "a b c d" vs "a c e": LCS "a c" = 2, P = 2/4, R = 2/3, F1 = 2PR/(P+R) = (2/3)/(7/6) = 4/7
    assert rouge_l_f1("a b c d", "a c e") == pytest.approx(4 / 7)
    # "a b" vs "b a": LCS 1 (order matters), P = R = 1/2, F1 = 1/2
    assert rouge_l_f1("a b", "b a") == pytest.approx(0.5)
    # "x y z" vs "x": LCS 1, P = 1/3, R = 1, F1 = (2/3)/(4/3) = 1/2
    assert rouge_l_f1("x y z", "x") == pytest.approx(0.5)
    # case and punctuation around words are ignored: "Hello, World!" vs "hello world" = 1
    assert rouge_l_f1("Hello, World!", "hello world") == 1.0
    assert rouge_l_f1("one two", "three four") == 0.0


def test_rouge_l_empty():
    assert rouge_l_f1("", "") == 1.0
    assert rouge_l_f1(" . ", "") == 1.0
    assert rouge_l_f1("", "the cat") == 0.0
    assert rouge_l_f1("the cat", "") == 0.0


def test_corpus_scores():
    scores = corpus_scores(
        ["The cat.", "the cat sat on the mat"], ["the cat", "the cat is on the mat"]
    )
    assert scores == {
        "exact_match": pytest.approx(0.5),
        "rouge_l_f1": pytest.approx((1 + 5 / 6) / 2),
    }
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        corpus_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        corpus_scores([], [])


def test_extract_response_cuts_the_continuation_at_the_first_new_turn():
    # a small model answering, then starting another turn: the answer is the text before it
    assert (
        extract_response("The answer is 4.\n\n### Response:\nfoo", "alpaca") == "The answer is 4."
    )
    assert extract_response(" The answer is 5.\n### Input:\nx", "alpaca") == "The answer is 5."
    assert extract_response("### Response:\n5", "alpaca") == "5"  # a repeated header is dropped
    assert extract_response("Hi there<|end|>\n<|user|>\nmore", "phi3") == "Hi there"
    assert extract_response("<|assistant|>\nA.<|user|>", "phi3") == "A."
    assert cut_at_stops("abc", ["x"]) == "abc" and cut_at_stops("a#b#", ["#"]) == "a"
    with pytest.raises(ValueError, match="unknown prompt template"):
        extract_response("x", "nope")
