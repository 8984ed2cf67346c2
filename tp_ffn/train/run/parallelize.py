"""Process group, the 2-D ("dp", "tp") device mesh, and wrapping the model for training.

Ranks are laid out tp-fastest, so the ranks of one TP group are neighbours (on the same node when
``--nproc_per_node`` is a multiple of ``tp``)::

    world 8, tp 2, dp 4:     tp ->
                        dp   [[0, 1],
                        |     [2, 3],
                        v     [4, 5],
                              [6, 7]]

The model gets ``mesh["tp"]`` as its group (never the world, never ``LOCAL_RANK``); FSDP2
(``fully_shard``) shards each transformer block and the root over ``mesh["dp"]``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from ...models.llama import Transformer
from ..errors import UsageError

__all__ = ["Runtime", "apply_activation_checkpointing", "init_runtime", "parallelize"]


@dataclass
class Runtime:
    """Where this process runs: its device, the world, and whether it created the process group."""

    device: torch.device
    rank: int
    world: int
    created_group: bool

    def shutdown(self, *, synchronize: bool = True) -> None:
        """Destroy the process group this process created; with ``synchronize``, once every rank
        got here (only on success: after a failure a peer may never arrive).

        The model, FSDP2's state and their pending collective handles form reference cycles; they
        are collected first, while the interpreter is whole. Left to interpreter shutdown, gloo's
        threads may release them after Python is gone, which aborts the process (SIGABRT,
        "terminate called without an active exception") after a run that otherwise succeeded.
        """
        if self.created_group and dist.is_initialized():
            gc.collect()
            try:
                if synchronize:
                    dist.barrier()
            finally:
                dist.destroy_process_group()

    @contextlib.contextmanager
    def session(self) -> Iterator[Runtime]:
        """The body of a command on every rank: a :class:`UsageError` this rank saw alone gets its
        number (it reports it, see :func:`~tp_ffn.train.consensus.report_error`), and the process
        group is shut down on the way out, in step with the others only after success."""
        ok = False
        try:
            yield self
            ok = True
        except UsageError as e:
            if not e.agreed and self.world > 1:
                e.rank = self.rank
            raise
        finally:
            self.shutdown(synchronize=ok)


def init_runtime(device: str = "auto", timeout_s: float = 600) -> Runtime:
    """Initialise the default process group from torchrun's environment (NCCL on CUDA, gloo on CPU)
    unless one exists; without torchrun's variables, a world of one.

    ``LOCAL_RANK`` only picks the GPU of this process.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available (torch.cuda.is_available() is False); use --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    created = False
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            timeout = timedelta(seconds=timeout_s)
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            # torchrun keeps one store for every restart of the worker group, holding the keys the
            # previous attempt wrote (gloo's peer addresses among them): a restarted rank can read
            # its peer's stale address and wait for a connection that never comes. One key space
            # per attempt (all agents of a fixed-size job restart together, so they agree on it).
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"tp_ffn/attempt_{attempt}", store)
            device_id = dev if use_cuda else None
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world, timeout=timeout, device_id=device_id
            )
        else:  # plain `python scripts/train.py`: a world of one on a private port-less store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    return Runtime(dev, dist.get_rank(), dist.get_world_size(), created)


def build_mesh(device: torch.device, dp: int, tp: int, timeout_s: float | None = None) -> DeviceMesh:
    """The ("dp", "tp") mesh over the world; its process groups get ``timeout_s`` (default: torch's)."""
    override = None
    if timeout_s is not None:
        if device.type == "cuda":
            backend, opts = "nccl", dist.ProcessGroupNCCL.Options()
        else:
            backend, opts = "gloo", dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=timeout_s)
        override = {"dp": (backend, opts), "tp": (backend, opts)}
    return init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"), backend_override=override)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each transformer block in backward (non-reentrant ``torch.utils.checkpoint``).

    The block's ``forward`` is replaced on the instance, so parameter names do not change (a wrapper
    module would add ``._checkpoint_wrapped_module`` to every name and break checkpoints).
    """
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def parallelize(
    model: Transformer,
    mesh: DeviceMesh,
    *,
    dtype: str = "float32",
    compile: bool = False,
    compile_backend: str = "inductor",
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Activation checkpointing, ``torch.compile`` and FSDP2 over ``mesh["dp"]``, in that order
    (torchtitan's order), per transformer block and then the root.

    ``dtype="bfloat16"``: FSDP2 casts the gathered parameters to bf16 for forward and backward and
    reduces gradients in fp32 into fp32 master weights.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for block in model.layers:
            block.compile(backend=compile_backend)
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if dtype == "bfloat16"
        else MixedPrecisionPolicy()
    )
    dp_mesh = mesh["dp"]
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    # The root returns logits gathered over TP (a view after the concatenation); nothing modifies
    # them in place, which is what FSDP2's warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model
