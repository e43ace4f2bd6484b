import dataclasses
import shutil

import jsonschema
import pytest
import yaml

from pipeline.settings import ATTENTION_CHOICES, TrainSettings
from pipeline.settings.load import (
    ConfigError,
    apply_override,
    deep_merge,
    defaults,
    json_schema,
    load_config,
    render_defaults,
    resolve,
    validate,
    write_config,
)
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
    assert list(props["resources"]["properties"]) == ["tokenizer", "prepare", *training_stages()]


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


def test_a_file_that_is_no_config_file_is_named_not_its_keys(repo, tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"train_loss": 4.9, "val_loss": 5.2, "steps": 500, "epochs": 1.6}')
    with pytest.raises(ConfigError, match=r"metrics.json: not a config file \(it holds") as err:
        load_config([repo / "config.yaml", metrics])
    assert "unknown key" not in str(err.value)
    typo = tmp_path / "typo.yaml"
    typo.write_text("pretrian: {epochs: 1}\nfinetune_instruct: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=r"pretrian: unknown key"):  # near misses: typos
        load_config([repo / "config.yaml", typo])


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
    user.write_text("pretrain:\n  train:\n    max_steps: 70\nmodel:\n  n_layer: 2\n")
    config = load_config([repo / "config.yaml", user], ["pretrain.train.batch_size=3"])
    assert config["pretrain"]["train"]["max_steps"] == 70
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


def test_the_book_config_merged_over_the_defaults_is_valid(repo):
    """configs/book.yaml: 124M loaded by pretrain and fine-tuned as the classifier, the 355M's
    own weights instruction-tuned, then aligned (its run: tests/test_book_config.py)."""
    config = load_config([repo / "config.yaml", repo / "configs" / "book.yaml"])
    assert config["model"]["preset"] == config["pretrain"]["init_from"] == "gpt2-124m"
    assert config["finetune-classifier"]["init_from"] == "pretrain"
    assert config["finetune-instruct"]["init_from"] == "gpt2-355m"
    assert config["align-dpo"]["init_from"] == "finetune-instruct"


def test_an_exponent_without_a_dot_is_a_number_in_files_and_set(tmp_path, repo):
    """PyYAML (YAML 1.1) reads `1e-3` as a string; users write learning rates that way."""
    user = tmp_path / "user.yaml"
    user.write_text("pretrain:\n  train:\n    lr: 1e-3\n    min_lr: 5E-5\n    max_steps: 1e3\n")
    config = load_config([repo / "config.yaml", user], ["finetune-instruct.train.lr=5E-4"])
    train = config["pretrain"]["train"]
    assert (train["lr"], train["min_lr"], train["max_steps"]) == (1e-3, 5e-5, 1000)
    assert type(train["max_steps"]) is int  # an integer setting gets an int
    assert config["finetune-instruct"]["train"]["lr"] == 5e-4
    assert apply_override({}, "a=1.0e3") == {"a": 1000.0}  # PyYAML wants 1.0e+3
    assert apply_override({}, "a=1e") == {"a": "1e"}  # not a number: stays a string


def test_a_numeric_string_from_snakemakes_yaml_is_a_number_only_if_it_is_a_literal():
    """Snakemake loads `--configfile` with YAML 1.1 and hands `resolve` the string '1e-3'."""
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}  # what Snakemake's loader yields
    config = resolve({"pretrain": {"train": {"lr": "1e-3", "warmup_steps": "5"}}})
    assert (config["pretrain"]["train"]["lr"], config["pretrain"]["train"]["warmup_steps"]) == (
        1e-3,
        5,
    )
    for bad in ("fast", "1e-3x", "nan", "inf", "1_000"):
        with pytest.raises(ConfigError, match=rf"pretrain\.train\.lr: '{bad}' is not of type"):
            resolve({"pretrain": {"train": {"lr": bad}}})
    with pytest.raises(ConfigError, match=r"pretrain\.sample_prompt: 1\.5 is not of type"):
        resolve({"pretrain": {"sample_prompt": 1.5}})  # a string setting is not coerced either
    assert resolve({"pretrain": {"sample_prompt": "1e3"}})["pretrain"]["sample_prompt"] == "1e3"


def test_a_malformed_set_value_names_the_key_and_the_value():
    with pytest.raises(ConfigError, match=r"--set pretrain\.train\.lr: value '\[1e-3' is not val"):
        apply_override({}, "pretrain.train.lr=[1e-3")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["finetune-instruct.train.min_lr=0.01", "finetune-instruct.train.lr=1e-3"],
            r"finetune-instruct\.train: min_lr \(0\.01\) must be ≤ lr \(0\.001\)",
        ),
        (
            ["align-dpo.train.max_steps=10", "align-dpo.train.warmup_steps=10"],
            r"align-dpo\.train: warmup_steps \(10\) must be < max_steps \(10\)",
        ),
        (
            ["finetune-classifier.split={train: 0.8, val: 0.2}"],
            r"finetune-classifier\.split: train \(0\.8\) \+ val \(0\.2\) must be < 1",
        ),
        (
            ["finetune-instruct.split.train=0.9", "finetune-instruct.split.val=0.15"],
            r"finetune-instruct\.split: train \(0\.9\) \+ val \(0\.15\) must be < 1",
        ),
        (["align-dpo.split.val=0.5"], r"align-dpo\.split: train \(0\.85\) \+ val \(0\.5\)"),
        (["model.n_head=5"], r"model: n_embd \(128\) must be divisible by n_head \(5\)"),
        (
            ["finetune-classifier.positive_label=spma"],
            r"finetune-classifier\.positive_label: 'spma' is not one of finetune-classifier\.labels"
            r" \(ham, spam\)",
        ),
        (
            ["finetune-instruct.init_from=scratch"],
            r"finetune-instruct\.init_from: 'scratch' is pretrain's \(random weights\); a "
            r"fine-tuning stage starts from weights: a stage name",
        ),
    ],
)
def test_settings_that_contradict_each_other_are_named(repo, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([repo / "config.yaml"], overrides)


def test_cross_field_checks_pass_what_is_consistent(repo):
    fine = ["pretrain.train.min_lr=1e-3", "pretrain.train.warmup_steps=249", "model.n_head=8"]
    train = load_config([repo / "config.yaml"], fine)["pretrain"]["train"]
    assert train["min_lr"] == train["lr"] and train["warmup_steps"] == 249
    unbounded = ["finetune-instruct.train.warmup_steps=1000"]  # max_steps null: epochs decide
    config = load_config([repo / "config.yaml"], unbounded)
    assert config["finetune-instruct"]["train"]["max_steps"] is None


def test_snakemake_configfile_takes_an_exponent_without_a_dot(tmp_path, repo):
    """Snakemake reads `--configfile` itself (YAML 1.1: '1e-3' is a string) and hands the dict
    to `resolve`: the value is checked, compared and used as the number it is."""
    from snakemake_runs import snakemake

    for name in ("Snakefile", "config.yaml"):
        shutil.copy(repo / name, tmp_path / name)
    (tmp_path / "lr.yaml").write_text("pretrain:\n  train:\n    lr: 1e-3\n    min_lr: 5E-5\n")
    target = ("--", "results/pretrain/metrics.json")
    assert snakemake(tmp_path, "-n", *target, configfiles=("lr.yaml",)).returncode == 0
    (tmp_path / "bad.yaml").write_text("pretrain:\n  train:\n    lr: 1e-3\n    min_lr: 1e-2\n")
    failed = snakemake(tmp_path, "-n", *target, configfiles=("bad.yaml",), check=False)
    assert failed.returncode != 0
    assert "pretrain.train: min_lr (0.01) must be ≤ lr (0.001)" in failed.stdout + failed.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tokenizer.vocab_size=70000"], r"tokenizer\.vocab_size: 70000 is greater than the max"),
        (
            ["tokenizer.kind=trained", "finetune-classifier.init_from=gpt2-124m"],
            r"finetune-classifier\.init_from: 'gpt2-124m' is GPT-2's weights, which come with "
            r"GPT-2's tokenizer, but tokenizer\.kind is trained",
        ),
        (
            ["tokenizer.special_tokens=[<|x|>, <|endoftext|>]"],
            r"tokenizer\.special_tokens: the first must be <\|endoftext\|> .*not '<\|x\|>'",
        ),
        (
            ["tokenizer.fine_tuning=[pretrain]"],
            r"tokenizer\.fine_tuning: 'pretrain' is not a fine-tuning stage; expected one of: "
            r"finetune-classifier, finetune-instruct, align-dpo",
        ),
        (
            ["tokenizer.kind=trained", "tokenizer.vocab_size=257",
             "tokenizer.special_tokens=[<|endoftext|>, <|im_start|>]"],
            r"tokenizer\.vocab_size: 257 leaves no room for the 256 byte tokens and 2 special "
            r"tokens; expected at least 258",
        ),
    ],
)  # fmt: skip
def test_tokenizer_settings_that_contradict_each_other_are_one_line_each(repo, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config([repo / "config.yaml"], overrides)
    assert len(str(error.value).splitlines()) == 2  # the heading and the one problem


def test_tokenizer_settings_that_agree_are_accepted(repo):
    gpt2 = load_config([repo / "config.yaml"], ["finetune-classifier.init_from=gpt2-124m"])
    assert gpt2["tokenizer"]["kind"] == "gpt2"  # GPT-2's weights with GPT-2's tokenizer
    trained = load_config([repo / "config.yaml"], [
        "tokenizer.kind=trained", "tokenizer.vocab_size=258",
        "tokenizer.special_tokens=[<|endoftext|>, <|im_start|>]",
        "tokenizer.fine_tuning=[finetune-instruct, align-dpo]",
    ])  # fmt: skip
    assert trained["tokenizer"]["vocab_size"] == 258
    assert trained["finetune-classifier"]["init_from"] == "pretrain"
