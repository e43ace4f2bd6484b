import dataclasses

import jsonschema
import pytest

from pipeline.config import (
    ConfigError,
    apply_override,
    deep_merge,
    defaults,
    flatten,
    json_schema,
    load_config,
    render_defaults,
    validate,
    write_config,
)
from pipeline.settings import ATTENTION_CHOICES, TrainSettings
from pipeline.stages.registry import STAGES, training_stages


def test_default_config_is_valid_and_schema_is_draft_2020_12(default_config):
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    validate(default_config)
    assert default_config["model"]["attention"] == "auto"


def test_config_yaml_is_the_generated_defaults(repo):
    """config.yaml is written by `python -m pipeline config --defaults`: it cannot drift from
    the settings classes, and it holds every setting."""
    assert (repo / "config.yaml").read_text() == render_defaults()
    assert load_config([repo / "config.yaml"]) == defaults()


def test_every_effective_value_is_in_the_resolved_config(tmp_path):
    """Settings a config leaves out are filled in with their defaults, so the resolved config
    (what the jobs read and results/config.resolved.yaml shows) holds every value."""
    user = tmp_path / "user.yaml"
    user.write_text("finetune-instruct:\n  train:\n    lr: 1.0e-4\n")
    config = load_config([user])
    assert config == deep_merge(defaults(), {"finetune-instruct": {"train": {"lr": 1.0e-4}}})
    train = config["finetune-classifier"]["train"]
    assert (train["beta1"], train["beta2"], train["grad_accum_steps"]) == (0.9, 0.95, 1)
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    for name in training_stages():
        assert set(config[name]["train"]) == fields, name


def test_the_schemas_enums_are_the_codes_registries():
    from pipeline.model import ATTENTION_BACKENDS, PRESETS

    props = json_schema()["properties"]
    assert props["model"]["properties"]["preset"]["enum"] == list(PRESETS)
    assert set(props["model"]["properties"]["attention"]["enum"]) == {"auto", *ATTENTION_BACKENDS}
    assert set(ATTENTION_CHOICES) == {"auto", *ATTENTION_BACKENDS}
    sections = [name for name, stage in STAGES.items() if stage.settings is not None]
    assert set(sections) <= set(props)
    assert list(props["resources"]["properties"]) == ["prepare", *training_stages()]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune-classifier.train.lr=0", r"finetune-classifier\.train\.lr: 0 is less than or"),
        ("align-dpo.train.eval_every=0", r"align-dpo\.train\.eval_every: 0 is less than"),
        ("pretrain.train.log_every=0", r"pretrain\.train\.log_every: 0 is less than"),
        ("pretrain.train.grad_accum_steps=0", r"grad_accum_steps: 0 is less than"),
        ("pretrain.train.compile=1", r"pretrain\.train\.compile: 1 is not of type 'boolean'"),
        ("pretrain.train.precision=fp16", r"precision: 'fp16' is not one of"),
        ("pretrain.train.max_steps=null", r"pretrain\.train\.max_steps: None is not of type"),
    ],
)
def test_one_set_of_bounds_for_every_stages_training_settings(repo, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([repo / "config.yaml"], [override])


def test_old_section_spellings_are_pointed_to_the_stage_name(repo):
    with pytest.raises(ConfigError, match=r"finetune_instruct: unknown key \(stage sections are "
                       r"spelt like the stage: finetune-instruct\)"):  # fmt: skip
        load_config([repo / "config.yaml"], ["finetune_instruct.epochs=3"])


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
    assert config["model"]["n_layer"] == 2 and config["model"]["preset"] == "tiny"


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


@pytest.mark.parametrize("preset", ["gpt2-124m-classifier.yaml", "gpt2-355m-instruct.yaml"])
def test_book_preset_merged_over_the_defaults_is_valid(repo, preset):
    config = load_config([repo / "config.yaml", repo / "configs" / preset])
    size = preset.split("-")[0] + "-" + preset.split("-")[1]
    assert config["model"]["preset"] == config["pretrain"]["init_from"] == size
    assert config["model"]["attention"] == "auto"  # sdpa on a GPU
    assert config["pretrain"]["continue_pretraining"] is False
