"""Output safety: atomic writes, refusal to overwrite, never touching inputs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file keeps the final suffix (some writers decide the format from it).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically and return its path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def check_not_input(outputs: Iterable[str | Path], inputs: Iterable[str | Path]) -> None:
    """Refuse any output path that is one of the input files."""
    ins = {Path(p).resolve() for p in inputs}
    for out in outputs:
        if Path(out).resolve() in ins:
            raise UserError(f"{out}: output would overwrite an input file; choose another --o")


def prepare_output_dir(
    directory: str | Path, overwrite: bool, products: Iterable[str | Path] = ()
) -> Path:
    """Create ``directory`` and refuse to proceed if any of its ``products`` already exist.

    ``products`` are file names (relative to the directory) that this run will write. Without
    ``overwrite`` an existing product is a UserError; with it, products are replaced atomically as
    they are written, so an interrupted run never leaves a half-written file behind.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path exists and is not a directory")
    if not overwrite:
        existing = [str(out / p) for p in products if (out / p).exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UserError(
                f"{existing[0]}: output already exists{more}; pass --overwrite to replace it"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out
