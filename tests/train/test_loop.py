import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline.settings import TrainSettings
from pipeline.train import (
    NonFiniteLossError,
    TrainTask,
    configure_optimizer,
    evaluate_losses,
    fit,
    lr_at,
)
from pipeline.train.device import PeakFlops
from pipeline.train.loop import autocast
from pipeline.train.losses import IGNORE_INDEX
from pipeline.train.state import read_resume_meta

CPU = torch.device("cpu")


def cfg(**kw) -> TrainSettings:
    base = {
        "max_steps": 6,
        "batch_size": 4,
        "lr": 1e-2,
        "min_lr": 1e-3,
        "warmup_steps": 2,
        "eval_every": 0,
        "checkpoint_every": 0,
        "log_every": 1,
    }
    return TrainSettings(**{**base, **kw})


class FixedBatches:
    """Replays a fixed list of batches (resumable by position)."""

    def __init__(self, batches):
        self.batches = batches
        self.index = 0

    def next_batch(self):
        batch = self.batches[self.index]
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def test_optimizer_groups_split_decay_and_skip_frozen(toy, caplog):
    model = toy.TinyLM()
    model.frozen = nn.Linear(3, 3)
    model.frozen.requires_grad_(False)
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        opt = configure_optimizer(model, cfg(weight_decay=0.3), CPU)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model.emb.weight, model.head.weight])
    assert ids(no_decay["params"]) == ids([model.norm.weight, model.norm.bias, model.head.bias])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable parameters: {trainable:,}" in caplog.text


def test_frozen_parameters_do_not_change(toy):
    model = toy.TinyLM()
    model.emb.weight.requires_grad_(False)
    before = model.emb.weight.detach().clone()
    fit(
        model,
        TrainTask(toy.lm_loss, toy.SuccessorBatches()),
        cfg(max_steps=3),
        device=CPU,
        seed=1234,
    )
    assert torch.equal(model.emb.weight, before)


def test_gradient_accumulation_matches_one_big_batch(toy):
    big = [toy.successor_batch(7, i, 8) for i in range(3)]
    halves = [tuple(t[s] for t in b) for b in big for s in (slice(0, 4), slice(4, 8))]
    m1, m2 = toy.TinyLM(seed=3), toy.TinyLM(seed=3)
    c = cfg(max_steps=3, warmup_steps=0)
    r1 = fit(m1, TrainTask(toy.lm_loss, FixedBatches(big)), c, device=CPU, seed=1234)
    r2 = fit(
        m2,
        TrainTask(toy.lm_loss, FixedBatches(halves)),
        cfg(max_steps=3, warmup_steps=0, grad_accum_steps=2),
        device=CPU,
        seed=1234,
    )
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    for h1, h2 in zip(r1.history, r2.history, strict=True):
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-5)
        assert h1["grad_norm"] == pytest.approx(h2["grad_norm"], rel=1e-4)
    assert r2.history[-1]["tokens"] == r1.history[-1]["tokens"] == 3 * 8 * toy.SEQ


def test_clipping_bounds_the_gradient_norm_seen_by_the_optimizer(toy):
    seen: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.nn.utils.get_total_norm(grads).item())

    def scaled_loss(model, batch):
        return 1000.0 * toy.lm_loss(model, batch)

    handle = register_optimizer_step_pre_hook(record)
    try:
        result = fit(
            toy.TinyLM(),
            TrainTask(scaled_loss, toy.SuccessorBatches()),
            cfg(max_steps=3, grad_clip=0.5),
            device=CPU,
            seed=1234,
        )
    finally:
        handle.remove()
    assert len(seen) == 3
    assert all(n <= 0.5 * (1 + 1e-5) for n in seen)
    assert all(h["grad_norm"] > 0.5 for h in result.history)

    seen.clear()
    handle = register_optimizer_step_pre_hook(record)
    try:
        result = fit(
            toy.TinyLM(),
            TrainTask(scaled_loss, toy.SuccessorBatches()),
            cfg(max_steps=2, grad_clip=0.0),
            device=CPU,
            seed=1234,
        )
    finally:
        handle.remove()
    assert seen == pytest.approx([h["grad_norm"] for h in result.history], rel=1e-5)
    assert min(seen) > 0.5


def test_loss_decreases_on_a_learnable_task(toy):
    c = cfg(max_steps=60, lr=3e-2, min_lr=3e-3, warmup_steps=5, eval_every=30, log_every=10)
    sets = {"val": toy.eval_set(seed=99)}
    result = fit(
        toy.TinyLM(),
        TrainTask(toy.lm_loss, toy.SuccessorBatches(), eval_sets=sets),
        c,
        device=CPU,
        seed=1234,
    )
    evals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert len(evals) == 2
    assert evals[-1] < 0.5 * math.log(toy.VOCAB)
    assert result.metrics["val_loss"] == evals[-1]
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_eval_sample_and_logger_calls_happen_at_the_right_steps(toy, caplog):
    logger = toy.RecordingLogger()
    sampled: list[int] = []

    def sample_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        sampled.append(len(sampled))
        return f"sample {len(sampled)}"

    c = cfg(max_steps=7, eval_every=3, log_every=2, eval_batches=2)
    calls = {"n": 0}

    def counting_eval():
        calls["n"] += 1
        return iter([toy.successor_batch(5, i, 4) for i in range(5)])

    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        result = fit(
            toy.TinyLM(),
            TrainTask(
                toy.lm_loss,
                toy.SuccessorBatches(),
                eval_sets={"train": toy.eval_set(1), "val": counting_eval},
                sample_fn=sample_fn,
                flops_per_token=100.0,
                peak_flops=PeakFlops(1e9, "a test figure"),
            ),
            c,
            device=CPU,
            logger=logger,
            seed=1234,
        )

    assert result.step == 7 and result.resumed_from is None
    train_steps = [s for s, m in logger.metrics if "loss" in m]
    eval_steps = [s for s, m in logger.metrics if "val_loss" in m]
    assert train_steps == [1, 2, 4, 6, 7]
    assert eval_steps == [3, 6, 7]
    assert calls["n"] == 3
    assert [f for f, _ in logger.texts] == [f"samples/step_{s:06d}.txt" for s in (3, 6, 7)]
    assert logger.texts[0][1] == "sample 1"

    for s, m in logger.metrics:
        if "loss" in m:
            assert m["lr"] == pytest.approx(lr_at(s, c))
            assert m["mfu"] == pytest.approx(100.0 * m["tokens_per_second"] / 1e9)
    assert set(result.metrics) == {
        "train_loss", "train_perplexity", "val_loss", "val_perplexity",
        "tokens_per_second", "train_time_s",
    }  # fmt: skip
    assert result.metrics["val_perplexity"] == pytest.approx(math.exp(result.metrics["val_loss"]))
    assert result.metrics["tokens_per_second"] > 0
    by_step = {h["step"]: h for h in result.history}
    assert sorted(by_step) == [1, 2, 3, 4, 6, 7]
    assert "val_loss" in by_step[3] and "loss" not in by_step[3]
    assert "val_loss" in by_step[6] and "loss" in by_step[6]
    assert "step 4/7 | loss " in caplog.text and " tok/s | mfu " in caplog.text
    assert re.search(r"step 4/7 \| .* \| eta \d+s\n", caplog.text)  # time left
    assert "step 6/7 | eval | train_loss " in caplog.text


def test_eval_loss_is_the_mean_over_the_first_eval_batches(toy):
    model = toy.TinyLM()
    batches = [toy.successor_batch(5, i, 4) for i in range(6)]
    c = cfg(max_steps=1, eval_batches=3, lr=0.0, min_lr=0.0)
    result = fit(
        model,
        TrainTask(toy.lm_loss, toy.SuccessorBatches(), eval_sets={"val": lambda: iter(batches)}),
        c,
        device=CPU,
        seed=1234,
    )
    model.eval()
    with torch.no_grad():
        expected = sum(toy.lm_loss(model, b).item() for b in batches[:3]) / 3
    assert result.metrics["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_nan_loss_raises_and_keeps_last_good_checkpoint(toy, tmp_path):
    calls = {"n": 0}

    def nan_at_step_5(model, batch):
        calls["n"] += 1
        loss = toy.lm_loss(model, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    resume = tmp_path / "resume"
    c = cfg(max_steps=8, checkpoint_every=2)
    model = toy.TinyLM()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 5"):
        fit(
            model,
            TrainTask(nan_at_step_5, toy.SuccessorBatches()),
            c,
            device=CPU,
            resume_dir=resume,
            seed=1234,
        )
    assert read_resume_meta(resume)["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())

    result = fit(
        toy.TinyLM(),
        TrainTask(toy.lm_loss, toy.SuccessorBatches()),
        c,
        device=CPU,
        resume_dir=resume,
        seed=1234,
    )
    assert result.resumed_from == 4 and result.step == 8


def test_bf16_autocast_trains(toy):
    c = cfg(max_steps=3, precision="bf16", eval_every=3)
    result = fit(
        toy.TinyLM(),
        TrainTask(toy.lm_loss, toy.SuccessorBatches(), eval_sets={"val": toy.eval_set(2)}),
        c,
        device=CPU,
        seed=1234,
    )
    assert math.isfinite(result.metrics["val_loss"])


def test_bf16_autocast_keeps_fp32_master_weights_and_optimizer_state(toy):
    model = toy.TinyLM(blocks=True)
    for optimizer in ("adamw", "muon"):
        opt = configure_optimizer(model, cfg(optimizer=optimizer), CPU)
        with autocast(CPU, "bf16"):
            logits = model(toy.successor_batch(0, 0, 4)[0])
        assert logits.dtype == torch.bfloat16  # the matmuls ran in bf16
        F.cross_entropy(
            logits.flatten(0, 1).float(), toy.successor_batch(0, 0, 4)[1].flatten()
        ).backward()
        opt.step()
        opt.zero_grad()
        states = [v for o in getattr(opt, "optimizers", [opt]) for s in o.state.values()
                  for v in s.values() if v.dim() > 0]  # fmt: skip
        assert states and {t.dtype for t in [*model.parameters(), *states]} == {torch.float32}


def test_mfu_against_a_peak_below_the_throughput_stays_at_most_100_percent(toy, caplog):
    """A peak measured while the machine was busy: the steps prove it low, and MFU is then
    against what they achieved (once warned), never above 100%."""
    logger, peak = toy.RecordingLogger(), PeakFlops(1.0, "a busy measurement")
    task = TrainTask(toy.lm_loss, toy.SuccessorBatches(), flops_per_token=100.0, peak_flops=peak)
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        fit(toy.TinyLM(), task, cfg(max_steps=4), device=CPU, logger=logger, seed=0)
    logged = [m for _, m in logger.metrics if "mfu" in m]
    assert len(logged) == 4 and all(0 < m["mfu"] <= 1.0 for m in logged)
    assert peak.flops >= max(100.0 * m["tokens_per_second"] for m in logged)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "above the peak of 1 FLOP/s (a busy measurement)" in warning


def test_eval_fn_metrics_are_logged_with_the_losses_in_eval_mode(toy, caplog):
    logger = toy.RecordingLogger()

    def eval_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        return {"val_accuracy": 0.75}

    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        result = fit(
            toy.TinyLM(),
            TrainTask(
                toy.lm_loss,
                toy.SuccessorBatches(),
                eval_sets={"val": toy.eval_set(1)},
                eval_fn=eval_fn,
            ),
            cfg(max_steps=4, eval_every=2),
            device=CPU,
            logger=logger,
            seed=1234,
        )
    evaluated = [(s, m) for s, m in logger.metrics if "val_loss" in m]
    assert [s for s, _ in evaluated] == [2, 4]
    assert all(m["val_accuracy"] == 0.75 for _, m in evaluated)
    assert result.metrics["val_accuracy"] == 0.75
    assert "step 4/4 | eval | val_loss " in caplog.text and "val_accuracy 0.75" in caplog.text


def test_statistics_returned_beside_the_loss_are_logged_per_step(toy):
    logger = toy.RecordingLogger()

    def loss_with_stats(model, batch):
        loss = toy.lm_loss(model, batch)
        return loss, {"twice_the_loss": 2 * loss}

    fit(
        toy.TinyLM(),
        TrainTask(loss_with_stats, toy.SuccessorBatches(), eval_sets={"val": toy.eval_set(1)}),
        cfg(max_steps=3, grad_accum_steps=2, eval_every=3),
        device=CPU,
        logger=logger,
        seed=1234,
    )
    logged = [m for _, m in logger.metrics if "loss" in m]
    assert len(logged) == 3
    for m in logged:
        assert m["twice_the_loss"] == pytest.approx(2 * m["loss"])


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0.4, "0s"), (42, "42s"), (302.4, "5m02s"), (4020, "1h07m")]
)
def test_time_left_is_shown_in_seconds_minutes_or_hours(seconds, shown):
    from pipeline.train.loop import _duration

    assert _duration(seconds) == shown


class FixedLogits(nn.Module):
    """Logits that depend only on the input token (a V x V table): a model to score by hand."""

    def __init__(self, vocab: int, uniform: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(vocab, vocab)
        if uniform:
            nn.init.zeros_(self.table.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x)


def mean_over_learned(model, batch):
    """The LM-loss contract bits per byte relies on: the mean over targets not IGNORE_INDEX."""
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)


def masked_batches(toy):
    """Two batches whose learned-target counts differ (a mean of batch means would be wrong)."""
    x, y = toy.successor_batch(0, 0, 4)
    x2, y2 = toy.successor_batch(0, 1, 4)
    y2 = y2.clone()
    y2[:, :5] = IGNORE_INDEX
    return [(x, y), (x2, y2)]


@pytest.mark.parametrize("uniform", [True, False])
def test_bits_per_byte_is_total_nats_over_the_learned_targets_bytes(toy, uniform):
    model = FixedLogits(toy.VOCAB, uniform).eval()
    token_bytes = torch.tensor([1 + i % 4 for i in range(toy.VOCAB)])
    batches = masked_batches(toy)
    metrics = evaluate_losses(
        model, mean_over_learned, {"val": lambda: batches}, 5, CPU, token_bytes=token_bytes
    )
    learned = torch.cat([y[y != IGNORE_INDEX] for _, y in batches])
    n_bytes = sum(1 + int(t) % 4 for t in learned)
    if uniform:  # every token costs ln V nats
        expected = math.log(toy.VOCAB) / math.log(2) * len(learned) / n_bytes
    else:
        nats = sum(
            -torch.log_softmax(model(x).double(), -1)[y != IGNORE_INDEX]
            .gather(-1, y[y != IGNORE_INDEX].unsqueeze(-1))
            .sum()
            .item()
            for x, y in batches
        )
        expected = nats / math.log(2) / n_bytes
    assert metrics["val_bpb"] == pytest.approx(expected, rel=1e-6)
    assert "val_bpb" not in evaluate_losses(
        model, mean_over_learned, {"val": lambda: batches}, 5, CPU
    )


def test_bits_per_byte_skips_all_ignored_batches_and_zero_byte_sets(toy):
    model = FixedLogits(toy.VOCAB, uniform=True).eval()
    x, y = toy.successor_batch(0, 0, 4)
    ignored = torch.full_like(y, IGNORE_INDEX)
    token_bytes = torch.ones(toy.VOCAB, dtype=torch.long)
    sets = {"val": lambda: [(x, y), (x, ignored)], "special": lambda: [(x, y)]}
    metrics = evaluate_losses(model, mean_over_learned, sets, 5, CPU, token_bytes=token_bytes)
    assert metrics["val_bpb"] == pytest.approx(math.log2(toy.VOCAB))  # one byte per token
    token_bytes[y.unique()] = 0  # the set's targets are all special tokens: no text, no bpb
    metrics = evaluate_losses(model, mean_over_learned, sets, 5, CPU, token_bytes=token_bytes)
    assert "special_bpb" not in metrics and "val_bpb" not in metrics


def test_fit_reports_bits_per_byte_in_its_evaluations(toy):
    token_bytes = torch.full((toy.VOCAB,), 2)
    task = TrainTask(toy.lm_loss, toy.SuccessorBatches(), token_bytes=token_bytes,
                     eval_sets={"train": toy.eval_set(4), "val": toy.eval_set(5)})  # fmt: skip
    result = fit(toy.TinyLM(), task, cfg(max_steps=4, eval_every=2), device=CPU, seed=0)
    for entry in (result.metrics, result.history[-1]):
        for split in ("train", "val"):
            assert entry[f"{split}_bpb"] == pytest.approx(entry[f"{split}_loss"] / math.log(2) / 2)
