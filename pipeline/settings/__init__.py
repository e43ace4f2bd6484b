"""Every setting of the pipeline, defined once: type, bounds, default and meaning.

The JSON Schema that validates a config, the defaults that complete it (and so appear in
`results/config.resolved.yaml`) and the shipped `config.yaml` are all derived from these
classes (by `schema.py` beside this file); `load.py` reads, checks and completes a config and
builds the typed `Config` from it. A stage's section is the `settings` class of its registry
entry (`pipeline/stages/registry.py`); the runner hands each stage a `StageConfig` holding that
section as its class. Nothing here imports torch: the Snakefile reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Generic, Literal, TypeVar

from pipeline.errors import InputError
from pipeline.model.architecture import PRESETS
from pipeline.paths import Paths
from pipeline.settings.schema import setting

END_OF_TEXT = "<|endoftext|>"
"""The document separator, end of sequence and padding: every tokenizer's first special token."""

ATTENTION_CHOICES = ("auto", "fused", "sdpa", "multihead", "causal", "simple")
"""`model.attention`: auto, or a backend of pipeline/model/attention.py (a test ties the two)."""

Precision = Literal["auto", "fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda", "mps"]


@dataclass(frozen=True)
class PathSettings:
    data: str = setting("data", minLength=1, help="downloads go to data/raw, tokens to data/tokens")
    results: str = setting("results", minLength=1, help="one folder per stage")
    resume: str = setting(
        ".resume", minLength=1, help="resume checkpoints: kept outside Snakemake's outputs"
    )
    weights: str = setting(
        "models", minLength=1, help="downloaded GPT-2 weights, models/<name> (<stage>.init_from)"
    )


@dataclass(frozen=True)
class Source:
    name: str = setting(pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
    url: str = setting(pattern=r"^(https?|file)://")
    sha256: str = setting(pattern=r"^[0-9a-f]{64}$")
    member: str | None = setting(None, minLength=1, help="the file to take from a zip archive")


_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
DEFAULT_SOURCES = [
    Source(
        "gpt2-bpe/encoder.json",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
    Source(
        "gpt2-bpe/vocab.bpe",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    Source(
        "the-verdict.txt",
        f"{_RASBT}/ch02/01_main-chapter-code/the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    ),
    Source(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    Source(
        "SMSSpamCollection",
        "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
        "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
        member="SMSSpamCollection",
    ),
    Source(
        "instruction-data.json",
        f"{_RASBT}/ch07/01_main-chapter-code/instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
    ),
    Source(
        "instruction-data-with-preference.json",
        f"{_RASBT}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
    ),
]


@dataclass(frozen=True)
class DataSettings:
    mirrors: list[str] = setting(
        ["../shared/data"],
        help="local mirror directories, searched (by source name) before the URL; sha256 is "
        "always checked",
    )
    sources: list[Source] = setting(DEFAULT_SOURCES, minItems=1, help="downloadable files")


@dataclass(frozen=True)
class CorpusPath:
    """Local text: a file, a directory (every corpus file below it) or a glob (`**` recurses);
    .txt/.md = one document per file, .jsonl = one per line, .parquet = one per row, each
    optionally .gz/.zst compressed (parquet compresses inside). `format` reads every file the
    path matches in one format whatever its suffix (LICENSE, README, data.log)."""

    path: str = setting(minLength=1, help="a file, a directory or a glob")
    field: str = setting("text", minLength=1, help=".jsonl: the field holding a document")
    column: str = setting("text", minLength=1, help=".parquet: the column holding a document")
    format: Literal["text", "jsonl", "parquet"] | None = setting(
        None,
        help="text | jsonl | parquet: every file the path matches (every file below a "
        "directory) read so, whatever its suffix; a .gz/.zst suffix is still decompressed "
        "(not parquet); null: each file by its suffix",
    )


@dataclass(frozen=True)
class TokenizerSettings:
    """The BPE every stage encodes with: GPT-2's, or one trained on the corpus's training text
    (pipeline/stages/tokenizer.py)."""

    kind: Literal["gpt2", "trained"] = setting(
        "gpt2",
        help="gpt2: GPT-2's 50,257 ids; trained: a byte-level BPE learned from prepare.corpus "
        "(its train split only), sized by vocab_size",
    )
    vocab_size: int = setting(
        4096,
        minimum=257,
        maximum=65536,
        help="trained: ids in all, special tokens included (256 bytes + merges + specials); "
        "token files are uint16, so at most 65,536",
    )
    max_chars: int = setting(
        100_000_000,
        minimum=1,
        help="trained: characters learned from, streamed in corpus order (bounds time and memory)",
    )
    pattern: Literal["gpt2", "gpt4"] = setting(
        "gpt4",
        help="trained: the split pattern (gpt4 keeps punctuation + newline and digit runs of "
        "up to 3 apart, and compresses better at small vocabularies)",
    )
    special_tokens: list[str] = setting(
        [END_OF_TEXT],
        minItems=1,
        uniqueItems=True,
        help="trained: ids after the merges; the first must be <|endoftext|> (document "
        "separator, eos, padding); the chat templates are plain text and need no more",
    )
    fine_tuning: list[str] = setting(
        [],
        uniqueItems=True,
        help="trained: fine-tuning stages whose TRAIN split joins the sample after the corpus "
        "(their val and test splits never do)",
    )


@dataclass(frozen=True)
class PrepareSettings:
    corpus: list[str | CorpusPath] = setting(
        ["tinyshakespeare.txt"],
        minItems=1,
        help="data.sources names (downloads) and {path: ...} entries (local files), joined "
        "with <|endoftext|> between documents",
    )
    val_fraction: float = setting(
        0.1, exclusiveMinimum=0, exclusiveMaximum=1, help="the share of tokens held out"
    )
    val_split: Literal["auto", "tail", "documents"] = setting(
        "auto",
        help="tail: the last val_fraction of the tokens; documents: whole documents chosen by "
        "a hash of their text; auto: tail for a one-document corpus, else documents",
    )
    workers: int | None = setting(
        None, minimum=1, help="encoding threads; null: the rule's threads (--threads)"
    )
    shard_tokens: int = setting(
        100_000_000, minimum=1024, help="tokens per shard file (uint16: 2 bytes each)"
    )
    scatter: int = setting(
        1, minimum=1, help="Snakemake jobs that tokenize (groups of files), then one gathers"
    )
    on_bad_record: Literal["error", "skip"] = setting(
        "error",
        help="a bad file, line or row: stop naming it, or skip it (counted in meta.json, the "
        "log and MLflow)",
    )


PREPARE_RUN_KEYS = ("workers", "scatter")
"""How prepare runs, not what it writes (the token files are the same): no rerun trigger."""


@dataclass(frozen=True)
class ModelSettings:
    """The architecture (a preset, any field overridden) and the attention backend to run."""

    preset: str = setting("tiny", enum=tuple(PRESETS), help="a GPT-2 size")
    attention: str = setting(
        "auto",
        enum=ATTENTION_CHOICES,
        help="run-time choice, not stored in checkpoints: auto = the fused op on the CPU, and "
        "on a GPU where its shipped measurements say it is faster, else sdpa",
    )
    context_length: int | None = setting(None, minimum=1, help="null: the preset's")
    n_layer: int | None = setting(None, minimum=1, help="null: the preset's")
    n_head: int | None = setting(None, minimum=1, help="null: the preset's")
    n_embd: int | None = setting(None, minimum=1, help="null: the preset's")
    dropout: float = setting(0.0, minimum=0, exclusiveMaximum=1)
    attn_dropout: float = setting(0.0, minimum=0, exclusiveMaximum=1)
    qkv_bias: bool | None = setting(None, help="null: the preset's")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one stage (its `train` section); `max_steps` counts optimizer
    steps. The launch keys (nproc_per_node, nnodes, parallelism) change how a stage runs, not
    what it computes: changing them reruns nothing."""

    max_steps: int | None = setting(
        None, minimum=1, help="null: the stage's epochs x steps per epoch"
    )
    batch_size: int = setting(8, minimum=1, help="the global batch (all processes)")
    grad_accum_steps: int = setting(1, minimum=1)
    lr: float = setting(5.0e-4, exclusiveMinimum=0)
    min_lr: float = setting(5.0e-5, minimum=0, help="the cosine schedule's floor")
    warmup_steps: int = setting(20, minimum=0)
    weight_decay: float = setting(0.1, minimum=0)
    beta1: float = setting(0.9, minimum=0, exclusiveMaximum=1)
    beta2: float = setting(0.95, minimum=0, exclusiveMaximum=1)
    grad_clip: float = setting(1.0, minimum=0, help="0: no clipping")
    optimizer: Literal["adamw", "muon"] = setting(
        "adamw",
        help="adamw | muon: Muon (torch.optim.Muon) for the 2-D weight matrices inside the "
        "blocks (LoRA: the adapters), AdamW for embeddings, head, norms and biases",
    )
    muon_lr: float = setting(
        0.02, exclusiveMinimum=0, help="Muon's peak rate; the schedule scales it as it does lr"
    )
    muon_momentum: float = setting(0.95, minimum=0, exclusiveMaximum=1, help="Muon's (Nesterov)")
    eval_every: int | None = setting(None, minimum=1, help="null: at each epoch's end")
    eval_batches: int = setting(10, minimum=1, help="batches per split at each evaluation")
    checkpoint_every: int = setting(50, minimum=0, help="resume checkpoints; 0: none")
    log_every: int = setting(10, minimum=1)
    precision: Precision = setting(
        "auto",
        help="bf16 runs the matmuls under bf16 autocast (weights and optimizer state stay "
        "fp32); auto: bf16 where it measured faster: a CUDA GPU with bf16, or an AVX512_BF16 "
        "CPU for models from 768 wide (n_embd; narrower ones step faster in fp32 there); fp32 "
        "elsewhere (on AVX2 a bf16 step is several times slower)",
    )
    compile: bool = setting(False, help="torch.compile the model")
    nproc_per_node: int = setting(
        1, minimum=1, help="processes per node, one per GPU; above 1: torchrun"
    )
    nnodes: int = setting(1, minimum=1, help="above 1: srun + torchrun across SLURM nodes")
    parallelism: Literal["ddp", "fsdp"] = setting(
        "ddp", help="ddp | fsdp (sharded parameters, for gpt2-774m/1558m)"
    )

    @property
    def steps(self) -> int:
        """`max_steps`, which a stage counted in epochs fills in before training."""
        if self.max_steps is None:
            raise ValueError("train.max_steps is null: the stage derives it before training")
        return self.max_steps

    @property
    def world_size(self) -> int:
        """Training processes in all: `batch_size` is split evenly among them."""
        return self.nproc_per_node * self.nnodes


LAUNCH_KEYS = ("nproc_per_node", "nnodes", "parallelism")


@dataclass(frozen=True)
class PretrainTrain(TrainSettings):
    # 500 steps of 8 x 128 tokens: the tokens of the earlier 250 x 16, and twice the updates,
    # which reach the earlier final val loss in half the tokens (benchmarks/time_to_loss.py).
    max_steps: int = setting(500, minimum=1)
    batch_size: int = setting(8, minimum=1, help="the global batch (all processes)")
    lr: float = setting(1.0e-3, exclusiveMinimum=0)
    min_lr: float = setting(1.0e-4, minimum=0, help="the cosine schedule's floor")
    eval_every: int = setting(100, minimum=1)
    eval_batches: int = setting(8, minimum=1, help="batches per split at each evaluation")
    checkpoint_every: int = setting(100, minimum=0, help="resume checkpoints; 0: none")


def registered_name_setting() -> str | None:
    """A training stage's `registered_model_name` setting (tracking.register)."""
    return setting(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$",
        help="the MLflow registered model each training adds a version to (letters, digits, "
        "space . _ -); null: gpt-pipeline-<stage>",
    )


@dataclass(frozen=True)
class PretrainSettings:
    init_from: str = setting(
        "scratch",
        minLength=1,
        help="scratch (random init), or weights to start from: gpt2-124m .. gpt2-1558m or gpt2, "
        "gpt2-medium, gpt2-large, gpt2-xl (looked up as paths.weights/<name>), or a directory "
        "(our checkpoint, a Hugging Face GPT-2 or OpenAI's TF checkpoint). The architecture "
        "must match the model section.",
    )
    continue_pretraining: bool = setting(
        False, help="with weights: false = evaluate and save them; true = train on"
    )
    sampling: Literal["random", "sliding"] = setting(
        "random", help="random windows, or sliding windows every `stride` tokens"
    )
    stride: int | None = setting(
        None, minimum=1, help="sliding: tokens between window starts (null: context_length)"
    )
    sample_prompt: str = setting("ROMEO:", minLength=1)
    sample_tokens: int = setting(48, minimum=0)
    peak_flops: float | None = setting(
        None,
        exclusiveMinimum=0,
        help="MFU denominator; null: a known GPU's bf16 peak, else the best matmul measured on"
        " this machine (cached in ~/.cache/gpt-pipeline); raised to any faster training step",
    )
    registered_model_name: str | None = registered_name_setting()
    train: PretrainTrain = setting(PretrainTrain())


@dataclass(frozen=True)
class Split:
    train: float = setting(0.85, exclusiveMinimum=0, exclusiveMaximum=1)
    val: float = setting(0.05, exclusiveMinimum=0, exclusiveMaximum=1)


@dataclass(frozen=True)
class LoraSettings:
    rank: int = setting(16, minimum=1)
    alpha: float = setting(16, exclusiveMinimum=0)
    dropout: float = setting(0.0, minimum=0, exclusiveMaximum=1)
    targets: list[Literal["attn_qkv", "attn_proj", "mlp"]] = setting(
        ["attn_qkv", "attn_proj", "mlp"], minItems=1, uniqueItems=True
    )


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int = setting(64, minimum=1)
    temperature: float = setting(0.0, minimum=0, help="0: greedy")
    top_k: int | None = setting(None, minimum=1)
    top_p: float | None = setting(None, exclusiveMinimum=0, maximum=1)


INIT_FROM_HELP = (
    "a stage name (pretrain, finetune-instruct, ...), GPT-2 weights by name (gpt2-124m, gpt2, "
    "...: paths.weights/<name>, with the model section's dropouts) or a directory (our "
    "checkpoint, Hugging Face's or OpenAI's GPT-2)"
)


@dataclass(frozen=True)
class ClassifierSettings:
    init_from: str = setting("pretrain", minLength=1, help=INIT_FROM_HELP)
    data: str = setting(
        "SMSSpamCollection", minLength=1, help="a data.sources name of `label<TAB>text` lines"
    )
    labels: list[str] = setting(
        ["ham", "spam"],
        minItems=2,
        uniqueItems=True,
        help="the labels of `data`: a line with another label is an error naming it",
    )
    positive_label: str = setting(
        "spam",
        minLength=1,
        help="one of labels: what precision, recall, F1 and ROC-AUC are about",
    )
    balance: Literal["undersample", "class_weights"] = setting(
        "undersample", help="undersample the majority class (the book) | class_weights"
    )
    split: Split = setting(
        Split(train=0.7, val=0.1), help="stratified by label; test gets the rest"
    )
    trainable_blocks: Literal["all"] | int = setting(
        "all",
        help="all, or N: train only the last N blocks + final norm + head (the book: 1); the "
        "tiny Shakespeare-pretrained default needs all",
    )
    pooling: Literal["last", "mean", "first"] = setting(
        "last", help="last (non-padding) token | mean | first"
    )
    max_length: int | None = setting(
        None, minimum=1, help="tokens per text, longer ones truncated (null: context_length)"
    )
    epochs: int = setting(5, minimum=1)
    misclassified_examples: int = setting(25, minimum=0)
    registered_model_name: str | None = registered_name_setting()
    train: TrainSettings = setting(TrainSettings())


@dataclass(frozen=True)
class InstructSettings:
    init_from: str = setting("pretrain", minLength=1, help=INIT_FROM_HELP)
    data: str = setting(
        "instruction-data.json",
        minLength=1,
        help="a data.sources name: a JSON list of {instruction, input, output}",
    )
    skip_invalid: bool = setting(
        False, help="false: an invalid record is an error; true: skip, count and log it"
    )
    split: Split = setting(Split(), help="seeded shuffle; test gets the rest")
    template: Literal["alpaca", "phi3"] = setting("alpaca")
    mask_prompt: bool = setting(True, help="learn only the response tokens")
    bucket_by_length: bool = setting(False, help="batches of similar lengths (less padding)")
    method: Literal["full", "lora"] = setting(
        "full", help="full | lora (the checkpoint written has the adapters merged)"
    )
    lora: LoraSettings = setting(LoraSettings())
    epochs: int = setting(2, minimum=1)
    generation: Generation = setting(Generation(), help="test responses")
    sample_table_rows: int = setting(
        20, minimum=0, help="test responses shown in MLflow's table artifact"
    )
    registered_model_name: str | None = registered_name_setting()
    train: TrainSettings = setting(TrainSettings())


@dataclass(frozen=True)
class DpoTrain(TrainSettings):
    lr: float = setting(
        5.0e-5,
        exclusiveMinimum=0,
        help="higher rates widen the margin faster but degrade the answers",
    )
    min_lr: float = setting(5.0e-6, minimum=0, help="the cosine schedule's floor")
    warmup_steps: int = setting(10, minimum=0)
    weight_decay: float = setting(0.0, minimum=0)


@dataclass(frozen=True)
class DpoSettings:
    init_from: str = setting(
        "finetune-instruct", minLength=1, help="a stage name or an instruction-tuned checkpoint"
    )
    data: str = setting(
        "instruction-data-with-preference.json",
        minLength=1,
        help="records with `chosen` and `rejected` answers",
    )
    skip_invalid: bool = setting(False)
    split: Split = setting(Split(), help="as finetune_instruct: same records, same split")
    template: Literal["alpaca", "phi3"] | None = setting(
        None, help="null: the template the checkpoint was instruction-tuned with"
    )
    loss: Literal["sigmoid", "ipo"] = setting("sigmoid", help="sigmoid (DPO) | ipo")
    beta: float = setting(
        0.1, exclusiveMinimum=0, help="DPO's beta: how far the policy may move from the reference"
    )
    label_smoothing: float = setting(
        0.0,
        minimum=0,
        exclusiveMaximum=0.5,
        help="conservative DPO: assumed share of flipped labels",
    )
    method: Literal["full", "lora"] = setting("full", help="full | lora (merged when written)")
    lora: LoraSettings = setting(LoraSettings())
    epochs: int = setting(1, minimum=1)
    generation: Generation = setting(Generation(), help="test responses")
    sample_table_rows: int = setting(20, minimum=0)
    registered_model_name: str | None = registered_name_setting()
    train: DpoTrain = setting(DpoTrain())


@dataclass(frozen=True)
class StageResources:
    """What a training stage's Snakemake rule asks for (on SLURM: --cpus-per-task, --mem,
    --time, --gpus). Kept apart from the stage sections so changing it reruns nothing."""

    threads: int | None = setting(
        None,
        minimum=1,
        help="CPU cores per node, shared by its processes; null: all of --cores (local runs)",
    )
    mem_mb: int = setting(4000, minimum=1, help="memory per node in MB (SLURM --mem)")
    runtime: int = setting(30, minimum=1, help="wall-clock limit in minutes (SLURM --time)")
    gpu: int = setting(
        0, minimum=0, help="GPUs per node; above 0 it must equal train.nproc_per_node"
    )
    partition: str | None = setting(
        None, minLength=1, help="SLURM partition; null: the profile's default-resources"
    )


@dataclass(frozen=True)
class TrackingSettings:
    uri: str = setting("sqlite:///mlflow.db", minLength=1)
    experiment: str = setting("gpt-pipeline", minLength=1)
    log_model: bool = setting(
        True,
        help="log each training stage's checkpoint as the run's MLflow pyfunc model (safetensors, "
        "config.json and tokenizer files; nothing pickled), which `mlflow models serve` serves",
    )
    register: bool = setting(
        True,
        help="add each training's logged model as a new version of the stage's registered model "
        "(<stage>.registered_model_name), @champion moving only when its headline metric improves",
    )
    system_metrics_interval: float | None = setting(
        10.0,
        minimum=0,
        help="seconds between samples of CPU, memory, disk and network use (GPU with "
        "nvidia-ml-py) logged as the training stages' system/* metrics; 0 or null: none",
    )


Section = TypeVar("Section")


@dataclass(frozen=True)
class Config:
    """The resolved config, typed (`load.typed_config` builds it once): the shared sections as
    their classes, each stage's section as its registry entry's class, and the plain mapping it
    was built from (MLflow's params and config.yaml artifact)."""

    seed: int
    device: Device
    paths: Paths
    data: DataSettings
    model: ModelSettings
    sections: Mapping[str, Any]
    """Stage name -> its section (`PretrainSettings`, ...), for stages that have settings."""
    resources: Mapping[str, StageResources]
    tracking: TrackingSettings
    resolved: Mapping[str, Any]

    def section_of(self, stage: str, kind: type[Section]) -> Section:
        """`stage`'s section, checked to be a `kind`."""
        section = self.sections.get(stage)
        if not isinstance(section, kind):
            raise InputError(f"{stage}: its settings are not {kind.__name__}")
        return section

    def for_stage(self, stage: str, kind: type[Section]) -> StageConfig[Section]:
        """What the stage `stage` runs with: this config and its own section as a `kind`."""
        shared = {f.name: getattr(self, f.name) for f in fields(Config)}
        return StageConfig(**shared, stage=stage, section=self.section_of(stage, kind))


@dataclass(frozen=True)
class StageConfig(Config, Generic[Section]):
    """What the runner hands one stage: the whole config, its name and its own section."""

    stage: str
    section: Section
