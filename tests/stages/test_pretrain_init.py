"""pretrain.init_from: the pretrain stage started from GPT-2 weights (evaluated only, or trained
on), the architecture check, weights found by name under paths.weights, and the import-gpt2 /
export-hf commands, all checked against transformers on a tiny random GPT-2."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.data.loader import evaluation_batches
from pipeline.data.tokenizer import TOKENIZER_FILES, gpt2_tokenizer
from pipeline.data.tokens import load_tokens
from pipeline.io import sha256_file
from pipeline.model import GPTConfig, load_checkpoint, load_checkpoint_config
from pipeline.model.gpt2_import import weight_files
from pipeline.model.weights import init_from_input
from pipeline.settings import ModelSettings
from pipeline.settings.load import load_config, stage_config
from pipeline.stages import download, prepare, pretrain, tokenizer, training
from pipeline.stages.common import weights_sha256

transformers = pytest.importorskip("transformers")

CONTEXT = 32
MODEL = {"preset": "tiny", "n_layer": 2, "n_head": 2, "n_embd": 32, "context_length": CONTEXT}


def init_from(config: dict) -> tuple[str, Path]:
    """`init_from_input`'s arguments: pretrain.init_from and paths.weights."""
    return config["pretrain"]["init_from"], Path(config["paths"]["weights"])


TRAIN = {"max_steps": 2, "batch_size": 4, "eval_batches": 2, "eval_every": 2, "warmup_steps": 1}


@pytest.fixture(scope="module")
def hf_model():
    """A random GPT-2 of MODEL's shape, with non-trivial values everywhere (HF inits biases to 0
    and LayerNorm gains to 1, which would hide a swapped tensor)."""
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=CONTEXT, vocab_size=50257
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("ln" in name and name.endswith("weight")) else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape))
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, repo, mirror):
    """Token files and an MLflow store shared by every test (download + prepare run once)."""
    root = tmp_path_factory.mktemp("pretrain-init")
    overrides = [
        f"paths.data={root / 'data'}",
        f"paths.results={root / 'results'}",
        f"paths.resume={root / 'resume'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "tracking.log_model=false",
        f"data.mirrors={json.dumps([str(mirror)])}",
        "prepare.corpus=[the-verdict.txt]",
        f"model={json.dumps(MODEL)}",
        f"pretrain.train={json.dumps(TRAIN)}",
        "pretrain.sample_tokens=4",
        "pretrain.peak_flops=1.0e+11",
    ]
    config = load_config([repo / "config.yaml"], overrides)
    download.main(stage_config(config, "download"))
    tokenizer.main(stage_config(config, "tokenizer"))
    prepare.main(stage_config(config, "prepare"))
    return repo, overrides


def config_with(base, tmp_path, *overrides: str) -> dict:
    repo, shared = base
    own = [
        f"paths.results={tmp_path / 'results'}",
        f"paths.resume={tmp_path / 'resume'}",
        f"paths.weights={tmp_path / 'models'}",
    ]
    return load_config([repo / "config.yaml"], [*shared, *own, *overrides])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def random_ids(n: int = 2) -> torch.Tensor:
    return torch.randint(0, 50257, (n, CONTEXT), generator=torch.Generator().manual_seed(1))


def run_tags(config: dict) -> dict:
    client = MlflowClient(config["tracking"]["uri"])
    experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.`pipeline.stage` = 'pretrain'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].data.tags


def test_imported_weights_are_evaluated_and_saved_untrained(base, tmp_path, hf_dir, hf_model):
    config = config_with(base, tmp_path, f"pretrain.init_from={hf_dir}")
    metrics = pretrain.main(stage_config(config, "pretrain"))

    out = tmp_path / "results" / "pretrain"
    model = load_checkpoint(out / "model").eval()
    ids = random_ids()
    torch.testing.assert_close(logits(model, ids), logits(hf_model, ids), rtol=0, atol=1e-5)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert (saved["steps"], saved["tokens_seen"], saved["init_from"]) == (0, 0, str(hf_dir))
    assert saved["init_weights_sha256"] == sha256_file(hf_dir / "model.safetensors")

    # val_loss is transformers' loss on the same evaluation windows: scored, not trained
    val = load_tokens(f"{config['paths']['data']}/tokens", "val")
    batches = evaluation_batches(val, CONTEXT, TRAIN["batch_size"], TRAIN["eval_batches"])
    expected = sum(
        F.cross_entropy(logits(hf_model, x).flatten(0, 1), y.flatten()).item() for x, y in batches
    ) / len(batches)
    assert saved["val_loss"] == pytest.approx(expected, abs=1e-5)
    # val_bpb: the same windows' total nats / ln 2 / the UTF-8 bytes their targets decode to
    tokenizer = gpt2_tokenizer(Path(config["paths"]["data"]) / "raw" / "gpt2-bpe")
    nats = sum(
        F.cross_entropy(logits(hf_model, x).flatten(0, 1), y.flatten(), reduction="sum").item()
        for x, y in batches
    )
    n_bytes = sum(len(tokenizer.decode_bytes(y.flatten().tolist())) for _, y in batches)
    assert saved["val_bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)

    meta = load_checkpoint_config(out / "model")
    assert meta["model"]["dropout"] == 0.0  # the model section's, not HF's resid_pdrop 0.1
    for name in TOKENIZER_FILES:  # the token files' tokenizer: GPT-2's, in our format
        assert (out / "model" / "tokenizer" / name).is_file()
    assert meta["tokenizer"]["kind"] == "gpt2" and meta["tokenizer"]["n_vocab"] == 50257
    assert (out / "samples.txt").read_text().startswith(config["pretrain"]["sample_prompt"])
    assert (out / "loss.png").is_file()
    tags = run_tags(config)
    assert (tags["init_from"], tags["continue_pretraining"]) == (str(hf_dir), "False")


def spy_on_fit(monkeypatch) -> dict:
    """Records the arguments pretrain passes to the real fit."""
    seen: dict = {}
    real_fit = training.fit

    def fit(*args, **kwargs):
        seen.update(kwargs)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", fit)
    return seen


def test_continue_pretraining_trains_the_imported_weights(
    base, tmp_path, hf_dir, hf_model, monkeypatch
):
    seen = spy_on_fit(monkeypatch)
    config = config_with(
        base,
        tmp_path,
        f"pretrain.init_from={hf_dir}",
        "pretrain.continue_pretraining=true",
        "model.dropout=0.05",
    )
    metrics = pretrain.main(stage_config(config, "pretrain"))

    assert metrics["steps"] == 2 and metrics["init_from"] == str(hf_dir)
    model = load_checkpoint(tmp_path / "results" / "pretrain" / "model").eval()
    assert model.config.dropout == 0.05
    ids = random_ids()
    assert (logits(model, ids) - logits(hf_model, ids)).abs().max() > 1e-3  # it trained
    # a resume state is only continued from the same init weights
    assert seen["fingerprint"]["init_weights"] == sha256_file(hf_dir / "model.safetensors")


def test_scratch_trains_a_fresh_model_as_before(base, tmp_path, monkeypatch):
    seen = spy_on_fit(monkeypatch)
    config = config_with(
        base, tmp_path, "pretrain.train.max_steps=1", "pretrain.train.warmup_steps=0"
    )
    metrics = pretrain.main(stage_config(config, "pretrain"))
    assert (metrics["steps"], metrics["init_from"]) == (1, "scratch")
    assert "init_weights_sha256" not in metrics
    assert "init_weights" not in seen["fingerprint"]  # resume states from before stay valid
    assert run_tags(config)["init_from"] == "scratch"


def test_weights_that_do_not_fit_the_model_section_name_both(base, tmp_path, hf_dir):
    config = config_with(base, tmp_path, f"pretrain.init_from={hf_dir}", "model.n_layer=3")
    with pytest.raises(ValueError) as err:
        pretrain.main(stage_config(config, "pretrain"))
    message = str(err.value)
    assert f"the weights in {hf_dir} are a GPT-2 with n_layer=2, n_head=2, n_embd=32" in message
    assert "model.preset 'tiny' with model.context_length, model.n_layer" in message
    assert "gives n_layer=3, n_head=2" in message
    assert message.endswith("set model.n_layer: 2")
    assert not (tmp_path / "results" / "pretrain").exists()


def test_a_mismatch_with_a_gpt2_size_names_the_preset_to_set():
    with pytest.raises(ValueError, match=r"set model\.preset: gpt2-355m and remove model\.n_layer"):
        pretrain.check_architecture(
            GPTConfig.from_preset("gpt2-355m"),
            GPTConfig.from_preset("gpt2-124m", n_layer=24),
            ModelSettings(preset="gpt2-124m", n_layer=24),
            "gpt2-355m",
            pretrain.Path("models/gpt2-medium"),
        )


def test_a_gpt2_name_is_looked_up_under_paths_weights(base, tmp_path, hf_dir):
    shutil.copytree(hf_dir, tmp_path / "models" / "gpt2")
    config = config_with(base, tmp_path, "pretrain.init_from=gpt2-124m")
    assert init_from_input(*init_from(config)) == [str(tmp_path / "models" / "gpt2")]
    metrics = pretrain.main(stage_config(config, "pretrain"))
    assert (metrics["init_from"], metrics["steps"]) == ("gpt2-124m", 0)
    assert run_tags(config)["init_weights"] == str(tmp_path / "models" / "gpt2")

    missing = config_with(base, tmp_path, "pretrain.init_from=gpt2-medium")
    assert init_from_input(*init_from(missing)) == []  # the stage, not Snakemake, explains
    with pytest.raises(FileNotFoundError) as err:
        pretrain.main(stage_config(missing, "pretrain"))
    message = str(err.value)
    for place in ("gpt2-355m", "gpt2-medium"):
        assert str(tmp_path / "models" / place) in message
    assert "hf download openai-community/gpt2-medium" in message


def test_init_from_a_directory_is_a_snakemake_input(base, tmp_path):
    plain = config_with(base, tmp_path)
    assert init_from_input(*init_from(plain)) == []
    config = config_with(base, tmp_path, f"pretrain.init_from={tmp_path / 'nowhere'}")
    assert init_from_input(*init_from(config)) == [str(tmp_path / "nowhere")]
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere': no such directory; expected"):
        pretrain.main(stage_config(config, "pretrain"))


def test_cli_import_then_export_round_trips_through_transformers(tmp_path, hf_dir, hf_model):
    ours, exported = tmp_path / "ours", tmp_path / "exported"
    assert main(["import-gpt2", str(hf_dir), str(ours)]) == 0
    assert main(["export-hf", str(ours), str(exported)]) == 0
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    ids = random_ids()
    torch.testing.assert_close(logits(reloaded, ids), logits(hf_model, ids), rtol=0, atol=1e-5)


def test_cli_import_without_weights_is_a_clean_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["import-gpt2", str(empty), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {empty} holds no GPT-2 weights") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_import_of_a_tf_checkpoint_without_tensorflow_says_how_to_install(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import fails even where installed
    src = tmp_path / "124M"
    src.mkdir()
    hparams = {"n_vocab": 50257, "n_ctx": 32, "n_embd": 32, "n_head": 2, "n_layer": 2}
    (src / "hparams.json").write_text(json.dumps(hparams))
    (src / "model.ckpt.index").write_bytes(b"")
    assert main(["import-gpt2", str(src), str(tmp_path / "out")]) == 1
    assert "pip install 'gpt-pipeline[tf]'" in capsys.readouterr().err


def test_our_own_checkpoint_is_an_init_too(tmp_path, hf_dir, hf_model):
    ours = tmp_path / "ours"
    assert main(["import-gpt2", str(hf_dir), str(ours)]) == 0
    cfg = GPTConfig.from_preset("tiny", **{k: v for k, v in MODEL.items() if k != "preset"})
    model = pretrain.load_init_model(ours, cfg, ModelSettings(**MODEL), str(ours)).eval()
    ids = random_ids()
    torch.testing.assert_close(logits(model, ids), logits(hf_model, ids), rtol=0, atol=1e-5)
    assert weights_sha256(ours) == sha256_file(ours / "model.safetensors")


def test_the_init_weights_hash_covers_every_file_read(tmp_path, hf_model):
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="2MB")
    files = weight_files(sharded)
    assert files[0].name == "model.safetensors.index.json" and len(files) > 2
    tf = tmp_path / "124M"
    tf.mkdir()
    (tf / "hparams.json").write_text("{}")
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001", "model.ckpt.meta"):
        (tf / name).write_bytes(name.encode())
    assert [p.name for p in weight_files(tf)] == [
        "model.ckpt.index",
        "model.ckpt.data-00000-of-00001",
    ]
    before = weights_sha256(tf)
    (tf / "model.ckpt.data-00000-of-00001").write_bytes(b"other")
    assert weights_sha256(tf) != before
