import pytest
import torch

import pipeline.stages.common as common


def test_fused_attention_off_the_cpu_fails_before_any_work(default_config, monkeypatch):
    monkeypatch.setattr(common, "pick_device", lambda name: torch.device("cuda"))
    with pytest.raises(ValueError, match="model.attention: 'fused' has a CPU kernel only"):
        common.stage_device(default_config)
    sdpa = {**default_config, "model": {**default_config["model"], "attention": "sdpa"}}
    assert common.stage_device(sdpa).type == "cuda"


def test_init_from_names_a_stage_or_a_directory(default_config, tmp_path):
    config = {**default_config, "paths": {**default_config["paths"], "results": str(tmp_path)}}
    assert common.init_checkpoint_path(config, "pretrain") == tmp_path / "pretrain" / "model"
    assert common.init_checkpoint_path(config, "ckpts/gpt2") == common.Path("ckpts/gpt2")
    with pytest.raises(FileNotFoundError, match=r"init_from 'pretrain': no checkpoint at"):
        common.init_checkpoint(config, "pretrain")


def test_derived_training_values_yield_to_the_config():
    cfg = common.train_config({"batch_size": 4, "eval_every": 7}, 3, max_steps=50, eval_every=10)
    assert (cfg.max_steps, cfg.eval_every, cfg.batch_size, cfg.seed) == (50, 7, 4, 3)
