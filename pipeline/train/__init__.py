"""One training loop for every stage: ``fit`` plus its task, schedule, devices and resume."""

from pipeline.train.device import measure_peak_flops, pick_device
from pipeline.train.distributed import is_main_process
from pipeline.train.loop import (
    Batches,
    NonFiniteLossError,
    TrainLogger,
    TrainResult,
    TrainTask,
    evaluate_losses,
    fit,
    perplexity,
    resume_fingerprint,
)
from pipeline.train.optim import configure_optimizer, lr_at
from pipeline.train.state import clear_resume_state, read_resume_meta, recorded_run

__all__ = [
    "Batches",
    "NonFiniteLossError",
    "TrainLogger",
    "TrainResult",
    "TrainTask",
    "clear_resume_state",
    "configure_optimizer",
    "evaluate_losses",
    "fit",
    "is_main_process",
    "lr_at",
    "measure_peak_flops",
    "perplexity",
    "pick_device",
    "read_resume_meta",
    "recorded_run",
    "resume_fingerprint",
]
