"""ppfr.data: face-recognition data sources and loaders.

* :func:`open_source` -- an image folder, TFace index (2-field paths or 4-field TFRecord offsets), insightface
  RecordIO, a verification ``.bin`` (read with a restricted unpickler), a pair list, or ``"synthetic"``.
* :func:`make_loader` + :class:`DataConfig` -- DALI, PyTorch or synthetic batches of (B, 3, 112, 112) float32 in
  [-1, 1] with int64 labels, sharded by rank with an explicit last-batch policy.
* ``ppfr data inspect | pack | pairs`` -- the CLI (:mod:`ppfr.data.cli`).

See docs/data.md.
"""

from ppfr.data._common import CorruptDataWarning, CorruptSampleError, DataFormatError
from ppfr.data.config import DataConfig
from ppfr.data.loader import Loader, make_loader
from ppfr.data.sources import (
    BinSource,
    FolderSource,
    IndexListSource,
    PairSource,
    RecordIOSource,
    Source,
    SyntheticSource,
    TFRecordFileSource,
    TFRecordIndexSource,
    open_source,
    scan,
)

__all__ = [
    "BinSource",
    "CorruptDataWarning",
    "CorruptSampleError",
    "DataConfig",
    "DataFormatError",
    "FolderSource",
    "IndexListSource",
    "Loader",
    "PairSource",
    "RecordIOSource",
    "Source",
    "SyntheticSource",
    "TFRecordFileSource",
    "TFRecordIndexSource",
    "make_loader",
    "open_source",
    "scan",
]
