"""tp_ffn: the Llama SwiGLU feed-forward block, tensor-parallel on torch.distributed."""

from .comm import (
    copy_to_parallel,
    gather_from_parallel,
    gather_from_sequence,
    gather_sequence,
    reduce_from_parallel,
    reduce_scatter_to_sequence,
    scatter_to_parallel,
    split_sequence,
)
from .emulation import emulate_pretraining_tp
from .ffn import FeedForward, ParallelFeedForward, llama_ffn_hidden_dim
from .groups import TPGroup, resolve_group
from .layers import ColumnParallelLinear, RowParallelLinear
from .moe import MoEConfig, MoEFeedForward, ParallelMoEFeedForward, load_balancing_loss
from .sharding import ShardSpec, shard_bounds, shard_sizes
from .swiglu import swiglu, swiglu_linear

__version__ = "0.1.0"

__all__ = [
    "ColumnParallelLinear",
    "FeedForward",
    "MoEConfig",
    "MoEFeedForward",
    "ParallelFeedForward",
    "ParallelMoEFeedForward",
    "RowParallelLinear",
    "ShardSpec",
    "TPGroup",
    "copy_to_parallel",
    "emulate_pretraining_tp",
    "gather_from_parallel",
    "gather_from_sequence",
    "gather_sequence",
    "load_balancing_loss",
    "llama_ffn_hidden_dim",
    "reduce_from_parallel",
    "reduce_scatter_to_sequence",
    "resolve_group",
    "scatter_to_parallel",
    "shard_bounds",
    "shard_sizes",
    "split_sequence",
    "swiglu",
    "swiglu_linear",
]
