"""Sharded checkpoints: shard a saved model once, offline and streaming; each rank later reads
only its own file.

A checkpoint is a directory::

    manifest.json                       format version, tpshard/torch versions, the Plan, world
                                        size, every tensor (full shape, dtype, split), the ties,
                                        and per rank file its sha256, size, shapes and dtypes
    rank-00000-of-00004.safetensors     rank 0's part of every tensor of the state_dict
    rank-00001-of-00004.safetensors     ...

Each rank file holds, for every tensor of the model's ``state_dict``, this rank's shard when
the Plan splits it (:func:`tpshard.layout.shard`, the very function the parallel layers use)
or the whole tensor when it is replicated. A tied parameter is stored once, under the name it
is tied to (``Plan.ties``); the manifest records the alias.

Streaming: tensors go one at a time, each in chunks of rows, so memory stays about one chunk
per rank whatever the size of the model or of its largest tensor; reshard and merge stream the
same way (:mod:`tpshard.checkpoint.shard`). The model is only looked at on the meta device.

Safety: output goes to a temporary sibling directory that is renamed at the end, so an
interrupted run never leaves a directory that looks complete; an existing output is replaced
only with ``force`` (and only when it is a tpshard checkpoint or empty). Readers check the
manifest's sha256 of every file they read, in the same pass that reads the tensors.

The modules, each importing only those above it:

- :mod:`~tpshard.checkpoint.safetensors_io`: the file format, streamed (``CheckpointError``);
- :mod:`~tpshard.checkpoint.manifest`: ``manifest.json`` and the rank files it lists;
- :mod:`~tpshard.checkpoint.fsutil`: output that appears all at once, progress;
- :mod:`~tpshard.checkpoint.weights`: weight sources (safetensors, state_dict files, model
  directories, checkpoints);
- :mod:`~tpshard.checkpoint.hf_dir`: merge into a directory ``from_pretrained`` loads;
- :mod:`~tpshard.checkpoint.model`: the model a checkpoint is for, planned on the meta device;
- :mod:`~tpshard.checkpoint.load`: :func:`load_sharded`, one rank's module from its file;
- :mod:`~tpshard.checkpoint.shard`: :func:`save_sharded`, :func:`merge`, :func:`reshard`.

Models without weights (:func:`empty_weights`, :func:`on_meta`) live in :mod:`tpshard.models.meta`.

Example::

    >>> import tempfile, torch
    >>> from tpshard import checkpoint, models
    >>> model, _ = models.build("gpt", dtype=torch.float64)
    >>> ckpt = tempfile.mkdtemp() + "/gpt-tp2"
    >>> manifest = checkpoint.save_sharded(model, ckpt, 2, progress=False)
    >>> sorted(manifest.ties.items())
    [('lm_head.weight', 'wte.weight')]
    >>> rank1 = checkpoint.load_sharded(lambda: models.build("gpt", dtype=torch.float64), ckpt, rank=1)
    >>> rank1.get_parameter("h.0.attn.c_attn.weight").shape
    torch.Size([48, 32])
"""


from tpshard.checkpoint.fsutil import format_bytes
from tpshard.checkpoint.load import load_sharded
from tpshard.checkpoint.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    RankFile,
    TensorInfo,
    rank_file_name,
    read_manifest,
)
from tpshard.checkpoint.model import plan_model
from tpshard.checkpoint.safetensors_io import CheckpointError, SafetensorsWriter
from tpshard.checkpoint.shard import merge, reshard, save_sharded
from tpshard.checkpoint.weights import WeightSource, open_weights
from tpshard.models.meta import empty_weights, on_meta
from tpshard.models.resolve import unpack_model

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CheckpointError",
    "Manifest",
    "TensorInfo",
    "RankFile",
    "WeightSource",
    "SafetensorsWriter",
    "empty_weights",
    "format_bytes",
    "on_meta",
    "unpack_model",
    "open_weights",
    "plan_model",
    "rank_file_name",
    "read_manifest",
    "save_sharded",
    "load_sharded",
    "merge",
    "reshard",
]
