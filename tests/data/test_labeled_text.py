from collections import Counter

import pytest

from pipeline.data.labeled_text import (
    LabeledText,
    class_weights,
    label_counts,
    read_label_tab_text,
    read_texts,
    read_tsv,
    stratified_split,
    undersample,
    write_tsv,
)
from pipeline.errors import InputError


def test_quotes_and_tabs_inside_texts_are_kept(tmp_path):
    path = tmp_path / "sms"
    path.write_bytes(
        b'ham\t"Hi missed your call" she said\n'
        b"spam\tWIN\tcash now\t!\n"
        b'ham\tunbalanced " quote\r\n'
        b"\n"
    )
    assert read_label_tab_text(path) == [
        LabeledText("ham", '"Hi missed your call" she said'),
        LabeledText("spam", "WIN\tcash now\t!"),
        LabeledText("ham", 'unbalanced " quote'),
    ]


@pytest.mark.parametrize(
    "content, line",
    [(b"ham\tok\nno tab here\n", 2), (b"ham\tok\nspam\t   \n", 2), (b"\tno label\n", 1)],
)
def test_malformed_line_is_named(tmp_path, content, line):
    path = tmp_path / "sms"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"sms:{line}: expected 'label<TAB>text'"):
        read_label_tab_text(path)


def test_non_utf8_is_named_by_line(tmp_path):
    path = tmp_path / "sms"
    path.write_bytes(b"ham\tok\nham\tok\nspam\tbad \xff byte\n")
    with pytest.raises(ValueError, match=r"sms:3: not valid UTF-8"):
        read_label_tab_text(path)


def test_real_collection_parses_every_row(mirror):
    records = read_label_tab_text(mirror / "SMSSpamCollection")
    assert len(records) == 5574
    assert label_counts(records) == {"ham": 4827, "spam": 747}
    assert sum('"' in r.text for r in records) > 0


def make(counts: dict[str, int]) -> list[LabeledText]:
    return [LabeledText(label, f"{label} {i}") for label, n in counts.items() for i in range(n)]


def test_undersampling_balances_and_is_deterministic():
    records = make({"ham": 90, "spam": 12})
    balanced = undersample(records, seed=1)
    assert label_counts(balanced) == {"ham": 12, "spam": 12}
    assert undersample(records, seed=1) == balanced
    assert undersample(records, seed=2) != balanced
    assert set(balanced) <= set(records)


def test_stratified_split_keeps_proportions_and_is_deterministic():
    records = make({"ham": 100, "spam": 30})
    train, val, test = stratified_split(records, 0.7, 0.1, seed=5)
    assert label_counts(train) == {"ham": 70, "spam": 21}
    assert label_counts(val) == {"ham": 10, "spam": 3}
    assert label_counts(test) == {"ham": 20, "spam": 6}
    assert Counter(train + val + test) == Counter(records)
    assert stratified_split(records, 0.7, 0.1, seed=5) == (train, val, test)
    assert stratified_split(records, 0.7, 0.1, seed=6) != (train, val, test)
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(records, 0.9, 0.2, seed=5)


def test_class_weights_equalise_the_classes():
    weights = class_weights(make({"ham": 30, "spam": 10}), ["ham", "spam"])
    assert weights == pytest.approx([40 / 60, 40 / 20])
    with pytest.raises(ValueError, match="eggs"):
        class_weights(make({"ham": 3}), ["ham", "eggs"])


def test_tsv_round_trip_keeps_tabs_and_quotes(tmp_path):
    records = [LabeledText("spam", 'a\t"b"'), LabeledText("ham", "plain")]
    write_tsv(tmp_path / "s.tsv", records)
    assert (tmp_path / "s.tsv").read_text().splitlines()[0] == "label\ttext"
    assert read_tsv(tmp_path / "s.tsv") == records
    with pytest.raises(ValueError, match="line break"):
        write_tsv(tmp_path / "bad.tsv", [LabeledText("ham", "two\nlines")])


def test_tsv_errors_name_the_line(tmp_path):
    path = tmp_path / "in.tsv"
    path.write_text("id\ttext\n1\thello\n2\t \n")
    with pytest.raises(ValueError, match=r"in.tsv:3: empty text"):
        read_tsv(path, require_label=False)
    path.write_text("message\n")
    with pytest.raises(ValueError, match=r"in.tsv:1: header"):
        read_tsv(path, require_label=False)


def test_a_mislabeled_row_is_named_with_the_expected_labels(tmp_path, mirror):
    """One typo in 5,574 rows used to surface as "split gives an empty val split"."""
    lines = (mirror / "SMSSpamCollection").read_bytes().split(b"\n")
    lines[41] = b"spma\t" + lines[41].partition(b"\t")[2]
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(b"\n".join(lines))
    expected = (
        rf"{path}:42: label 'spma' is not one of the expected labels ham, spam "
        r"\(finetune-classifier\.labels\)"
    )
    with pytest.raises(InputError, match=expected):
        read_label_tab_text(path, ["ham", "spam"], "finetune-classifier.labels")
    assert len(read_label_tab_text(path)) == 5574  # without labels every label is taken


def test_an_expected_label_without_records_is_named(tmp_path):
    path = tmp_path / "sms"
    path.write_text("ham\tok\nham\tfine\n")
    with pytest.raises(InputError, match=r"sms: no records labelled spam \(labels\)"):
        read_label_tab_text(path, ["ham", "spam"])


@pytest.mark.parametrize("content", ["", "label\ttext\n", "id\ttext\n\n"])
def test_a_texts_file_without_texts_is_named(tmp_path, content):
    path = tmp_path / "inputs.txt"
    path.write_text(content)
    with pytest.raises(InputError, match=rf"{path}: no texts to classify; expected one text a"):
        read_texts(path)


def test_texts_are_read_one_a_line_or_from_the_text_column(tmp_path):
    lines, tsv = tmp_path / "a.txt", tmp_path / "b.tsv"
    lines.write_text("one\ntwo\n")
    tsv.write_text("id\ttext\n1\tthree\n")
    assert (read_texts(lines), read_texts(tsv)) == (["one", "two"], ["three"])
