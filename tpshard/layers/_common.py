"""What the tensor-parallel layers share: ``init_type`` initialization (one rank's shard of a
fresh master weight), copying one rank's shard of an existing parameter, and the base class that
holds the group.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from tpshard import comm, layout


# ---------------------------------------------------------------------------------------------
# Initialization.


#: ``init_type`` names and the ``torch.nn.init`` functions they call (with default arguments).
INIT_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "kaiming_normal": nn.init.kaiming_normal_,
    "kaiming_uniform": nn.init.kaiming_uniform_,
    "normal": nn.init.normal_,
    "uniform": nn.init.uniform_,
    "trunc_normal": nn.init.trunc_normal_,
    "orthogonal": nn.init.orthogonal_,
    "eye": nn.init.eye_,
    "zeros": nn.init.zeros_,
    "ones": nn.init.ones_,
}


def _init_function(init_type: str, owner: str) -> Callable[..., Tensor]:
    """The ``torch.nn.init`` function named by ``init_type``; ValueError names the valid ones."""
    try:
        return INIT_FUNCTIONS[init_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"{owner}: unknown init_type {init_type!r}; valid init types: {sorted(INIT_FUNCTIONS)}"
        ) from None


def _init_shard_(
    param: Tensor,
    full_shape: tuple[int, ...],
    dim: int,
    segments: Sequence[int] | None,
    init_type: str,
    group: comm.Group,
    owner: str,
    zero_row: int | None = None,
) -> None:
    """Fill ``param`` with this rank's shard (along ``dim``, per ``segments``) of a fresh weight.

    The full ("master") weight of ``full_shape`` is initialized on the CPU with a private
    generator seeded by one draw from the global CPU RNG, then only this rank's shard is
    copied into ``param``. Consequences:

    - every rank draws the same seed when every rank seeded torch identically (the usual
      ``torch.manual_seed(s)`` on every rank), so the ranks' shards tile one master weight;
    - a one-rank layer built after the same seed holds exactly that master weight;
    - the global RNG advances by one draw per call, whatever the weight's size or device;
    - memory: the master weight of this one tensor exists transiently on the CPU (float32 for
      half/bfloat16 parameters), then is freed. Meta parameters are left untouched.
    """
    fn = _init_function(init_type, owner)
    if param.is_meta:
        return
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    work_dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
    master = torch.empty(full_shape, dtype=work_dtype)
    with torch.no_grad():
        if "generator" in inspect.signature(fn).parameters:
            fn(master, generator=generator)
        else:
            fn(master)
        if zero_row is not None:
            master[zero_row].zero_()  # nn.Embedding zeroes its padding row at init
        param.copy_(layout.shard(master, dim, group.rank, group.size, segments))


# ---------------------------------------------------------------------------------------------
# Sharding and the shared base class.


def _shard_parameter(p: Tensor, dim: int, group: comm.Group, segments: Sequence[int] | None = None) -> nn.Parameter:
    """A new Parameter holding this rank's shard of ``p`` (own storage, same dtype/device)."""
    shard = layout.shard(p.detach(), dim, group.rank, group.size, segments)
    return nn.Parameter(shard.clone(memory_format=torch.contiguous_format), requires_grad=p.requires_grad)


def _check_module(module: nn.Module, kind: type, cls: type) -> None:
    if not isinstance(module, kind):
        raise TypeError(f"{cls.__name__}.from_module needs an nn.{kind.__name__}, got {type(module).__name__}")


class _ParallelLayer(nn.Module):
    """Holds the group (``self.group``, ``self.world_size``, ``self.rank``) and gathers."""

    def __init__(self, group: Any) -> None:
        super().__init__()
        self.group: comm.Group = comm.resolve_group(group)
        self.world_size: int = self.group.size
        self.rank: int = self.group.rank

    def _gather_full(self, t: Tensor, dim: int, segments: Sequence[int] | None = None) -> Tensor:
        """The full tensor from every rank's ``t`` (a collective: every rank must call it)."""
        with torch.no_grad():
            if self.world_size == 1:
                return t.detach().clone()
            if t.is_meta:  # nothing to communicate: every rank's part is meta
                shape = list(t.shape)
                shape[dim] *= self.world_size
                return torch.empty(shape, dtype=t.dtype, device="meta")
            return comm.mp_gather(t.detach(), dim, self.group, segments)
