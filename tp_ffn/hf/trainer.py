"""``transformers.Trainer`` on a model parallelized by :mod:`tp_ffn.hf`, under torchrun.

A ``Trainer`` knows only data parallelism: it wraps the model in ``DistributedDataParallel`` over every rank
and gives every rank other batches. :func:`prepare_trainer` makes it train the tensor-parallel model as the
dense one would be trained in one process with the same global batch::

    torchrun --nproc-per-node 4 train.py       # TP=2 x DP=2

    mesh = init_device_mesh("cuda", (2, 2), mesh_dim_names=("dp", "tp"))
    model = tp_ffn.hf.from_pretrained(AutoModelForCausalLM, path, mesh["tp"])
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=...)
    tp_ffn.hf.prepare_trainer(trainer)
    trainer.train()

Ranks are laid out as accelerate lays them out (tensor parallelism innermost): rank ``d * tp + t`` is
tensor-parallel rank ``t`` of data-parallel replica ``d``.

    data       accelerate's own ``ParallelismConfig(dp_replicate_size=world // tp, tp_size=tp)`` and its
               device mesh: its data loaders give the ranks of a tensor-parallel group the same batches and
               split the data over the replicas; the Trainer scales the loss and counts tokens with its
               ``tp_size``.
    model      accelerate's own model preparation (device, autocast, compile) without its wrapper, then
               ``DistributedDataParallel`` over the data-parallel group (the ranks holding the same shards:
               its broadcast and gradient average never mix shards). accelerate has no such wrapper itself:
               it composes tensor parallelism only with DTensor models and FSDP2.
    clipping   the accelerator's ``clip_grad_norm_`` becomes :func:`tp_ffn.hf.clip_grad_norm_` (the dense
               model's norm, the same on every rank).
    saving     ``save_model`` (and the checkpoints written during training) gathers the full weights with
               :func:`tp_ffn.hf.full_state_dict` on every rank and writes the dense model's files from the
               main process. Resuming from a Trainer checkpoint is refused (the optimizer state it holds is
               rank 0's); load the saved model with :func:`tp_ffn.hf.from_pretrained` instead.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..ffn import ParallelFeedForward
from ..groups import TPGroup
from .clip import sharded_over
from .loading import transformers_major
from .mlp import LAYOUTS, full_state_dict

__all__ = ["prepare_trainer"]


def _tp_group(model: nn.Module) -> TPGroup:
    """The one tensor-parallel group of every block of ``model``; ``ValueError`` when there is none or several."""
    blocks = (*(layout.parallel_class for layout in LAYOUTS), ParallelFeedForward)
    groups = {}
    for module in model.modules():
        if isinstance(module, blocks):
            groups.setdefault(tuple(_ranks(module.tp)), module.tp)
    if not groups:
        raise ValueError(
            f"trainer.model: {type(model).__name__} has no tensor-parallel block; parallelize it first "
            "(tp_ffn.hf.parallelize_mlp or tp_ffn.hf.from_pretrained)"
        )
    if len(groups) > 1:
        raise ValueError(f"trainer.model: expected one tensor-parallel group for all blocks, got ranks {sorted(groups)}")
    return next(iter(groups.values()))


def _ranks(tp: TPGroup) -> list[int]:
    return [0] if tp.group is None else dist.get_process_group_ranks(tp.group)


def _check_layout(tp: TPGroup, world: int, rank: int) -> None:
    """accelerate's mesh puts tensor parallelism innermost: the group must be ranks ``[k*tp, (k+1)*tp)``."""
    first = rank - rank % tp.size
    expected = list(range(first, first + tp.size))
    if world % tp.size or _ranks(tp) != expected:
        raise ValueError(
            f"trainer.model: expected tensor-parallel groups of consecutive ranks dividing the world of {world} "
            f"(rank {rank}: {expected}), as accelerate lays out its mesh, got ranks {_ranks(tp)}; build the group "
            "as init_device_mesh(device, (world // tp, tp), mesh_dim_names=('dp', 'tp'))['tp']"
        )


def _refuse(trainer: Any) -> None:
    """What prepare_trainer does not handle, in one line each."""
    args = trainer.args
    if trainer.model_wrapped is not trainer.model:
        raise ValueError(
            f"trainer: its model is already wrapped ({type(trainer.model_wrapped).__name__}); call "
            "tp_ffn.hf.prepare_trainer once, before trainer.train()"
        )
    unsupported = {
        "DeepSpeed": getattr(trainer, "is_deepspeed_enabled", False),
        "FSDP (TrainingArguments.fsdp)": getattr(trainer, "is_fsdp_enabled", False) or bool(args.fsdp),
        "several GPUs per process (nn.DataParallel)": args.n_gpu > 1,
    }
    for what, on in unsupported.items():
        if on:
            raise ValueError(
                f"trainer: {what} is not supported by tp_ffn.hf.prepare_trainer (data parallelism across "
                "tensor-parallel groups is DistributedDataParallel)"
            )


def _parallelism_config(accelerator: Any, tp: int, dp: int) -> Any:
    """The accelerator's parallelism configuration: the one it was given (checked), else a new
    ``ParallelismConfig(dp_replicate_size=dp, tp_size=tp)`` installed with its device mesh, as the
    ``Accelerator`` constructor installs it (its validation, which accepts tensor parallelism only on GPU
    types and with FSDP2 or DTensor models, is what this function does instead)."""
    try:
        from accelerate import ParallelismConfig
    except ImportError:
        raise ImportError(
            "tp_ffn.hf.prepare_trainer needs accelerate >= 1.12 (ParallelismConfig with a tp_size): "
            "pip install -U 'accelerate>=1.12'"
        ) from None
    state = accelerator.state
    given = state.parallelism_config
    if given is not None and given.total_size > 1:
        if (given.tp_size, given.data_parallel_size, given.cp_size, given.sp_size) != (tp, dp, 1, 1):
            raise ValueError(
                f"TrainingArguments.parallelism_config: expected tp_size={tp} and a data-parallel size of {dp} (the "
                f"model's tensor-parallel group in a world of {tp * dp}), got {given!r}".replace("\n", " ")
            )
        return given
    config = ParallelismConfig(dp_replicate_size=dp, tp_size=tp)
    state.parallelism_config = config
    state.device_mesh = config.get_device_mesh(accelerator.device.type)
    return config


def _data_parallel_group(accelerator: Any, dp: int) -> dist.ProcessGroup:
    if dp > 1:
        return accelerator.torch_device_mesh["dp_replicate"].get_group()
    # One replica: DistributedDataParallel over this rank alone, so that the Trainer takes the model as
    # wrapped and the accelerator does not wrap it over the world.
    mine, _ = dist.new_subgroups_by_enumeration([[r] for r in range(dist.get_world_size())])
    return mine


def _clip_grad_norm(accelerator: Any, model: nn.Module, parameters: Any, max_norm: float, norm_type: float = 2) -> Tensor:
    """``Accelerator.clip_grad_norm_`` (unscale, then clip) with the dense model's norm."""
    from ..grad_norm import clip_grad_norm_

    accelerator.unscale_gradients()
    params = list(parameters)
    groups = sharded_over(model)
    return clip_grad_norm_(params, max_norm, norm_type, sharded_over=[groups.get(id(p)) for p in params])


def _save_model(trainer: Any, output_dir: str | None = None, _internal_call: bool = False) -> None:
    """``Trainer.save_model`` writing the dense model: every rank gathers, the main process writes."""
    state_dict = full_state_dict(trainer.model)
    if trainer.args.should_save:
        trainer._save(output_dir if output_dir is not None else trainer.args.output_dir, state_dict=state_dict)
    if trainer.args.push_to_hub and not _internal_call:
        trainer.push_to_hub(commit_message="Model save")


def _refuse_resume(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError(
        "tp_ffn.hf.prepare_trainer: resuming from a Trainer checkpoint is not supported (its optimizer state is "
        "tensor-parallel rank 0's); load the saved model with tp_ffn.hf.from_pretrained and train on"
    )


def prepare_trainer(trainer: Any) -> None:
    """Make ``trainer`` (a ``transformers.Trainer`` built around a model parallelized by :mod:`tp_ffn.hf`)
    train it exactly as the dense model is trained by a ``Trainer`` in one process with the same global
    batch (``per_device_train_batch_size`` x the number of data-parallel replicas). Call it on every rank,
    once, before ``trainer.train()``, under torchrun; see the module docstring for what it changes.

    ``ValueError`` (one line) for a model without tensor-parallel blocks, groups not laid out as accelerate's
    mesh, an already wrapped model, DeepSpeed or FSDP; ``ImportError`` with transformers < 5 or an
    accelerate without ``ParallelismConfig``. Without this call, the first forward under the Trainer's ``DistributedDataParallel`` stops
    with a ``RuntimeError`` saying to make it.
    """
    import transformers

    if transformers_major() < 5:
        raise ImportError(
            f"tp_ffn.hf.prepare_trainer: needs transformers >= 5 (whose Trainer and accelerate know a "
            f"tensor-parallel size), got {transformers.__version__}: pip install -U 'tp-ffn[hf]' 'transformers>=5'"
        )
    model = trainer.model
    tp = _tp_group(model)
    if not dist.is_initialized():
        if tp.size == 1:
            return  # one process: nothing is parallel
        raise ValueError("prepare_trainer: expected an initialised process group (run under torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    _check_layout(tp, world, rank)
    _refuse(trainer)
    accelerator = trainer.accelerator
    if accelerator.num_processes != world:
        raise ValueError(
            f"trainer.accelerator: expected {world} processes (the torch.distributed world), got "
            f"{accelerator.num_processes}; launch with torchrun"
        )
    dp = world // tp.size
    _parallelism_config(accelerator, tp.size, dp)
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    handler = accelerator.ddp_handler
    wrapped = DistributedDataParallel(
        prepared, process_group=_data_parallel_group(accelerator, dp), **(handler.to_kwargs() if handler else {})
    )
    if handler is not None:
        handler.register_comm_hook(wrapped)
    trainer.model_wrapped = wrapped
    accelerator.clip_grad_norm_ = functools.partial(_clip_grad_norm, accelerator, model)
    trainer.save_model = functools.partial(_save_model, trainer)
    trainer._load_from_checkpoint = _refuse_resume
