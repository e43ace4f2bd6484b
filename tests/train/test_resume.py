import json
import logging

import pytest
import torch

from pipeline.settings import TrainSettings
from pipeline.train import (
    TrainTask,
    clear_resume_state,
    fit,
    read_resume_meta,
    recorded_run,
    resume_fingerprint,
)

CPU = torch.device("cpu")
TIMING_KEYS = {"tokens_per_second", "train_time_s", "mfu"}


def cfg(**kw) -> TrainSettings:
    base = {
        "max_steps": 10,
        "batch_size": 4,
        "grad_accum_steps": 2,
        "lr": 1e-2,
        "min_lr": 1e-3,
        "warmup_steps": 3,
        "eval_every": 3,
        "eval_batches": 2,
        "checkpoint_every": 3,
        "log_every": 1,
    }
    return TrainSettings(**{**base, **kw})


def sample_fn(model) -> str:
    """Consumes the global RNG like multinomial sampling would, so RNG restore is exercised."""
    return " ".join(str(t) for t in torch.randint(0, 16, (6,)).tolist())


def run(toy, c, resume_dir=None, logger=None, fingerprint=None, batches=None):
    return fit(
        toy.TinyLM(seed=1, dropout=0.2, tied=True),
        TrainTask(
            toy.lm_loss,
            batches or toy.SuccessorBatches(batch_size=4, seed=3),
            eval_sets={"train": toy.eval_set(4), "val": toy.eval_set(5)},
            sample_fn=sample_fn,
        ),
        c,
        device=CPU,
        resume_dir=resume_dir,
        fingerprint=fingerprint or {"data": "abc", "stage": "pretrain"},
        logger=logger,
        seed=1234,
    )


def run_keep_model(toy, c, **kw):
    model = toy.TinyLM(seed=1, dropout=0.2, tied=True, blocks=c.optimizer == "muon")
    kw.setdefault("fingerprint", {"data": "abc", "stage": "pretrain"})
    result = fit(
        model,
        TrainTask(
            toy.lm_loss,
            kw.pop("batches", None) or toy.SuccessorBatches(batch_size=4, seed=3),
            eval_sets={"train": toy.eval_set(4), "val": toy.eval_set(5)},
            sample_fn=sample_fn,
        ),
        c,
        device=CPU,
        **kw,
        seed=1234,
    )
    return model, result


def without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


def numeric(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_after_kill_is_bitwise_identical(toy, tmp_path, optimizer):
    c = cfg(optimizer=optimizer)
    ref_logger = toy.RecordingLogger()
    ref_model, ref = run_keep_model(toy, c, logger=ref_logger)

    resume = tmp_path / "resume"
    with pytest.raises(toy.SimulatedKill):
        run_keep_model(toy, c, resume_dir=resume, logger=toy.RecordingLogger(kill_at=8))
    assert read_resume_meta(resume)["step"] == 6

    logger = toy.RecordingLogger()
    model, result = run_keep_model(toy, c, resume_dir=resume, logger=logger)

    assert result.resumed_from == 6 and result.step == 10
    assert numeric(result.metrics) == numeric(ref.metrics)
    assert without_timing(result.history) == without_timing(ref.history)
    assert_same_weights(model, ref_model)
    assert logger.texts == [t for t in ref_logger.texts if t[0] >= "samples/step_000008"]
    assert [s for s, _ in logger.metrics][0] == 7


def test_finished_state_evaluates_without_training(toy, tmp_path):
    resume = tmp_path / "resume"
    ref_model, ref = run_keep_model(toy, cfg(), resume_dir=resume)
    assert read_resume_meta(resume)["step"] == 10

    class NoBatches(toy.SuccessorBatches):
        def next_batch(self):
            raise AssertionError("must not train")

    model, again = run_keep_model(toy, cfg(), resume_dir=resume, batches=NoBatches())
    assert again.resumed_from == 10 and again.step == 10
    assert numeric(again.metrics) == numeric(ref.metrics)
    assert again.metrics["train_time_s"] == ref.metrics["train_time_s"]
    assert_same_weights(model, ref_model)


def test_other_fingerprint_or_config_starts_fresh(toy, tmp_path, caplog):
    resume = tmp_path / "resume"
    with pytest.raises(toy.SimulatedKill):
        run(toy, cfg(), resume_dir=resume, logger=toy.RecordingLogger(kill_at=5))
    assert read_resume_meta(resume)["step"] == 3

    ref_model, ref = run_keep_model(toy, cfg())
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        model, result = run_keep_model(
            toy, cfg(), resume_dir=resume, fingerprint={"data": "xyz", "stage": "pretrain"}
        )
    assert result.resumed_from is None
    assert "discarding resume state" in caplog.text and "fingerprint" in caplog.text
    assert_same_weights(model, ref_model)
    assert numeric(result.metrics) == numeric(ref.metrics)

    assert run(toy, cfg(lr=2e-2), resume_dir=resume).resumed_from is None
    assert run(toy, cfg(lr=2e-2, log_every=5), resume_dir=resume).resumed_from == 10


def test_only_the_main_process_says_it_discards_a_resume_state(toy, tmp_path, caplog, monkeypatch):
    """Under torchrun every rank loads (and discards) the state; the warning is printed once."""
    resume = tmp_path / "resume"
    with pytest.raises(toy.SimulatedKill):
        run(toy, cfg(), resume_dir=resume, logger=toy.RecordingLogger(kill_at=5))
    monkeypatch.setattr("pipeline.train.state.is_main_process", lambda: False)  # rank 1
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        result = run(toy, cfg(lr=2e-2), resume_dir=resume)
    assert result.resumed_from is None and "discarding resume state" not in caplog.text


def test_a_discarded_resume_state_names_the_settings_that_changed(toy, tmp_path, caplog):
    """The dotted path of each changed leaf (the stage's own fingerprint without its wrapper),
    a few of them, then how many more."""
    resume = tmp_path / "resume"
    stage = {"data": "abc", "section": {"epochs": 2, "method": "full"}, "stage": "pretrain"}
    run(toy, cfg(max_steps=3), resume_dir=resume, fingerprint=stage)

    def discarded(c, fingerprint) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.train"):
            assert run(toy, c, resume_dir=resume, fingerprint=fingerprint).resumed_from is None
        (message,) = [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()]
        return message.split(": ", 1)[1]

    changed = {**stage, "section": {"epochs": 3, "method": "full"}}
    assert discarded(cfg(max_steps=3, lr=2e-2), changed) == (
        "fingerprint differs in section.epochs, train.lr; starting fresh"
    )
    run(toy, cfg(max_steps=3), resume_dir=resume, fingerprint=stage)
    many = {"data": "xyz", "section": {"epochs": 3, "method": "lora"}, "seed": 1}
    assert discarded(cfg(max_steps=3, lr=2e-2, min_lr=2e-3), many) == (
        "fingerprint differs in data, section.epochs, section.method, seed and 3 more; "
        "starting fresh"
    )


def test_interrupted_checkpoint_swap_is_recovered(toy, tmp_path):
    resume = tmp_path / "resume"
    with pytest.raises(toy.SimulatedKill):
        run(toy, cfg(), resume_dir=resume, logger=toy.RecordingLogger(kill_at=5))
    old = tmp_path / ".resume.old"
    resume.rename(old)
    (tmp_path / ".resume.tmp-999").mkdir()
    assert read_resume_meta(resume)["step"] == 3

    result = run(toy, cfg(), resume_dir=resume)
    assert result.resumed_from == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume"]


def test_clear_resume_state(toy, tmp_path):
    resume = tmp_path / "resume"
    run(toy, cfg(max_steps=3), resume_dir=resume)
    assert {p.name for p in resume.iterdir()} == {
        "model.safetensors", "optimizer.pt", "rng.safetensors", "state.json",
    }  # fmt: skip
    clear_resume_state(resume)
    assert not resume.exists()
    clear_resume_state(resume)

    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "model.safetensors").write_text("x")
    (foreign / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError):
        clear_resume_state(foreign)
    with pytest.raises(FileExistsError):
        run(toy, cfg(max_steps=3), resume_dir=foreign)
    assert (foreign / "metrics.json").exists()


def test_checkpoints_record_the_run_and_older_states_still_resume(toy, tmp_path):
    resume, data = tmp_path / "resume", {"data": "abc", "stage": "pretrain"}
    logger = toy.RecordingLogger(kill_at=5)
    logger.run_id = "mlflow-run-1"
    with pytest.raises(toy.SimulatedKill):
        run(toy, cfg(), resume_dir=resume, logger=logger)
    assert recorded_run(resume, resume_fingerprint(cfg(), 1234, data)) == ("mlflow-run-1", True)
    other = resume_fingerprint(cfg(lr=2e-2), 1234, data)
    assert recorded_run(resume, other) == ("mlflow-run-1", False)
    assert recorded_run(tmp_path / "none", other) == ("", False)

    state = resume / "state.json"  # as written before checkpoints recorded their run
    meta = json.loads(state.read_text())
    del meta["tracking_run"]
    state.write_text(json.dumps({**meta, "version": 2}))
    assert recorded_run(resume, resume_fingerprint(cfg(), 1234, data)) == ("", True)
    assert run(toy, cfg(), resume_dir=resume).resumed_from == 3
    state.write_text(json.dumps({**meta, "version": 1}))
    assert run(toy, cfg(), resume_dir=resume).resumed_from is None
