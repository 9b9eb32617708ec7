"""What every benchmark result file shares: machine facts, medians, the writer."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import ditserve


def machine_info() -> dict[str, Any]:
    """Facts that decide whether two result files are comparable."""
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # over the last 1, 5 and 15 minutes when the result was written: other work on a shared machine
        # skews timings (most of all a side whose OpenMP threads spin), so a reader can see it did
        "load_average": list(os.getloadavg()),
        "ditserve": ditserve.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a live process has used so far; Linux's /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def quartiles(values: list[float]) -> list[float]:
    """[first, third] quartile: the middle half of the values, how far a median can be trusted."""
    if len(values) < 2:
        return [float(values[0])] * 2 if values else []
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return [float(first), float(third)]


def result_document(
    bench: str, model: str, config: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any]
) -> dict[str, Any]:
    """Every bench result has one shape: bench, machine, model, config, rows, summary."""
    return {
        "bench": bench,
        "machine": machine_info(),
        "model": model,
        "config": config,
        "rows": rows,
        "summary": summary,
    }


def write_result(path: str | Path, document: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path
