"""`auto` by measurement, the pure half: which timed backend wins, and the file that remembers the winner.

No torch here (benchmark.py times the kernels): the choice among timings, the cache key and the cache file
are plain data, so they are tested without a kernel. A backend is acceptable when its output is within
TOLERANCE of torch SDPA's on the same inputs (max absolute difference, inputs drawn from N(0, 1): about two
units in the last place of an output of magnitude 1 in that dtype); the fastest acceptable one wins.

The decision is cached in one JSON file (`$DITSERVE_ATTENTION_CACHE`, else
`$XDG_CACHE_HOME/ditserve/attention-auto.json`, else `~/.cache/ditserve/attention-auto.json`), keyed by
device name, torch version, the set of backends that could run and the attention shape: a restart on the
same machine reads it instead of measuring again, and a new GPU, torch release, kernel package or model
shape measures anew.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "DITSERVE_ATTENTION_CACHE"
MODES = ("auto", "on", "off")  # --attention-benchmark: on CUDA only, on any device, never
# Max |backend - torch_sdpa| accepted, by dtype name: 2 ulps at 1.0 in bf16 (2^-7) and fp16 (2^-10).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1.6e-2}


@dataclass(frozen=True)
class AttentionShape:
    """The self-attention call `auto` times: the model's heads and head size at its default request."""

    batch: int
    tokens: int
    heads: int
    head_dim: int
    dtype: str  # as --dtype names it: bf16, fp16, fp32

    def describe(self) -> str:
        return f"b{self.batch} s{self.tokens} h{self.heads} d{self.head_dim} {self.dtype}"


@dataclass(frozen=True)
class AutoTune:
    """How `auto` decides: `mode` auto measures on CUDA only (on a CPU the rules stand: timings of a tiny
    model there are noise), on measures anywhere, off keeps the rules; `cache_file` None is cache_path()."""

    shape: AttentionShape
    mode: str = "auto"
    cache_file: Path | None = None

    def measures(self, device_type: str) -> bool:
        return self.mode == "on" or (self.mode == "auto" and device_type == "cuda")


@dataclass(frozen=True)
class Trial:
    """One backend timed: median seconds per call and max |output - torch_sdpa's|, or why it failed."""

    backend: str
    seconds: float = float("nan")
    max_abs_error: float = float("nan")
    failure: str | None = None

    def describe(self, tolerance: float) -> str:
        if self.failure is not None:
            return f"{self.backend} failed ({self.failure})"
        verdict = (
            "" if self.max_abs_error <= tolerance else f", rejected: error {self.max_abs_error:.1e} > {tolerance:g}"
        )
        return f"{self.backend} {self.seconds * 1e3:.3f} ms{verdict}"


def choose(trials: Iterable[Trial], tolerance: float) -> tuple[str, str]:
    """The fastest trial within `tolerance`, and why: every backend's time. ValueError when none qualifies."""
    trials = list(trials)
    acceptable = [t for t in trials if t.failure is None and t.max_abs_error <= tolerance]
    timings = "; ".join(t.describe(tolerance) for t in sorted(trials, key=lambda t: (t.failure is not None, t.seconds)))
    if not acceptable:
        raise ValueError(f"no backend ran within {tolerance:g} of torch_sdpa: {timings}")
    best = min(acceptable, key=lambda t: t.seconds)
    return best.backend, f"fastest within {tolerance:g} of torch_sdpa: {timings}"


def cache_key(device_name: str, torch_version: str, backends: Iterable[str], shape: AttentionShape) -> str:
    return " | ".join((device_name, f"torch {torch_version}", ",".join(sorted(backends)), shape.describe()))


def cache_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    base = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "ditserve" / "attention-auto.json"


def _entries(path: Path) -> dict[str, dict[str, str]]:
    """The file's decisions; a missing or unreadable file is an empty cache (measuring again is safe)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def read_decision(path: Path, key: str) -> tuple[str, str] | None:
    """(backend, reason) measured before for `key`, or None."""
    entry = _entries(path).get(key)
    if not isinstance(entry, dict) or not {"backend", "reason"} <= entry.keys():
        return None
    return entry["backend"], entry["reason"]


def write_decision(path: Path, key: str, backend: str, reason: str) -> None:
    """Adds (or replaces) `key`'s decision; written to a temporary file then renamed, so two denoisers
    starting at once never leave a half-written file (the later one's entries win)."""
    entries = _entries(path)
    entries[key] = {"backend": backend, "reason": reason}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as out:
        json.dump(entries, out, indent=2, sort_keys=True)
        out.write("\n")
    os.replace(out.name, path)
