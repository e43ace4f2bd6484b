import io
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline.errors import InputError
from pipeline.settings import TrainSettings
from pipeline.train import TrainTask, configure_optimizer, fit, lr_at
from pipeline.train.optim import MuonWithAdamW

CPU = torch.device("cpu")


def cfg(**kw) -> TrainSettings:
    base = {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2}
    return TrainSettings(**{**base, "optimizer": "muon", "muon_lr": 0.05, **kw})


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(toy):
    model = toy.TinyLM(tied=True, blocks=True)
    opt = configure_optimizer(model, cfg(weight_decay=0.3), CPU)
    assert isinstance(opt, MuonWithAdamW)
    adamw, muon = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    hidden = model.blocks[0]
    assert ids(muon.param_groups[0]["params"]) == ids([hidden.weight])
    decay, no_decay = adamw.param_groups
    assert ids(decay["params"]) == ids([model.emb.weight])  # the tied head is the embedding
    assert decay["weight_decay"] == 0.3
    assert ids(no_decay["params"]) == ids([model.norm.weight, model.norm.bias, hidden.bias])
    assert muon.param_groups[0]["momentum"] == 0.95 and muon.param_groups[0]["nesterov"]
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0, 0.05 / 1e-2]


def test_muon_without_hidden_matrices_is_an_input_error(toy):
    with pytest.raises(InputError, match="no trainable 2-D weight matrices inside its blocks"):
        configure_optimizer(toy.TinyLM(), cfg(), CPU)
    model = toy.TinyLM(blocks=True)
    model.blocks.requires_grad_(False)
    with pytest.raises(InputError, match="optimizer muon"):
        configure_optimizer(model, cfg(), CPU)


def test_the_schedule_drives_both_learning_rates(toy):
    seen: list[tuple[str, float]] = []

    def record(optimizer, args, kwargs):
        seen.extend((type(optimizer).__name__, g["lr"]) for g in optimizer.param_groups[:1])

    handle = register_optimizer_step_pre_hook(record)
    try:
        c = cfg()
        fit(toy.TinyLM(blocks=True), TrainTask(toy.lm_loss, toy.SuccessorBatches()), c,
            device=CPU, seed=0)  # fmt: skip
    finally:
        handle.remove()
    assert [name for name, _ in seen] == ["AdamW", "Muon"] * c.max_steps
    for step in range(1, c.max_steps + 1):
        adamw_lr, muon_lr = seen[2 * step - 2][1], seen[2 * step - 1][1]
        assert adamw_lr == lr_at(step, c)
        assert muon_lr == pytest.approx(lr_at(step, c) * 0.05 / 1e-2, rel=1e-12)


def test_state_dict_is_index_keyed_like_one_optimizer_and_round_trips(toy):
    torch.manual_seed(0)
    model = toy.TinyLM(tied=True, blocks=True)
    opt = configure_optimizer(model, cfg(), CPU)
    x, y = toy.successor_batch(0, 0, 4)
    toy.lm_loss(model, (x, y)).backward()
    opt.step()
    state = opt.state_dict()
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert sorted(i for g in state["param_groups"] for i in g["params"]) == list(range(n_params))
    assert sorted(state["state"]) == list(range(n_params))
    assert set(state["state"][n_params - 1]) == {"momentum_buffer"}  # Muon's, last

    twin = toy.TinyLM(tied=True, blocks=True)
    twin.load_state_dict(model.state_dict())
    other = configure_optimizer(twin, cfg(), CPU)
    saved = io.BytesIO()  # as a checkpoint keeps it
    torch.save(state, saved)
    saved.seek(0)
    other.load_state_dict(torch.load(saved, weights_only=True))
    for m, o in ((model, opt), (twin, other)):
        o.zero_grad()
        toy.lm_loss(m, toy.successor_batch(0, 1, 4)).backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_muon_under_fsdp_is_refused(toy, monkeypatch):
    from pipeline.train import loop
    from pipeline.train.distributed import World

    monkeypatch.setattr(loop, "current_world", lambda: World(rank=0, size=2, local_rank=0))
    with pytest.raises(InputError, match="FSDP shards them"):
        fit(toy.TinyLM(blocks=True), TrainTask(toy.lm_loss, toy.SuccessorBatches()),
            cfg(parallelism="fsdp"), device=CPU, seed=0)  # fmt: skip


def test_muon_trains_the_toy_model(toy):
    c = cfg(max_steps=30, warmup_steps=3, eval_every=30)
    result = fit(
        toy.TinyLM(blocks=True),
        TrainTask(toy.lm_loss, toy.SuccessorBatches(), eval_sets={"val": toy.eval_set(2)}),
        c, device=CPU, seed=0,
    )  # fmt: skip
    assert result.history[0]["loss"] > 2.5 and result.metrics["val_loss"] < 1.0


# The learning-rate schedule


def schedule_cfg(**kw) -> TrainSettings:
    base = {"max_steps": 110, "batch_size": 2, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10}
    return TrainSettings(**{**base, **kw})


def test_warmup_is_linear_from_zero_to_peak():
    c = schedule_cfg()
    assert lr_at(0, c) == 0.0
    assert lr_at(5, c) == pytest.approx(0.5e-3)
    assert lr_at(10, c) == pytest.approx(1e-3)


def test_cosine_midpoint_and_minimum_at_end():
    c = schedule_cfg()
    assert lr_at(60, c) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(110, c) == pytest.approx(1e-4)
    assert lr_at(500, c) == pytest.approx(1e-4)
    values = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_no_warmup_starts_at_peak():
    c = schedule_cfg(warmup_steps=0)
    assert lr_at(0, c) == pytest.approx(1e-3)
    assert lr_at(55, c) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
