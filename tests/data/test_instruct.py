import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.instruct import (
    TEMPLATES,
    InstructionExample,
    bucketed_order,
    collate,
    count_truncated,
    encode_example,
    format_prompt,
    load_records,
    split_records,
)
from pipeline.data.tokenizer import END_OF_TEXT_ID, gpt2_tokenizer

MIRROR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATA = MIRROR / "instruction-data.json"
PREFERENCE = MIRROR / "instruction-data-with-preference.json"
ALPACA_HEAD = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def write(tmp_path, data, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def rec(instruction="Do it.", input="", output="Done."):
    return {"instruction": instruction, "input": input, "output": output}


# --- loading and validation -------------------------------------------------------------------


def test_load_valid_records(tmp_path):
    records = [rec(), rec(input="x"), {**rec(), "extra": 1}]
    valid, skipped = load_records(write(tmp_path, records))
    assert valid == records
    assert skipped == []


def test_invalid_records_are_all_listed(tmp_path):
    records = [
        rec(),
        {"instruction": "a", "input": ""},  # 1: missing output
        rec(input=3),  # 2: wrong type
        rec(instruction="  \n"),  # 3: blank instruction
        rec(),
        ["not", "an", "object"],  # 5
        {"input": None, "output": "o"},  # 6: two problems
    ]
    path = write(tmp_path, records)
    with pytest.raises(ValueError) as err:
        load_records(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "5 of 7 records invalid" in msg
    assert "record 1: missing key 'output'" in msg
    assert "record 2: 'input' is int, expected str" in msg
    assert "record 3: 'instruction' is empty" in msg
    assert "record 5: not an object (got array)" in msg
    assert "record 6: missing key 'instruction'; 'input' is null, expected str" in msg
    assert "record 0" not in msg and "record 4" not in msg

    valid, skipped = load_records(path, skip_invalid=True)
    assert valid == [records[0], records[4]]
    assert [i for i, _ in skipped] == [1, 2, 3, 5, 6]
    assert skipped[0] == (1, "missing key 'output'")


def test_long_error_lists_are_capped(tmp_path):
    path = write(tmp_path, [rec(output=i) for i in range(30)])
    with pytest.raises(ValueError, match=r"record 19: .*; \.\.\. and 10 more$") as err:
        load_records(path)
    assert "record 20:" not in str(err.value)


def test_required_keys_are_a_parameter(tmp_path):
    path = write(tmp_path, [{**rec(), "chosen": "c", "rejected": "r"}, rec()])
    required = ("instruction", "input", "output", "chosen", "rejected")
    with pytest.raises(ValueError, match="record 1: missing key 'chosen'; missing key 'rejected'"):
        load_records(path, required)
    valid, skipped = load_records(path, required, skip_invalid=True)
    assert len(valid) == 1 and skipped[0][0] == 1


def test_not_json_or_not_a_list(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        load_records(bad)
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list of records, got object"):
        load_records(write(tmp_path, {"a": 1}, "obj.json"))


# --- splitting ---------------------------------------------------------------------------------


def test_split_sizes_and_determinism():
    records = list(range(1100))
    train, val, test = split_records(records, seed=7)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert sorted(train + val + test) == records
    assert split_records(records, seed=7) == (train, val, test)
    assert split_records(records, seed=8) != (train, val, test)
    assert split_records(list(range(10)), 0.5, 0.5) == split_records(list(range(10)), 0.5, 0.5)
    assert [len(s) for s in split_records(list(range(3)), 0.5, 0.5)] == [2, 1, 0]
    with pytest.raises(ValueError, match="train \\+ val <= 1"):
        split_records(records, 0.9, 0.2)


def test_split_independent_of_hash_seed():
    code = (
        "from pipeline.data.instruct import split_records\n"
        "print(split_records([str(i) for i in range(50)], seed=3)[1])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1


@pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} not found")
def test_mirror_file_loads_and_splits():
    records, skipped = load_records(DATA)
    assert len(records) == 1100 and skipped == []
    train, val, test = split_records(records, seed=1234)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert split_records(records, seed=1234) == (train, val, test)
    if PREFERENCE.is_file():
        pref, _ = load_records(PREFERENCE, ("instruction", "input", "output", "chosen", "rejected"))
        assert len(pref) == 1100


# --- templates ---------------------------------------------------------------------------------


def test_alpaca_template_exact():
    assert format_prompt(rec("Add 2 and 3.", "", "5"), "alpaca") == (
        ALPACA_HEAD + "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert format_prompt(rec("Translate.", "Hallo {x}", "Hello"), "alpaca") == (
        ALPACA_HEAD + "\n\n### Instruction:\nTranslate.\n\n### Input:\nHallo {x}\n\n### Response:\n"
    )


def test_phi3_template_exact():
    assert format_prompt(rec("Add 2 and 3.", "  ", "5"), "phi3") == (
        "<|user|>\nAdd 2 and 3.\n<|assistant|>\n"
    )
    assert format_prompt(rec("Translate.", "Hallo", "Hello"), "phi3") == (
        "<|user|>\nTranslate.\nHallo\n<|assistant|>\n"
    )


def test_unknown_template():
    assert TEMPLATES == ("alpaca", "phi3")
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'; known: alpaca, phi3"):
        format_prompt(rec(), "chatml")


def test_encode_example_with_gpt2(mirror):
    tok = gpt2_tokenizer(mirror / "gpt2-bpe")
    record = rec("Say <|endoftext|>.", "", "Okay.")
    ex = encode_example(record, "alpaca", tok)
    assert tok.decode(list(ex.prompt_ids)) == format_prompt(record, "alpaca")
    assert tok.decode(list(ex.response_ids)) == "Okay."
    assert END_OF_TEXT_ID not in ex.prompt_ids
    assert ex.num_tokens == len(ex.prompt_ids) + len(ex.response_ids) + 1
    chosen = encode_example({**record, "chosen": "Yes."}, "phi3", tok, response_key="chosen")
    assert tok.decode(list(chosen.response_ids)) == "Yes."


# --- collate -----------------------------------------------------------------------------------

EOS = 99
X = -100
# sequences: [1 2 3 | 4 5 | 99] (prompt 3, response 2) and [6 7 | 8 | 99] (prompt 2, response 1)
EXAMPLES = [InstructionExample((1, 2, 3), (4, 5)), InstructionExample((6, 7), (8,))]


def run(context_length=16, mask_prompt=True, examples=EXAMPLES):
    return collate(
        examples, context_length=context_length, eos_id=EOS, pad_id=EOS, mask_prompt=mask_prompt
    )


def test_collate_without_prompt_mask():
    inputs, targets = run(mask_prompt=False)
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, EOS, EOS]]
    # the first end-of-text is learned (stop here); the padding after it is not
    assert targets.tolist() == [[2, 3, 4, 5, EOS], [7, 8, EOS, X, X]]


def test_collate_with_prompt_mask():
    inputs, targets = run()
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, EOS, EOS]]
    # targets that are prompt tokens (2, 3 and 7) are masked
    assert targets.tolist() == [[X, X, 4, 5, EOS], [X, 8, EOS, X, X]]


def test_collate_truncates_to_context_length():
    inputs, targets = run(context_length=3)
    assert inputs.tolist() == [[1, 2, 3], [6, 7, 8]]
    assert targets.tolist() == [[X, X, 4], [X, 8, EOS]]
    assert count_truncated(EXAMPLES, 3) == 1
    assert count_truncated(EXAMPLES, 4) == 1
    assert count_truncated(EXAMPLES, 5) == 0


def test_collate_keeps_a_learned_target_when_the_prompt_fills_the_window():
    # window of 3 tokens: the first has only prompt tokens left, so it slides to [2 3 | 4]
    inputs, targets = run(context_length=2)
    assert inputs.tolist() == [[2, 3], [6, 7]]
    assert targets.tolist() == [[X, 4], [X, 8]]
    inputs, targets = run(context_length=2, mask_prompt=False)
    assert inputs.tolist() == [[2, 3], [6, 7]]
    assert targets.tolist() == [[3, 4], [7, 8]]
    # prompt longer than the window, empty response: the end-of-text is the learned target
    long = [InstructionExample(tuple(range(1, 9)), ())]
    inputs, targets = run(context_length=3, examples=long)
    assert inputs.tolist() == [[6, 7, 8]]
    assert targets.tolist() == [[X, X, EOS]]


def test_collate_never_gives_a_nan_loss():
    rng = random.Random(0)
    examples = [
        InstructionExample(
            tuple(rng.randrange(98) for _ in range(rng.randrange(1, 40))),
            tuple(rng.randrange(98) for _ in range(rng.randrange(0, 5))),
        )
        for _ in range(64)
    ]
    for context_length in (1, 2, 5, 17, 64):
        for lo in range(0, 64, 4):
            inputs, targets = run(context_length, examples=examples[lo : lo + 4])
            assert inputs.shape == targets.shape and inputs.shape[1] <= context_length
            assert ((targets != X).sum(dim=1) >= 1).all()
            logits = torch.zeros(*targets.shape, 100)
            assert torch.isfinite(F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_collate_errors():
    with pytest.raises(ValueError, match="at least one example"):
        collate([], context_length=4, eos_id=EOS)
    with pytest.raises(ValueError, match="context_length must be >= 1"):
        collate(EXAMPLES, context_length=0, eos_id=EOS)
    with pytest.raises(ValueError, match="at least one prompt token"):
        InstructionExample((), (1,))


# --- bucketing ---------------------------------------------------------------------------------


def test_bucketed_order():
    rng = random.Random(0)
    lengths = [rng.randrange(10, 300) for _ in range(1003)]
    order = bucketed_order(lengths, 8, 42, bucket_batches=10)
    assert sorted(order) == list(range(1003))
    assert order == bucketed_order(lengths, 8, random.Random(42), bucket_batches=10)
    assert order != bucketed_order(lengths, 8, 43, bucket_batches=10)
    batches = [order[i : i + 8] for i in range(0, 1003, 8)]
    assert len(batches[-1]) == 3
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    shuffled = list(range(1003))
    random.Random(1).shuffle(shuffled)
    plain = [shuffled[i : i + 8] for i in range(0, 1003, 8)]
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain)
    assert spread < plain_spread / 5
    assert bucketed_order([], 4, 0) == []
    with pytest.raises(ValueError, match="batch_size"):
        bucketed_order(lengths, 0, 0)
