"""Peak memory of one worker process, as its step report carries it to the driver.

On an accelerator the figure is torch's peak of allocated device memory (``<kind>.max_memory_allocated``:
tensors only, not the caching allocator's reserve). On CPU emulation there is no device memory: the
figure is the process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``), which also counts
the Python interpreter, torch's libraries and the data stream's buffers, so it is larger than the
tensors alone and it never goes down.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

CPU_SOURCE = "peak_rss"


def peak_memory(device_type: str) -> dict[str, Any]:
    """``{'peak_memory_bytes': N, 'peak_memory_source': what N is}`` for this process."""
    if device_type == "cpu":
        # Linux reports ru_maxrss in KiB, macOS in bytes.
        scale = 1 if sys.platform == "darwin" else 1024
        return {
            "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "peak_memory_source": CPU_SOURCE,
        }
    import torch

    module = getattr(torch, device_type)
    return {
        "peak_memory_bytes": int(module.max_memory_allocated()),
        "peak_memory_source": f"{device_type}.max_memory_allocated",
    }
