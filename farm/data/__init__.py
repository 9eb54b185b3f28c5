"""Data pipeline: prepare (text -> tokenizer -> packed Arrow shards + manifest), read, order, stream.

See docs/data.md for the design: the manifest format, the global order and cursor arithmetic, and
the prefetching micro-batch stream each data-parallel rank trains on.
"""

import warnings

from farm.data.manifest import Manifest, ShardInfo, load_manifest
from farm.data.prepare import prepare
from farm.data.sampler import BatchLayout, BatchSkips, DataCursor, GlobalOrder
from farm.data.source import ArrowShardSource
from farm.data.stream import MicroBatch, MicroBatchStream

# `python -m farm.data.prepare` runs as __main__ a module this package has already imported for
# `prepare`; runpy warns about the second copy, which is harmless here (the module keeps no state).
warnings.filterwarnings(
    "ignore", message=r"'farm\.data\.prepare' found in sys\.modules", category=RuntimeWarning
)

__all__ = [
    "ArrowShardSource",
    "BatchLayout",
    "BatchSkips",
    "DataCursor",
    "GlobalOrder",
    "Manifest",
    "MicroBatch",
    "MicroBatchStream",
    "ShardInfo",
    "load_manifest",
    "prepare",
]
