import json

import pytest

from pipeline.config import (
    SCHEMA_PATH,
    ConfigError,
    apply_override,
    deep_merge,
    flatten,
    load_config,
    validate,
    write_config,
)


def test_default_config_is_valid_and_schema_is_draft_2020_12(default_config):
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    validate(default_config)
    assert default_config["model"]["attention"] == "fused"


def test_unknown_key_is_named_with_the_allowed_ones(repo):
    with pytest.raises(ConfigError) as err:
        load_config([repo / "config.yaml"], ["pretrain.train.max_step=5"])
    message = str(err.value)
    assert "pretrain.train.max_step: unknown key" in message
    assert "max_steps" in message


def test_wrong_type_is_named(repo):
    with pytest.raises(ConfigError, match=r"pretrain\.train\.lr: 'fast' is not of type 'number'"):
        load_config([repo / "config.yaml"], ["pretrain.train.lr=fast"])


def test_enum_value_is_named(repo):
    with pytest.raises(ConfigError, match=r"model\.attention: 'flash' is not one of"):
        load_config([repo / "config.yaml"], ["model.attention=flash"])


def test_dotted_top_level_key_points_to_configfile(default_config):
    bad = {**default_config, "pretrain.train.max_steps": 3}
    with pytest.raises(ConfigError, match="--configfile"):
        validate(bad)


def test_later_files_and_overrides_win(tmp_path, repo):
    user = tmp_path / "user.yaml"
    user.write_text("pretrain:\n  train:\n    max_steps: 7\nmodel:\n  n_layer: 2\n")
    config = load_config([repo / "config.yaml", user], ["pretrain.train.batch_size=3"])
    assert config["pretrain"]["train"]["max_steps"] == 7
    assert config["pretrain"]["train"]["batch_size"] == 3
    assert config["pretrain"]["train"]["lr"] == 1.0e-3  # untouched keys survive the merge
    assert config["model"] == {"preset": "tiny", "attention": "fused", "n_layer": 2}


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config([tmp_path / "missing.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config([broken])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="scalar.yaml: expected a mapping"):
        load_config([scalar])


def test_override_syntax():
    assert apply_override({"a": {"b": 1}}, "a.c=true") == {"a": {"b": 1, "c": True}}
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        apply_override({}, "novalue")


def test_deep_merge_replaces_lists_and_merges_mappings():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    assert deep_merge(base, {"a": {"y": [3]}}) == {"a": {"x": 1, "y": [3]}, "b": 1}
    assert base["a"]["y"] == [1, 2]


def test_flatten_for_mlflow_params():
    assert flatten({"a": {"b": 1, "c": [{"d": 2}]}, "e": None, "f": []}) == {
        "a.b": 1,
        "a.c.0.d": 2,
        "e": None,
        "f": [],
    }


def test_write_config_keeps_an_unchanged_file(tmp_path):
    path = tmp_path / "c.yaml"
    write_config({"a": 1}, path)
    before = path.stat().st_mtime_ns
    write_config({"a": 1}, path)
    assert path.stat().st_mtime_ns == before
    write_config({"a": 2}, path)
    assert "a: 2" in path.read_text()


def test_corpus_must_name_a_source(repo):
    expected = r"prepare\.corpus\.0: 'the-verdict' is not a data.sources name"
    with pytest.raises(ConfigError, match=expected):
        load_config([repo / "config.yaml"], ["prepare.corpus=[the-verdict]"])


_SCHEMA_SECTIONS = json.loads(SCHEMA_PATH.read_text())["properties"]


@pytest.mark.parametrize(
    "preset",
    [
        pytest.param("gpt2-124m-classifier.yaml", id="gpt2-124m-classifier"),
        pytest.param(
            "gpt2-355m-instruct.yaml",
            id="gpt2-355m-instruct",
            marks=pytest.mark.skipif(
                "finetune_instruct" not in _SCHEMA_SECTIONS,
                reason="the finetune_instruct stage is not in the schema yet",
            ),
        ),
    ],
)
def test_book_preset_merged_over_the_defaults_is_valid(repo, preset):
    config = load_config([repo / "config.yaml", repo / "configs" / preset])
    size = preset.split("-")[0] + "-" + preset.split("-")[1]
    assert config["model"]["preset"] == config["pretrain"]["init_from"] == size
    assert config["model"]["attention"] == "sdpa"
    assert config["pretrain"]["continue_pretraining"] is False
