import pytest

import pipeline.stages.common as common


def test_init_from_names_a_stage_or_a_directory(default_config, tmp_path):
    config = {**default_config, "paths": {**default_config["paths"], "results": str(tmp_path)}}
    assert common.init_checkpoint_path(config, "pretrain") == tmp_path / "pretrain" / "model"
    assert common.init_checkpoint_path(config, "ckpts/gpt2") == common.Path("ckpts/gpt2")
    with pytest.raises(FileNotFoundError, match=r"init_from 'pretrain': no checkpoint at"):
        common.init_checkpoint(config, "pretrain")


def test_derived_training_values_stand_in_only_for_nulls(default_config):
    train = {**default_config["finetune-instruct"]["train"], "batch_size": 4, "eval_every": 7}
    cfg = common.train_settings(train, max_steps=50, eval_every=10)
    assert (cfg.max_steps, cfg.eval_every, cfg.batch_size) == (50, 7, 4)
