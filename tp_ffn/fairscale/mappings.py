"""fairscale's region mappings on the model-parallel group of :mod:`tp_ffn.fairscale.initialize`.

Each is the tp_ffn collective of the same meaning (:mod:`tp_ffn.comm`) on
``get_model_parallel_group()``, over the last dimension:

=======================================  ====================  ====================
function                                 forward               backward
=======================================  ====================  ====================
``copy_to_model_parallel_region``        identity              all-reduce
``reduce_from_model_parallel_region``    all-reduce            identity
``scatter_to_model_parallel_region``     keep this rank's      all-gather
                                         block of the last dim
``gather_from_model_parallel_region``    all-gather the last   keep this rank's block
                                         dim
=======================================  ====================  ====================

``scatter`` cuts like ``torch.tensor_split`` (fairscale requires the size to divide); ``gather``
needs the same last dimension on every rank, as fairscale's does (the layers of
:mod:`tp_ffn.fairscale.layers` gather uneven blocks themselves: they know the sizes).
"""

from __future__ import annotations

from torch import Tensor

from ..comm import copy_to_parallel, gather_from_parallel, reduce_from_parallel, scatter_to_parallel
from .initialize import get_model_parallel_group

__all__ = [
    "copy_to_model_parallel_region",
    "gather_from_model_parallel_region",
    "reduce_from_model_parallel_region",
    "scatter_to_model_parallel_region",
]


def copy_to_model_parallel_region(input_: Tensor) -> Tensor:
    """Forward: identity; backward: all-reduce."""
    return copy_to_parallel(input_, get_model_parallel_group())


def reduce_from_model_parallel_region(input_: Tensor) -> Tensor:
    """Forward: all-reduce (into a new tensor); backward: identity."""
    return reduce_from_parallel(input_, get_model_parallel_group())


def scatter_to_model_parallel_region(input_: Tensor) -> Tensor:
    """Forward: this rank's block of the last dimension; backward: all-gather."""
    return scatter_to_parallel(input_, get_model_parallel_group(), -1)


def gather_from_model_parallel_region(input_: Tensor) -> Tensor:
    """Forward: all-gather along the last dimension (same size on every rank); backward: this rank's block."""
    return gather_from_parallel(input_, get_model_parallel_group(), -1).contiguous()  # as fairscale's torch.cat
