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


def test_derived_training_values_stand_in_only_for_nulls(default_config):
    train = typed_config(default_config).sections["finetune-instruct"].train
    train = dataclasses.replace(train, batch_size=4, eval_every=7)
    cfg, steps_per_epoch = common.epoch_train_settings(train, epochs=5, batches_per_epoch=10)
    assert (cfg.max_steps, cfg.eval_every, cfg.batch_size) == (50, 7, 4)
    assert steps_per_epoch == 10
