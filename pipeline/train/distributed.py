"""Multi-process training under `torchrun`: the process group, this process's place in it, and
the collectives the training loop needs.

`torchrun` describes the job in environment variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*);
`init_distributed` joins that group (gloo on CPUs, nccl on GPUs). A process started without
torchrun is a world of one, and every helper here is then a no-op, so single-process runs take
exactly the code path (and produce exactly the numbers) they did before.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.errors import InputError

log = logging.getLogger("pipeline.train")

PARALLELISMS = ("ddp", "fsdp")
COLLECTIVE_TIMEOUT = timedelta(hours=2)
"""How long a process waits in a collective. Generous, because rank 0 alone evaluates, samples
and writes checkpoints under DDP (and generates DPO's before-alignment answers) while the others
wait at the next one; NCCL's default of 10 minutes would cut off a large model's evaluation."""


@dataclass(frozen=True)
class World:
    """This process's rank among `size` training processes (1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs to MLflow and writes checkpoints and outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The world torchrun's environment describes, whether or not its group was joined yet."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def current_world() -> World:
    """The joined process group's world, or a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), launched_world().local_rank)
    return World()


def is_main_process() -> bool:
    return current_world().is_main


def init_distributed(device_type: str) -> World:
    """Join torchrun's process group: nccl when training on CUDA GPUs, gloo otherwise.

    On GPUs each process takes the GPU of its LOCAL_RANK. Returns a world of one (and does
    nothing) when the process was not started by torchrun with more than one process.
    """
    world = launched_world()
    if not world.distributed or dist.is_initialized():
        return current_world()
    if device_type not in ("cpu", "cuda"):
        raise InputError(
            f"multi-process training runs on CPUs (gloo) or CUDA GPUs (nccl), not {device_type}; "
            "set `device: cpu`, or train.nproc_per_node: 1"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} GPU(s) "
                "visible: train.nproc_per_node must not exceed the GPUs per node"
            )
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    log.info("joined process group: rank %d of %d (%s)", world.rank, world.size, backend)
    return current_world()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over all processes (the tensor itself in a world of one)."""
    if current_world().distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
