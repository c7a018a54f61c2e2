"""Facts about this process that the CLI, the converters and the benchmarks report."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
