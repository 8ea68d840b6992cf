"""The checkpoint stage: sharded safetensors checkpoints (see :mod:`tpshard.checkpoint.shard`)."""

from tpshard.checkpoint.shard import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CheckpointError,
    Manifest,
    RankFile,
    SafetensorsWriter,
    TensorInfo,
    WeightSource,
    empty_weights,
    format_bytes,
    load_sharded,
    merge,
    on_meta,
    open_weights,
    plan_model,
    rank_file_name,
    read_manifest,
    reshard,
    save_sharded,
    unpack_model,
)

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "CheckpointError", "Manifest", "TensorInfo", "RankFile", "WeightSource",
           "SafetensorsWriter", "empty_weights", "format_bytes", "on_meta", "unpack_model", "open_weights",
           "plan_model", "rank_file_name", "read_manifest", "save_sharded", "load_sharded", "merge", "reshard"]
