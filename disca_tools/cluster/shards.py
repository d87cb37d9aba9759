"""Sharded assignment: split a particle table into N interleaved shards, and merge their results.

A shard run (``disca_cluster --model RUN --shard I/N``) assigns rows ``I−1, I−1+N, …`` and records
them in ``shard.json`` with fingerprints of the model and of the input's rlnImageName column, so a
merge can prove that its shards come from one model and one input and cover every row exactly once.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.particles import ParticleTable
from ..io.star import read_particles
from ..runtime.errors import UserError, file_error

SHARD_FILE = "shard.json"
SHARD_KEYS = ("shard", "n_shards", "rows", "n_rows", "model_sha256", "image_names_sha256")


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' → (2, 8): shard I (1-based) of N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"--shard: cannot read {text!r} (use I/N, e.g. 2/8)")
    i, n = int(m.group(1)), int(m.group(2))
    if not 1 <= i <= n:
        raise UserError(f"--shard: need 1 ≤ I ≤ N, got {text!r}")
    return i, n


def shard_rows(i: int, n_shards: int, n_rows: int) -> np.ndarray:
    """Rows (0-based) of shard ``i`` of ``n_shards``: i−1, i−1+N, i−1+2N, … (interleaved)."""
    return np.arange(i - 1, n_rows, n_shards, dtype=np.int64)


def names_hash(names: Iterable) -> str:
    """SHA-256 of a table's rlnImageName column (order matters)."""
    h = hashlib.sha256()
    for n in names:
        h.update(str(n).encode())
        h.update(b"\n")
    return h.hexdigest()


def files_fingerprint(folder: str | Path, names: Sequence[str]) -> str:
    """SHA-256 over the named files of a folder (e.g. a trained run's model, mixture and config)."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        with open(Path(folder) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass
class Shard:
    """One finished shard run: its metadata, particle table and features."""

    folder: Path
    meta: dict
    table: ParticleTable
    features: np.ndarray


def read_shard(folder: str | Path, features_file: str) -> Shard:
    """Read a ``--shard`` run's folder, checking that its three files agree."""
    d = Path(folder)
    if not d.is_dir():
        raise file_error(d, "--merge-shards: not a folder")
    for name in (SHARD_FILE, "clusters.star", features_file):
        if not (d / name).is_file():
            raise file_error(d, f"--merge-shards: not a finished --shard run (missing {name})")
    try:
        meta = json.loads((d / SHARD_FILE).read_text())
        missing = [k for k in SHARD_KEYS if k not in meta]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
    except ValueError as exc:
        raise file_error(d / SHARD_FILE, f"unreadable shard metadata ({exc})") from None
    table = read_particles(d / "clusters.star")
    feats = np.load(d / features_file, mmap_mode="r")
    if not (len(table) == len(meta["rows"]) == len(feats)):
        raise file_error(
            d, f"shard has {len(meta['rows'])} rows in {SHARD_FILE}, {len(table)} in clusters.star, "
            f"{len(feats)} in {features_file}"
        )  # fmt: skip
    return Shard(d, meta, table, feats)


def merge(shards: Sequence[Shard]) -> tuple[ParticleTable, np.ndarray, dict]:
    """Check that ``shards`` form one complete set and return (table, features, first meta) in the
    input's original row order. A foreign, duplicate or missing shard is a UserError."""
    first, first_dir = shards[0].meta, shards[0].folder
    seen: dict[int, Path] = {}
    for s in shards:
        for key, what in (("model_sha256", "model"), ("image_names_sha256", "input STAR file"),
                          ("n_shards", "number of shards"), ("n_rows", "number of rows")):  # fmt: skip
            if s.meta[key] != first[key]:
                raise file_error(s.folder, f"--merge-shards: a different {what} than {first_dir}")
        if s.features.shape[1:] != shards[0].features.shape[1:]:
            raise file_error(s.folder, f"--merge-shards: features of another size than {first_dir}")
        i = int(s.meta["shard"])
        if i in seen:
            raise file_error(
                s.folder, f"--merge-shards: shard {i}/{s.meta['n_shards']} also given as {seen[i]}"
            )
        seen[i] = s.folder
    n_shards, n = int(first["n_shards"]), int(first["n_rows"])
    missing = sorted(set(range(1, n_shards + 1)) - set(seen))
    if missing:
        raise UserError(
            f"--merge-shards: shard{'s' * (len(missing) > 1)} "
            f"{', '.join(f'{m}/{n_shards}' for m in missing)} missing (of {first.get('input')})"
        )
    rows = np.concatenate([np.asarray(s.meta["rows"], dtype=np.int64) for s in shards])
    counts = np.bincount(rows, minlength=n) if rows.size and rows.min() >= 0 else None
    if counts is None or len(counts) != n or not np.all(counts == 1):
        raise UserError("--merge-shards: the shards do not cover every input row exactly once")
    order = np.argsort(rows, kind="stable")
    df = pd.concat([s.table.particles for s in shards], ignore_index=True).iloc[order]
    df = df.reset_index(drop=True)
    if first["image_names_sha256"] is not None and (
        names_hash(df["rlnImageName"]) != first["image_names_sha256"]
    ):
        raise UserError("--merge-shards: the merged image names do not match the input STAR file")
    feats = np.concatenate([np.asarray(s.features) for s in shards])[order]
    return shards[0].table.with_particles(df), feats, first
