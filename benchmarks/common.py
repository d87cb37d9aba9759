"""What every benchmark and probe shares: how it saves results and how it measures peak memory.

One writer for all of them: the JSON (and the optional markdown table or figure) is written through a
temporary file and a rename, so an interrupted run never leaves half a result behind, and every JSON
records the machine and the library versions, because speed and seeded results depend on both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from disca_tools.runtime.outputs import atomic_path, write_text_atomic
from disca_tools.runtime.provenance import library_versions, machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def proc_status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmHWM``, ``RssAnon``, …) in MiB; None without it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux: ``VmHWM``).

    Not ``ru_maxrss``: Linux carries it over ``fork`` and ``exec``, so a child process started by a
    parent that holds gigabytes reports the parent's memory as its own peak. ``VmHWM`` belongs to
    the process's own address space, which ``exec`` starts afresh.
    """
    hwm = proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return maxrss / (1024.0**2 if sys.platform == "darwin" else 1024.0)


def measured_on() -> dict[str, Any]:
    """What a figure depends on besides the code: ``machine`` and ``libraries`` (their versions)."""
    return {"machine": machine_info(), "libraries": library_versions()}


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop ``path``'s clean pages from the page cache (``posix_fadvise
    DONTNEED``; no root needed), so that the next read comes from disk. Where the platform or the
    file system cannot, nothing happens (on overlay or tmpfs the pages stay)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (AttributeError, OSError):
        pass


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Wall-clock seconds of one call ``fn(*args, **kwargs)``, and its result."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def save_result(
    name: str,
    tag: str,
    payload: dict,
    markdown: str | None = None,
    *,
    folder: Path = RESULTS,
    json_default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``FOLDER/NAME[_TAG].json`` (and ``.md`` if ``markdown``) atomically; return the JSON.

    The JSON is ``payload`` plus ``machine`` and ``libraries``.
    """
    stem = name + (f"_{tag}" if tag else "")
    record = {**payload, **measured_on()}
    if markdown is not None:
        write_text_atomic(Path(folder) / f"{stem}.md", markdown)
    text = json.dumps(record, indent=1, default=json_default) + "\n"
    return write_text_atomic(Path(folder) / f"{stem}.json", text)


def save_arrays(path: Path, **arrays: Any) -> Path:
    """Write ``arrays`` to the ``.npz`` file ``path`` atomically (``numpy.savez``); return the path."""
    import numpy as np

    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return Path(path)


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically (the format comes from ``path``'s suffix)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return Path(path)


def add_cluster_arguments(ap: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add ``disca_cluster``'s options ``names`` (field names of its options dataclass) to ``ap``,
    with the tool's flag, type, choices, default and help: one definition for the tool and the
    benchmarks. The values reach the loop through :meth:`EMConfig.from_options`."""
    import dataclasses
    import typing

    from disca_tools.cli.cluster import Options

    fields = {f.name: f for f in dataclasses.fields(Options)}
    hints = typing.get_type_hints(Options)
    for name in names:
        f = fields[name]
        flag = next(a for a in f.metadata["args"] if a.startswith("--"))
        help_text = f"disca_cluster {flag}: {f.metadata.get('help', '')}".replace("%", "%%")
        if hints[name] is bool:
            ap.add_argument(flag, dest=name, action="store_true", help=help_text)
            continue
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        ap.add_argument(
            flag, dest=name, type=hints[name], default=f.default, help=help_text, **extra
        )
