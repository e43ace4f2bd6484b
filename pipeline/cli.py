"""`python -m pipeline <command>`: every stage runs alone too; Snakemake only wires the files."""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, ConfigError, load_config

log = logging.getLogger("pipeline")

STAGES = ("download", "prepare", "pretrain", "finetune-classifier")


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
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        _add_config_args(commands.add_parser(stage, help=f"run the {stage} stage"))
    _add_config_args(
        commands.add_parser("config", help="print the resolved, validated configuration")
    )

    cls = commands.add_parser("classify", help="label texts with a fine-tuned classifier")
    cls.add_argument("--checkpoint", type=Path, required=True, help="classifier checkpoint")
    cls.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    cls.add_argument(
        "--input", type=Path, help="one text a line, or a TSV whose header has a 'text' column"
    )
    cls.add_argument("--output", type=Path, help="predictions TSV (default: stdout)")
    cls.add_argument("--batch-size", type=int, default=32)
    cls.add_argument("--device", default="auto")

    gen = commands.add_parser("generate", help="continue a prompt with a trained checkpoint")
    gen.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    gen.add_argument(
        "--no-cache", action="store_true", help="recompute every step instead of a KV cache"
    )
    gen.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    gen.add_argument("--device", default="auto")
    gen.add_argument(
        "--attention", default=None, help="attention backend (default: the checkpoint's)"
    )
    return parser


def stream_text(token_ids: Iterator[int], tokenizer) -> Iterator[str]:
    """Decode token by token without splitting a UTF-8 character across tokens."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_ids:
        if text := decoder.decode(tokenizer.decode_single_token_bytes(token)):
            yield text
    if tail := decoder.decode(b"", final=True):
        yield tail


def generate_command(args: argparse.Namespace) -> None:
    import torch

    from pipeline.model import GPT
    from pipeline.model.checkpoint import checkpoint_tokenizer
    from pipeline.model.generate import generate_tokens
    from pipeline.train import pick_device

    device = pick_device(args.device)
    attention = args.attention
    if attention is None and device.type != "cpu":
        attention = "sdpa"  # the fused op has a CPU kernel only; all backends give the same output
    model = GPT.from_checkpoint(args.checkpoint, device=device, attention=attention)
    tokenizer = checkpoint_tokenizer(args.checkpoint)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    ids = generate_tokens(
        model,
        tokenizer.encode_ordinary(args.prompt),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=None if args.no_stop else tokenizer.eot_token,
        use_cache=not args.no_cache,
        generator=generator,
    )
    sys.stdout.write(args.prompt)
    for piece in stream_text(ids, tokenizer):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def read_texts(path: Path) -> list[str]:
    """Texts from a TSV with a `text` column, else one per line; a clear error names the line."""
    from pipeline.data.labeled_text import read_tsv

    data = path.read_bytes()
    first_line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if b"\t" in first_line and b"text" in first_line.split(b"\t"):
        return [r.text for r in read_tsv(path, require_label=False)]
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path}:{number}: empty text")
    return lines


def classify_command(args: argparse.Namespace) -> None:
    from pipeline.model import load_checkpoint
    from pipeline.model.checkpoint import checkpoint_tokenizer
    from pipeline.model.classifier import GPTClassifier
    from pipeline.stages.finetune_classifier import encode_texts, predict_probabilities
    from pipeline.train import pick_device

    if bool(args.texts) == bool(args.input):
        raise ValueError("give texts as arguments or --input FILE (one of the two)")
    texts = read_texts(args.input) if args.input else list(args.texts)
    for i, text in enumerate(texts, start=1):
        if not text.strip():
            raise ValueError(f"text {i} is empty")
    device = pick_device(args.device)
    model = load_checkpoint(
        args.checkpoint, device=device, attention=None if device.type == "cpu" else "sdpa"
    )
    if not isinstance(model, GPTClassifier):
        raise ValueError(f"{args.checkpoint} is a language model, not a classifier checkpoint")
    model.eval()
    tokenizer = checkpoint_tokenizer(args.checkpoint)
    ids, truncated = encode_texts(texts, tokenizer, model.config.context_length)
    if truncated:
        log.info("%d text(s) truncated to %d tokens", truncated, model.config.context_length)
    probs = predict_probabilities(model, ids, args.batch_size)
    rows = ["label\tprobability\ttext"]
    for text, p in zip(texts, probs, strict=True):
        best = int(p.argmax())
        rows.append(f"{model.labels[best]}\t{float(p[best]):.4f}\t{text}")
    table = "\n".join(rows) + "\n"
    if args.output:
        from pipeline.io import atomic_write_text

        atomic_write_text(args.output, table)
        log.info("wrote %d predictions to %s", len(texts), args.output)
    else:
        sys.stdout.write(table)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipeline.data.download import DownloadError
    from pipeline.train import NonFiniteLossError

    try:
        if args.command in COMMANDS:
            COMMANDS[args.command](args)
            return 0
        config = load_config(args.config or [DEFAULT_CONFIG], args.overrides)
        if args.command == "config":
            import yaml

            sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
            return 0
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        import importlib

        importlib.import_module(f"pipeline.stages.{args.command.replace('-', '_')}").run(config)
        return 0
    except (ConfigError, DownloadError, NonFiniteLossError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


COMMANDS = {"generate": generate_command, "classify": classify_command}
