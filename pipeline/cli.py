"""`python -m pipeline <command>`: every stage runs alone too; Snakemake only wires the files."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.download import DownloadError
from pipeline.data.labeled_text import read_texts
from pipeline.data.shards import verify
from pipeline.errors import InputError
from pipeline.io import atomic_write_text
from pipeline.settings import Config
from pipeline.settings.load import (
    DEFAULT_CONFIG,
    json_schema,
    load_config,
    render_defaults,
    render_resolved,
    stage_config,
    typed_config,
)
from pipeline.stages.registry import STAGES, Stage

log = logging.getLogger("pipeline")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        type=Path,
        metavar="FILE",
        help=f"YAML config, repeatable, later files win (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        dest="overrides",
        help="override one value, e.g. --set pretrain.train.max_steps=50 (YAML-parsed)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads the stage may use (default: torch's or the stage's choice)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stage in STAGES.items():
        command = commands.add_parser(name, help=f"run the {name} stage")
        _add_config_args(command)
        if stage.parts:
            one = command.add_mutually_exclusive_group()
            one.add_argument("--part", metavar="I-of-N", help="run one part only (a cluster job)")
            one.add_argument(
                "--gather", action="store_true", help="only join the parts written by --part"
            )
        if stage.report:
            command.add_argument("--report", action="store_true", help=stage.report)
        if stage.trains:
            command.add_argument(
                "--keep-resume-state",
                action="store_true",
                help="keep the resume checkpoint after the outputs are written (Snakemake "
                "deletes it once it has accepted them, so a job killed after its work resumes)",
            )
    config = commands.add_parser(
        "config", help="print the resolved configuration (every setting, defaults included)"
    )
    _add_config_args(config)
    shown = config.add_mutually_exclusive_group()
    shown.add_argument(
        "--defaults", action="store_true", help="print every default as commented YAML"
    )
    shown.add_argument("--schema", action="store_true", help="print the config's JSON Schema")
    verify = commands.add_parser(
        "verify", help="check the token shards against data/tokens/meta.json (sizes, sha256)"
    )
    _add_config_args(verify)

    cls = commands.add_parser("classify", help="label texts with a fine-tuned classifier")
    cls.add_argument("--checkpoint", type=Path, required=True, help="classifier checkpoint")
    cls.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    cls.add_argument(
        "--input", type=Path, help="one text a line, or a TSV whose header has a 'text' column"
    )
    cls.add_argument("--output", type=Path, help="predictions TSV (default: stdout)")
    cls.add_argument("--batch-size", type=_positive_int, default=32)
    cls.add_argument("--device", default="auto")
    _add_attention_arg(cls)

    imp = commands.add_parser(
        "import-gpt2",
        help="convert GPT-2 weights (Hugging Face or OpenAI TensorFlow directory) to a checkpoint",
    )
    imp.add_argument("src", type=Path, metavar="SRC", help="directory holding GPT-2 weights")
    imp.add_argument("out", type=Path, metavar="OUT", help="checkpoint directory to write")
    exp = commands.add_parser(
        "export-hf", help="write a language-model checkpoint as a Hugging Face GPT-2 directory"
    )
    exp.add_argument("checkpoint", type=Path, metavar="CKPT", help="checkpoint directory")
    exp.add_argument("out", type=Path, metavar="OUT", help="directory to write")

    gen = commands.add_parser("generate", help="continue a prompt with a trained checkpoint")
    gen.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    gen.add_argument("--prompt", required=True)
    _add_sampling_args(gen)
    gen.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")

    chat = commands.add_parser(
        "chat", help="talk to an instruction-tuned checkpoint (interactive, or --instruction once)"
    )
    chat.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    chat.add_argument("--instruction", help="answer this once and exit")
    chat.add_argument("--input", dest="input_text", default="", help="the record's input field")
    chat.add_argument(
        "--template", default=None, help="prompt template (default: the checkpoint's)"
    )
    _add_sampling_args(chat)
    return parser


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute every step instead of a KV cache"
    )
    parser.add_argument("--device", default="auto")
    _add_attention_arg(parser)


def _add_attention_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attention",
        default="auto",
        metavar="NAME",
        help="attention backend: auto (fused on the CPU, sdpa elsewhere), fused, sdpa, ...",
    )


def _sampling(args: argparse.Namespace) -> Any:
    from pipeline.serving.inference import Sampling  # deferred: imports torch (~3 s)

    return Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                    use_cache=not args.no_cache)  # fmt: skip


def _write_stream(pieces: Iterator[str]) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def generate_command(args: argparse.Namespace) -> None:
    from pipeline.serving.inference import Generation  # deferred: imports torch (~3 s)

    generation, sampling = Generation(args.checkpoint, args.device, args.attention), _sampling(args)
    sys.stdout.write(args.prompt)
    pieces = generation.stream(args.prompt, sampling, generation.generator(sampling),
                               stop_at_eot=not args.no_stop)  # fmt: skip
    _write_stream(pieces)


def chat_command(args: argparse.Namespace) -> None:
    """Wrap each instruction in the checkpoint's prompt template and stream the answer."""
    from pipeline.serving.inference import Generation  # deferred: imports torch (~3 s)

    generation, sampling = Generation(args.checkpoint, args.device, args.attention), _sampling(args)
    template = generation.template(args.template)
    random = generation.generator(sampling)  # one stream of draws for the whole conversation

    def answer(instruction: str, input_text: str = "") -> None:
        _write_stream(generation.answer(template, instruction, input_text, sampling, random))

    if args.instruction is not None:
        if not args.instruction.strip():
            raise InputError("--instruction is empty")
        answer(args.instruction, args.input_text)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform
            # deferred: optional; only an interactive chat wants its line editing for input()
            import readline  # noqa: F401  (line editing and history for input())
        print(
            f"chat with {args.checkpoint} ({template} template); Ctrl-C stops an answer, "
            "an empty line, Ctrl-D or Ctrl-C at the prompt ends"
        )
    chat_loop(answer, "> " if interactive else "")


def chat_loop(answer: Callable[[str], None], prompt: str, read: Callable[[str], str] = input
              ) -> None:  # fmt: skip
    """Answer line after line until an empty line, end of input or Ctrl-C at the prompt (a clean
    end); Ctrl-C while answering stops only that answer and asks again."""
    while True:
        try:
            line = read(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            if prompt:
                print()
            return
        if not line:
            return
        try:
            answer(line)
        except KeyboardInterrupt:
            print(flush=True)  # end the cut answer's line
            print("(answer stopped)", file=sys.stderr, flush=True)


def classify_command(args: argparse.Namespace) -> None:
    from pipeline.serving.inference import Classification, check_texts  # deferred: imports torch

    if bool(args.texts) == bool(args.input):
        raise InputError("give texts as arguments or --input FILE (one of the two)")
    texts = read_texts(args.input) if args.input else list(args.texts)
    check_texts(texts)  # before the loading
    predicted = Classification(args.checkpoint, args.device, args.attention).predict(
        texts, args.batch_size
    )
    rows = ["label\tprobability\ttext"]
    for text, (label, probability) in zip(texts, predicted, strict=True):
        one_line = " ".join(text.splitlines())  # the text column is last: tabs may stay
        rows.append(f"{label}\t{probability:.4f}\t{one_line}")
    table = "\n".join(rows) + "\n"
    if args.output:
        atomic_write_text(args.output, table)
        log.info("wrote %d predictions to %s", len(texts), args.output)
    else:
        sys.stdout.write(table)


def _stored_parameters(weights: Path) -> int:
    """Elements in a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open  # deferred: only import-gpt2 and export-hf read weights

    with safe_open(weights, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def import_gpt2_command(args: argparse.Namespace) -> None:
    """Convert once, so every stage and command reads GPT-2 in our own checkpoint format."""
    # deferred: both modules import torch (~3 s)
    from pipeline.model.checkpoint import (
        WEIGHTS_FILE,
        checkpoint_tokenizer_info,
        load_checkpoint_config,
    )
    from pipeline.model.gpt2_import import import_gpt2

    out = import_gpt2(args.src, args.out)
    model = load_checkpoint_config(out)["model"]
    shape = ", ".join(f"{k}={model[k]}" for k in ("n_layer", "n_head", "n_embd", "context_length"))
    tokenizer = checkpoint_tokenizer_info(out)
    log.info(
        "wrote %s: %s parameters (%s), %s",
        out,
        f"{_stored_parameters(out / WEIGHTS_FILE):,}",
        shape,
        f"with its {tokenizer.kind} tokenizer ({tokenizer.n_vocab} ids)"
        if tokenizer
        else "without tokenizer files (generate will use tiktoken's GPT-2 encoding)",
    )


def export_hf_command(args: argparse.Namespace) -> None:
    """Hand a trained model to the Hugging Face ecosystem (transformers, the hub)."""
    from pipeline.model.hf import HF_SAFETENSORS, export_hf  # deferred: imports torch (~3 s)

    out = export_hf(args.checkpoint, args.out)
    log.info(
        "wrote %s: Hugging Face GPT-2 with %s parameters%s",
        out,
        f"{_stored_parameters(out / HF_SAFETENSORS):,}",
        ", config.json and tokenizer"
        if (out / "tokenizer_config.json").is_file()
        else " and config.json",
    )


def verify_command(args: argparse.Namespace) -> None:
    """Every token shard against meta.json: an OK line, or a line per damaged one and exit 1."""
    config = typed_config(load_config(args.config or [DEFAULT_CONFIG], args.overrides))
    problems, summary = verify(config.paths.tokens)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        raise InputError(summary)
    print(summary)


@contextlib.contextmanager
def distributed_stage(config: Config) -> Iterator[None]:
    """Under torchrun, join the process group for the stage (ranks other than 0 log warnings
    only) and leave it afterwards; a plain process runs as it is."""
    # deferred: pipeline.train imports torch (~3 s), which importing the CLI and `--help` skip
    from pipeline.train.distributed import init_distributed, launched_world, shutdown_distributed

    if not launched_world().distributed:
        yield
        return
    from pipeline.train import pick_device  # deferred: imports torch (~3 s)

    world = init_distributed(pick_device(config.device).type)
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield
    finally:
        shutdown_distributed()


def run_stage(stage: Stage, resolved: Mapping[str, Any], **options: Any) -> Any:
    """`main(config, threads=..., ...)` of the stage's module, `config` being the resolved
    config typed, with the stage's own section; under torchrun, inside the process group."""
    config = stage_config(resolved, stage.name)
    with distributed_stage(config):
        return importlib.import_module(stage.module).main(config, **options)


def _config_reference(as_schema: bool) -> str:
    """Every setting with its default and meaning: as config.yaml, or as the JSON Schema."""
    return json.dumps(json_schema(), indent=1) + "\n" if as_schema else render_defaults()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # deferred: both modules import torch (~3 s), which importing the CLI and `--help` skip
    from pipeline.model.tf_checkpoint import TensorFlowRequiredError
    from pipeline.train import NonFiniteLossError

    try:
        _run_command(args)
        sys.stdout.flush()  # a reader gone shows here, not as a message when Python exits
        return 0
    except (DownloadError, InputError, NonFiniteLossError, OSError, TensorFlowRequiredError) as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            return _end_quietly()
        # what the user can fix, in one line; any other error (a bug) keeps its traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run_command(args: argparse.Namespace) -> None:
    """The command or stage `args` names."""
    if args.command in COMMANDS:
        COMMANDS[args.command](args)
        return
    if args.command == "config" and (args.defaults or args.schema):
        sys.stdout.write(_config_reference(args.schema))
        return
    config = load_config(args.config or [DEFAULT_CONFIG], args.overrides)
    if args.command == "config":
        sys.stdout.write(render_resolved(config))
        return
    stage = STAGES[args.command]
    options = {"part": args.part, "gather_only": args.gather} if stage.parts else {}
    if stage.report:
        options["report_only"] = args.report
    if stage.trains:
        options["keep_resume_state"] = args.keep_resume_state
    run_stage(stage, config, threads=args.threads, **options)


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has exited (`... | head -1`), not some
    other connection that broke: poll reports an error on the pipe's end then."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # replaced by an object without a descriptor
        return False
    poll = select.poll()
    poll.register(fd, 0)  # errors and hang-ups are reported whatever is asked for
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))


def _end_quietly() -> int:
    """End as a Unix tool killed by SIGPIPE ends (`cat`, `seq`): no message, the status a shell
    shows for it (128 + SIGPIPE = 141). Python ignores SIGPIPE, so the write raised instead;
    what is left in stdout's buffer goes to /dev/null, or flushing it at exit would fail again
    (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


COMMANDS = {
    "generate": generate_command,
    "chat": chat_command,
    "classify": classify_command,
    "import-gpt2": import_gpt2_command,
    "export-hf": export_hf_command,
    "verify": verify_command,
}
