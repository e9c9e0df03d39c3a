"""ppfr.pipelines: NVIDIA DALI input pipelines (DALI is optional and imported lazily inside functions).

* :mod:`ppfr.pipelines.sharding` -- the epoch/shard/last-batch semantics every loader backend shares.
* :mod:`ppfr.pipelines.dali` -- the ``@pipeline_def`` face pipeline and :class:`DALILoader` (DataLoader semantics).

The user-facing entry point is :func:`ppfr.data.make_loader`, which picks this or the PyTorch path.
"""

from ppfr.pipelines.dali import (
    DALILoader,
    ExternalReader,
    FileReader,
    RecordIOReader,
    TFRecordReader,
    dali_unavailable_reason,
    face_pipeline,
)
from ppfr.pipelines.sharding import LAST_BATCH_POLICIES, ShardPlan, shard_bounds

__all__ = [
    "DALILoader",
    "ExternalReader",
    "FileReader",
    "LAST_BATCH_POLICIES",
    "RecordIOReader",
    "ShardPlan",
    "TFRecordReader",
    "dali_unavailable_reason",
    "face_pipeline",
    "shard_bounds",
]
