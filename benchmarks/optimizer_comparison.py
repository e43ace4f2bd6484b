"""Pretraining with AdamW vs Muon at several Muon learning rates: the val loss each reaches.

    python benchmarks/optimizer_comparison.py --data data [--steps 250] [--batch 16]
        [--contenders adamw muon:0.01 muon:0.02 muon:0.05] [--threads N]

Each contender is the default `tiny` pretraining (`pretrain.train`'s schedule and AdamW
settings, `train.optimizer` and `train.muon_lr` as named) run by `fit` from the same initial
weights on the same batches of the prepared tokens in `--data`/tokens; then all are scored by
one evaluation on the whole val split (loss and bits per byte). Contenders run one after the
other (start one process per contender to use more cores); the result is a loss, not a time,
so load does not bias it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.loader import TokenWindows, evaluation_batches  # noqa: E402
from pipeline.data.tokenizer import gpt2_tokenizer, token_byte_lengths  # noqa: E402
from pipeline.data.tokens import load_tokens  # noqa: E402
from pipeline.model import GPT, GPTConfig  # noqa: E402
from pipeline.model.attention import choose_attention  # noqa: E402
from pipeline.settings import PretrainTrain  # noqa: E402
from pipeline.train import TrainTask, evaluate_losses, fit  # noqa: E402
from pipeline.train.losses import lm_loss  # noqa: E402

CPU = torch.device("cpu")
SEED = 1337


def settings(contender: str, steps: int, batch: int) -> PretrainTrain:
    """`adamw`, or `muon:<lr>`: the default pretraining settings with that optimizer."""
    base = dataclasses.replace(PretrainTrain(), max_steps=steps, batch_size=batch,
                               checkpoint_every=0, eval_every=steps, log_every=25)  # fmt: skip
    if contender == "adamw":
        return dataclasses.replace(base, optimizer="adamw")
    name, _, lr = contender.partition(":")
    if name != "muon" or not lr:
        raise SystemExit(f"contender {contender!r}: expected adamw or muon:<lr>")
    return dataclasses.replace(base, optimizer="muon", muon_lr=float(lr))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"), help="paths.data")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--contenders", nargs="+", default=["adamw", "muon:0.02"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    train, val = (
        load_tokens(args.data / "tokens", "train"),
        load_tokens(args.data / "tokens", "val"),
    )
    token_bytes = torch.tensor(token_byte_lengths(gpt2_tokenizer(args.data / "raw" / "gpt2-bpe")))
    config = GPTConfig.from_preset("tiny")
    ctx = config.context_length
    whole_val = evaluation_batches(val, ctx, args.batch, (len(val) - 1) // ctx // args.batch)
    print(f"tiny, {args.steps} steps x {args.batch} x {ctx} tokens, {torch.get_num_threads()} "
          f"threads; val: {len(whole_val) * args.batch * ctx} tokens")  # fmt: skip
    for contender in args.contenders:
        cfg = settings(contender, args.steps, args.batch)
        torch.manual_seed(SEED)
        model = GPT(config)
        model.set_attention(choose_attention("auto", CPU, 0.0).name)
        batches = TokenWindows(train, ctx, args.batch, seed=SEED)
        start = time.perf_counter()
        fit(model, TrainTask(lm_loss, batches), cfg, device=CPU, seed=SEED)
        seconds = time.perf_counter() - start
        model.eval()
        scores = evaluate_losses(model, lm_loss, {"val": lambda: whole_val}, len(whole_val),
                                 CPU, "fp32", token_bytes)  # fmt: skip
        print(f"{contender:<10} val_loss {scores['val_loss']:.4f} val_bpb "
              f"{scores['val_bpb']:.4f} ({seconds:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
