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

STAGES = ("download", "prepare", "pretrain")


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


def checkpoint_tokenizer(checkpoint: Path):
    """The tokenizer files saved beside the weights, else tiktoken's own GPT-2 encoding."""
    from pipeline.data.tokenizer import gpt2_tokenizer

    bpe_dir = checkpoint / "tokenizer"
    return gpt2_tokenizer(bpe_dir if (bpe_dir / "encoder.json").is_file() else None)


def generate_command(args: argparse.Namespace) -> None:
    import torch

    from pipeline.model import GPT
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipeline.data.download import DownloadError
    from pipeline.train import NonFiniteLossError

    try:
        if args.command == "generate":
            generate_command(args)
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

        importlib.import_module(f"pipeline.stages.{args.command}").run(config)
        return 0
    except (ConfigError, DownloadError, NonFiniteLossError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
