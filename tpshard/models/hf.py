"""Saved models as MODEL: a Hugging Face ``save_pretrained`` directory and a whole module saved
with ``torch.save(model)``.

A directory is recognised by its ``config.json``; its model is built from the config alone
(``AutoModelFor*.from_config``, the class named by ``config.architectures``), here under
:func:`tpshard.models.meta.empty_weights` when no weights are wanted. ``transformers`` is
imported only then: it stays an optional extra. The weights are the directory's safetensors
files, which :mod:`tpshard.checkpoint.weights` streams.

A torch file holding a whole ``nn.Module`` is unpickled only with ``trust_pickle``, because
unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tpshard.models.meta import empty_weights

__all__ = ["CONFIG_NAME", "is_model_dir", "build_from_dir", "example_inputs_for", "config_record", "build_from_record",
           "is_torch_file",
           "load_module"]

CONFIG_NAME = "config.json"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def is_model_dir(spec: Any) -> bool:
    """Whether ``spec`` names a directory with a ``config.json`` (a ``save_pretrained`` output)."""
    return isinstance(spec, (str, Path)) and Path(spec).is_dir() and (Path(spec) / CONFIG_NAME).is_file()


def is_torch_file(spec: Any) -> bool:
    """Whether ``spec`` names an existing file that a torch file (not safetensors) may be."""
    return isinstance(spec, (str, Path)) and Path(spec).is_file() and Path(spec).suffix in _TORCH_SUFFIXES


def _transformers(directory: Path) -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{directory} is a Hugging Face model directory, and building its model needs "
                         "transformers: pip install 'tpshard[hf]' (or pip install transformers)") from None
    return transformers


def _model_class(tf: Any, config: Any, directory: Path) -> Any:
    """The class the config names (``architectures[0]``), else the causal-LM auto class."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel"):
        try:
            return getattr(tf, auto)._model_mapping[type(config)]
        except (KeyError, AttributeError):
            continue
    raise ValueError(f"{directory}/{CONFIG_NAME}: transformers has no model class for model_type "
                     f"{getattr(config, 'model_type', '?')!r}; upgrade transformers or pass package.module:callable")


def build_from_dir(directory: str | Path, *, empty: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of a ``save_pretrained`` directory, built from ``config.json`` alone.

    ``empty``: parameters on the meta device (buffers real); else the weights are loaded
    (``from_pretrained``). ``dtype``: default the config's ``dtype`` when it names one, else
    float32. The model is in eval mode.
    """
    directory = Path(directory)
    tf = _transformers(directory)
    config = tf.AutoConfig.from_pretrained(str(directory))
    cls = _model_class(tf, config, directory)
    if dtype is None:
        named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, named.removeprefix("torch."), None) if isinstance(named, str) else named
        if not isinstance(dtype, torch.dtype):
            dtype = torch.float32
    old = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        if empty:
            with empty_weights():
                model = cls(config)
        else:
            model = cls.from_pretrained(str(directory), config=config, dtype=dtype)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def example_inputs_for(model: nn.Module) -> tuple[tuple, dict]:
    """Token ids of shape (2, 8) and ``use_cache=False`` when the model has a cache."""
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 8)
    ids = torch.arange(16).reshape(2, 8) % vocab
    kwargs = {"use_cache": False} if hasattr(config, "use_cache") else {}
    return (ids,), kwargs


def build_from_record(record: dict, *, empty: bool = True) -> nn.Module:
    """The model of a manifest's ``source`` record (:func:`config_record`): built from the config
    it holds, when the directory itself is gone."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tpshard-config-") as tmp:
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(record["config"]))
        return build_from_dir(tmp, empty=empty)


def config_record(directory: str | Path) -> dict:
    """What a manifest records of a model directory: its config and its files' names and sizes."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return {"kind": "hf_directory", "path": str(directory.absolute()),
            "config": json.loads((directory / CONFIG_NAME).read_text()),
            "files": [{"name": p.name, "bytes": p.stat().st_size} for p in files]}


def load_module(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """The ``nn.Module`` saved whole in ``path`` (``torch.save(model)``), only with ``trust_pickle``."""
    path = Path(path)
    if not trust_pickle:
        raise ValueError(f"{path} is a torch file; a whole nn.Module in it is read only with --trust-pickle "
                         "(trust_pickle=True), because unpickling runs arbitrary code. If you trust the file, "
                         "pass --trust-pickle; otherwise save the weights (torch.save(model.state_dict(), f) or "
                         "safetensors) and pass the model as package.module:callable with --weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path} could not be read as a torch file ({e})") from None
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not an nn.Module; pass a module saved with "
                         "torch.save(model), or the model as package.module:callable with --weights FILE")
    return obj.eval()
