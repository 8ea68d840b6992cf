"""MODEL: the one resolver of what the CLI, the verifier and the checkpoint functions take as a
model, and the one rule for what a model factory returns.

MODEL is a Hugging Face ``save_pretrained`` directory (built from its ``config.json``), a
torch file holding a whole module (``torch.save(model)``, read only with ``trust_pickle``), a
built-in reference model name (:data:`tpshard.models.REFERENCE_MODELS`), a
``package.module:callable`` (the current directory is importable, as with ``python -m``), a
zero-argument callable, or an ``nn.Module``. A callable returns a model, ``(model,)``,
``(model, example_args)`` or ``(model, example_args, example_kwargs)``; ``example_args`` is a
tuple or list of inputs (a lone tensor is one input), ``example_kwargs`` a mapping.

Every failure is a :class:`ModelSpecError` (a ``ValueError``) that names MODEL and says what
it may be.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
import torch.nn as nn

from tpshard.models.hf import build_from_dir, example_inputs_for, is_model_dir, is_torch_file, load_module
from tpshard.models.meta import empty_weights
from tpshard.models.registry import REFERENCE_MODELS, build

__all__ = ["ModelSpecError", "ModelLike", "resolve_model", "unpack_model", "import_factory"]

#: What the resolver takes: a name or ``package.module:callable``, a factory, or a model.
ModelLike = Union[str, nn.Module, Callable[[], Any]]


class ModelSpecError(ValueError):
    """MODEL cannot be resolved; the message names it and says what MODEL may be."""


def import_factory(spec: str) -> Callable[[], Any]:
    """The callable ``package.module:callable`` names (attributes may be dotted: ``mod:Cls.make``)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # like `python -m`, let MODEL name a module of this directory
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelSpecError(f"cannot load MODEL {spec!r}: {type(e).__name__}: {e}; pass an importable "
                             "package.module:callable") from e
    if not callable(obj):
        raise ModelSpecError(f"MODEL {spec!r} is a {type(obj).__name__}, not a callable returning a model")
    return obj


def unpack_model(made: Any, where: str) -> tuple[nn.Module, tuple, dict]:
    """(model, example_args, example_kwargs) from what a factory returned (see module docstring).

    Example::

        >>> lin = torch.nn.Linear(2, 2)
        >>> unpack_model((lin, torch.zeros(1, 2)), "f")[1][0].shape
        torch.Size([1, 2])
    """
    if isinstance(made, nn.Module):
        return made, (), {}
    if isinstance(made, tuple) and 1 <= len(made) <= 3 and isinstance(made[0], nn.Module):
        args = made[1] if len(made) > 1 else ()
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        kwargs = made[2] if len(made) > 2 and made[2] is not None else {}
        if isinstance(kwargs, Mapping):
            return made[0], args, dict(kwargs)
    raise ModelSpecError(f"{where} returned {type(made).__name__}; expected a model, (model, example_args) "
                         "or (model, example_args, example_kwargs)")


def resolve_model(model: ModelLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                  empty: bool = False, trust_pickle: bool = False) -> tuple[nn.Module, tuple, dict]:
    """MODEL -> ``(model, example_args, example_kwargs)``.

    ``empty``: build it under :func:`tpshard.models.meta.empty_weights` (parameters on the meta
    device, buffers real), for planning or when the weights come from a file. ``device`` and
    ``dtype`` (a torch dtype or its name) apply to built-in models. An ``nn.Module`` is returned
    as it is, without inputs. A model directory's model is built from its config (example
    inputs: token ids, and ``use_cache=False`` where the model has a cache); a torch file's
    module is unpickled only with ``trust_pickle`` (and keeps its weights).

    Example::

        >>> model, args, kwargs = resolve_model("gpt", empty=True)
        >>> model.wte.weight.is_meta, tuple(args[0].shape), kwargs
        (True, (2, 8), {})
        >>> resolve_model("resnet")
        Traceback (most recent call last):
        ...
        tpshard.models.resolve.ModelSpecError: unknown MODEL 'resnet'; use a Hugging Face model directory (with config.json), a torch file with --trust-pickle, a built-in reference model ['gpt', 'llama', 'mlp'] or package.module:callable
    """
    if isinstance(model, nn.Module):
        return model, (), {}
    building = empty_weights() if empty else contextlib.nullcontext()
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if isinstance(model, str) and is_model_dir(model):
        try:
            module = build_from_dir(model, empty=empty)
        except ValueError as e:
            raise ModelSpecError(str(e)) from None
        args, kwargs = example_inputs_for(module)
        return module, args, kwargs
    if isinstance(model, str) and is_torch_file(model):
        try:
            module = load_module(model, trust_pickle=trust_pickle)
        except ValueError as e:
            raise ModelSpecError(str(e)) from None
        # loaded already (memory-mapped): its own weights are the weights
        return (module, *example_inputs_for(module)) if hasattr(module, "config") else (module, (), {})
    if isinstance(model, str):
        if ":" not in model:
            if model not in REFERENCE_MODELS:
                raise ModelSpecError(f"unknown MODEL {model!r}; use a Hugging Face model directory (with "
                                     f"config.json), a torch file with --trust-pickle, a built-in reference "
                                     f"model {sorted(REFERENCE_MODELS)} or package.module:callable")
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype.removeprefix("torch."))
            with building:
                module, args = build(model, device="cpu" if empty else device, dtype=dtype)
            return module, tuple(args), {}
        factory, where = import_factory(model), f"MODEL {model!r}"
    elif callable(model):
        factory, where = model, f"the model factory {model!r}"
    else:
        raise ModelSpecError(f"MODEL must be a built-in name, 'package.module:callable', a zero-argument factory "
                             f"or an nn.Module, not {type(model).__name__}")
    with building:
        made = factory()
    return unpack_model(made, where)
