"""Facts about the machine a benchmark ran on, for its results file."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts(**extra) -> dict:
    """CPU, cores, date and the load average now (a loaded machine makes timings unreliable)."""
    return dict(cpu=cpu_model(), logical_cores=os.cpu_count(), **extra,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                load_average_at_start=[round(x, 2) for x in os.getloadavg()])
