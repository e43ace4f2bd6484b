import dataclasses

import pytest

import pipeline.stages.common as common
from pipeline.settings.load import typed_config


def test_init_from_names_a_stage_or_a_directory(default_config, tmp_path):
    config = typed_config(
        {**default_config, "paths": {**default_config["paths"], "results": str(tmp_path)}}
    )
    assert common.init_checkpoint_path(config, "pretrain") == tmp_path / "pretrain" / "model"
    assert common.init_checkpoint_path(config, "ckpts/gpt2") == common.Path("ckpts/gpt2")
    with pytest.raises(FileNotFoundError, match=r"init_from 'pretrain': no checkpoint at"):
        common.init_checkpoint(config, "pretrain")


def test_init_from_finds_gpt2_weights_by_name_as_pretrain_does(default_config, tmp_path):
    config = typed_config(
        {**default_config, "paths": {**default_config["paths"], "weights": str(tmp_path)}}
    )
    key = "finetune-instruct.init_from"
    with pytest.raises(
        FileNotFoundError,
        match=r"^finetune-instruct\.init_from 'gpt2-medium': no weights at .*gpt2-355m or .*"
        r"hf download openai-community/gpt2-medium .*; or set finetune-instruct\.init_from to",
    ):
        common.init_checkpoint(config, "gpt2-medium", key)
    (tmp_path / "gpt2-medium").mkdir()
    assert common.init_checkpoint(config, "gpt2-355m", key) == tmp_path / "gpt2-medium"


def test_derived_training_values_stand_in_only_for_nulls(default_config):
    train = typed_config(default_config).sections["finetune-instruct"].train
    train = dataclasses.replace(train, batch_size=4, eval_every=7)
    cfg, steps_per_epoch = common.epoch_train_settings(train, epochs=5, batches_per_epoch=10)
    assert (cfg.max_steps, cfg.eval_every, cfg.batch_size) == (50, 7, 4)
    assert steps_per_epoch == 10
