"""Provenance: every output folder records how it was made.

``note.txt`` carries the exact command line, as RELION's note.txt does (appended, one block per run);
``run.json`` is machine readable: tool, version, options, seed, start/end time, host, the versions of
the libraries that decide the numbers, and extra figures. A seeded run repeats on the same machine with
the same library versions; another TensorFlow or Keras release may give other numbers.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from .outputs import write_text_atomic


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


LIBRARIES = (
    "tensorflow",
    "keras",
    "numpy",
    "scipy",
    "scikit-learn",
    "pandas",
    "mrcfile",
    "starfile",
)


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries whose releases can change results (None: not installed).

    Read from the package metadata, so nothing heavy (TensorFlow) is imported."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# CPU features that select TensorFlow's (oneDNN's) CPU kernels, and so can change a run's numbers
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has, from ``cpuinfo`` (Linux's
    format; where it cannot be read: ``platform.processor()`` and no flags)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    model, flags = "", set()
    for line in text.splitlines():  # the first processor's lines (every core repeats them)
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if model and flags:
            break
    return {
        "model": model or platform.processor() or "unknown",
        "flags": [f for f in CPU_FLAGS if f in flags],
    }


def machine_info() -> dict[str, Any]:
    """The machine a run or a measurement happened on: Python version, host, platform, CPU cores,
    the CPU's model and the flags of it that change TensorFlow's numbers (:func:`cpu_info`)."""
    cpu = cpu_info()
    return {
        "python": sys.version.split()[0],
        "host": platform.node(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
    }


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def command_line(argv: list[str] | None = None, prog: str | None = None) -> str:
    """The exact command as typed (program name plus arguments, shell-quoted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = prog or Path(sys.argv[0]).name
    return " ".join(shlex.quote(a) for a in [name, *args])


def write_provenance(
    out_dir: str | Path,
    tool: str,
    options: Any,
    argv: list[str] | None,
    started: str,
    finished: str | None = None,
    seed: int | None = None,
    status: str = "success",
    extra: dict[str, Any] | None = None,
) -> None:
    """Append the command to ``note.txt`` and (re)write ``run.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = command_line(argv, tool)
    note = out / "note.txt"
    previous = note.read_text() if note.exists() else ""
    block = f" ++++ Executing new job on {started}\n ++++ with the following command(s): \n{cmd}\n ++++ \n"
    write_text_atomic(note, previous + block)
    record = {
        "tool": tool,
        "version": __version__,
        "command": cmd,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "options": _jsonable(options),
        "seed": seed,
        "started": started,
        "finished": finished,
        "status": status,
        **machine_info(),
        "libraries": library_versions(),
    }
    if extra:
        record["results"] = _jsonable(extra)
    write_text_atomic(out / "run.json", json.dumps(record, indent=2) + "\n")
