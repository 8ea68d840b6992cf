"""tpshard: automatic tensor parallelism for PyTorch models, as a compiler pass.

    >>> import torch, tpshard
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    >>> print(tpshard.plan(mlp, 2).explain().splitlines()[1].split()[:3])
    ['0', 'column', 'dim']

Inside a job (``torchrun --nproc-per-node 2 train.py``)::

    torch.distributed.init_process_group("gloo")
    sharded = tpshard.parallelize(model, 2)     # this rank's module, same outputs as model
"""

from tpshard._version import __version__
from tpshard.api import parallelize, plan
from tpshard.compiler import CaptureError
from tpshard.checkpoint import empty_weights, load_sharded
from tpshard.comm import (
    Group,
    OfflineGroup,
    get_rank,
    get_world_size,
    init_parallelism,
    reset_parallelism,
    mp_all_gather_seq,
    mp_copy,
    mp_gather,
    mp_reduce,
    mp_reduce_scatter_seq,
    mp_scatter,
)
from tpshard.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from tpshard.plan import AttributeChange, Edit, ModulePlan, ParamShard, Plan, PlanError
from tpshard.verify import VerifyReport, verify

__all__ = [
    "parallelize", "plan", "Plan", "ParamShard", "ModulePlan", "Edit", "AttributeChange", "PlanError", "CaptureError",
    "Group", "OfflineGroup", "init_parallelism", "reset_parallelism", "get_rank", "get_world_size",
    "mp_copy", "mp_reduce", "mp_scatter", "mp_gather", "mp_all_gather_seq", "mp_reduce_scatter_seq",
    "ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding", "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy", "verify", "VerifyReport",
    "load_sharded", "empty_weights", "__version__",
]
