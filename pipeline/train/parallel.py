"""How `fit` runs the model: in one process, replicated with DistributedDataParallel, or sharded
with FSDP (`fully_shard`).

The stage's own model object stays a plain module whatever the strategy: under FSDP a sharded
copy trains and its full weights are written back into the stage's model at every checkpoint and
at the end. Checkpoints therefore hold the same full tensors and index-keyed optimizer state for
every strategy and world size, which is what lets a run resume under another one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.train.distributed import World
from pipeline.train.optim import OptimizerLike

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

OptimizerFactory = Callable[[nn.Module], OptimizerLike]


def _full(value: Any) -> Any:
    """A sharded (DTensor) value gathered whole on every process; other values as they are."""
    # deferred: torch.distributed.tensor adds ~1 s to the import; only sharded runs have DTensors
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


class ParallelModel:
    """The module `loss_fn` trains, the one evaluation uses, and their optimizer.

    `train_module` goes through DDP's forward (so gradients are averaged over processes);
    `eval_module` does not, so evaluation and sampling run without collectives under DDP.
    """

    def __init__(
        self,
        model: nn.Module,
        make_optimizer: OptimizerFactory,
        world: World,
        *,
        parallelism: str = "ddp",
        compile: bool = False,
        device: torch.device,
    ) -> None:
        self.model = model
        self.world = world
        self.sharded = world.distributed and parallelism == "fsdp"
        self._fsdp: FSDPModule | None = None
        if self.sharded:
            # deferred: FSDP's modules add ~1 s to the import; only sharded runs use them
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # The full model waits in CPU memory; its copy is sharded onto the training device
            # (by default fully_shard would pick the machine's accelerator, even for a CPU run).
            model.to("cpu")
            trained = copy.deepcopy(model)
            mesh = init_device_mesh(device.type, (world.size,))
            for block in getattr(trained, "blocks", ()):
                fully_shard(block, mesh=mesh)
            self._fsdp = fully_shard(trained, mesh=mesh)  # `trained` itself, now an FSDPModule
        else:
            trained = model.to(device)
        self.trained = trained
        self.optimizer = make_optimizer(trained)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # torch.compile's stubs type its result as the callable it was given; for a module it is
        # an OptimizedModule (an nn.Module).
        self.eval_module: nn.Module = (
            cast(nn.Module, torch.compile(trained)) if compile else trained
        )
        self._ddp: DistributedDataParallel | None = None
        if world.distributed and not self.sharded:
            device_ids = [device.index] if device.type == "cuda" else None
            self._ddp = DistributedDataParallel(
                self.eval_module, device_ids=device_ids, broadcast_buffers=False
            )
        self.train_module: nn.Module = self._ddp or self.eval_module

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        """Skip the gradient all-reduce (accumulation micro-steps before the last) when `skip`."""
        if not skip or not self.world.distributed:
            yield
        elif self.sharded:
            assert self._fsdp is not None
            self._fsdp.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self._fsdp.set_requires_gradient_sync(True)
        else:
            assert self._ddp is not None
            with self._ddp.no_sync():
                yield

    def grad_norm(self, max_norm: float) -> torch.Tensor:
        """Total L2 gradient norm over all processes' shards before clipping; clips in place
        when `max_norm` > 0."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else torch.inf)
        return _full(norm)

    def sync_model(self) -> nn.Module:
        """The stage's plain model holding the trained weights (gathered from the shards)."""
        if self.sharded:
            with torch.no_grad():
                for full, shard in zip(
                    self.model.parameters(), self.trained.parameters(), strict=True
                ):
                    full.copy_(_full(shard.detach()))
        return self.model

    def optimizer_state(self) -> dict:
        """The optimizer state as one process would hold it: full tensors, keyed by index."""
        state = self.optimizer.state_dict()
        if not self.sharded:
            return state
        return {
            "state": {
                i: {k: _full(v).cpu() for k, v in s.items()} for i, s in state["state"].items()
            },
            "param_groups": state["param_groups"],
        }

    def load_optimizer_state(self, state: dict) -> None:
        """Load `optimizer_state()`'s format, sharding each tensor like its parameter."""
        if self.sharded:
            # deferred: torch.distributed.tensor adds ~1 s to the import; only sharded runs use it
            from torch.distributed.tensor import distribute_tensor

            state = {
                "state": {
                    int(i): {
                        k: self._shard_like(self.params[int(i)], v, distribute_tensor)
                        for k, v in s.items()
                    }
                    for i, s in state["state"].items()
                },
                "param_groups": state["param_groups"],
            }
        self.optimizer.load_state_dict(state)

    @staticmethod
    def _shard_like(param: torch.Tensor, value: Any, distribute_tensor: Callable) -> Any:
        if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0:
            # deferred: torch.distributed.tensor adds ~1 s to the import; only sharded runs get here
            from torch.distributed.tensor import DTensor

            assert isinstance(param, DTensor)  # fully_shard made every parameter a DTensor
            return distribute_tensor(
                value.to(param.device_mesh.device_type), param.device_mesh, param.placements
            )
        return value

    def finish(self, device: torch.device) -> nn.Module:
        """The stage's plain model with the final weights, back on `device`."""
        model = self.sync_model()
        return model.to(device)
