"""GPT-2 from OpenAI's TensorFlow checkpoint, the variables mapped and checked with transformers."""

import sys

import numpy as np
import pytest
import torch
from gpt2_reference import SHAPES, hf_model, logits_of, make_tf_dir, tf_variables

from pipeline.model import GPTConfig, gpt2_import, tf_checkpoint


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_tf_mapping_matches_transformers_logits(tmp_path, monkeypatch, shape):
    reference = hf_model(shape, seed=7)
    variables = tf_variables(reference)
    src = make_tf_dir(tmp_path / "tf", reference)
    read = []
    monkeypatch.setattr(
        tf_checkpoint, "_read_tf_variables", lambda prefix: read.append(prefix) or variables
    )
    model = tf_checkpoint.load_tf_gpt2(src).eval()
    assert read == [src / "model.ckpt"]
    assert (model.config.dropout, model.config.attn_dropout) == (0.0, 0.0)
    idx = torch.randint(0, shape[4], (2, shape[3]))
    torch.testing.assert_close(logits_of(model, idx), logits_of(reference, idx), atol=1e-5, rtol=0)


def test_tf_mapping_reports_every_problem_by_tf_name():
    reference = hf_model(SHAPES[1])
    variables = tf_variables(reference)
    del variables["model/h1/mlp/c_fc/b"]
    variables["model/h0/attn/c_attn/w"] = variables["model/h0/attn/c_attn/w"][0]  # no leading 1
    variables["model/h0/attn/c_attn/w/Adam"] = np.zeros(3)
    config = GPTConfig(vocab_size=97, context_length=16, n_layer=2, n_head=4, n_embd=32)
    with pytest.raises(ValueError) as err:
        tf_checkpoint.state_dict_from_tf(variables, config, source="ckpt/model.ckpt")
    msg = str(err.value)
    assert "ckpt/model.ckpt" in msg
    assert "missing: model/h1/mlp/c_fc/b" in msg
    assert "unexpected: model/h0/attn/c_attn/w/Adam" in msg
    assert "model/h0/attn/c_attn/w (expected (1, 32, 96), found (32, 96))" in msg


def test_tf_without_tensorflow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    src = make_tf_dir(tmp_path / "tf", hf_model(SHAPES[0]))
    with pytest.raises(ImportError, match=r"pip install 'gpt-pipeline\[tf\]'") as err:
        tf_checkpoint.load_tf_gpt2(src)
    assert isinstance(err.value, tf_checkpoint.TensorFlowRequiredError)
    with pytest.raises(tf_checkpoint.TensorFlowRequiredError):
        gpt2_import.import_gpt2(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
