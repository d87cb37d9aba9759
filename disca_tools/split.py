"""Per-class STAR files, class summaries and unaligned class averages (``disca_split_star``).

The split works on the STAR file's data blocks themselves, not on a converted particle table, so every
block (``data_general``, every optics group, ``data_optics``) and every particle column is written back
exactly as read and the flavour is kept: RELION 3.1 legacy in, legacy out; RELION 5 in, particles
(+ an optimisation set) out; a single-block RELION 3.0 file in, a single block out.

Class selection, in this order: ``min_probability`` drops particles whose
``rlnMaxValueProbDistribution`` is below it; ``merges`` turns groups such as ``2+5`` into one output
class numbered by the group's smallest class (``rlnClassNumber`` rewritten to it); ``classes`` keeps
only the listed (output) classes, ``exclude`` drops the listed ones; ``min_size`` drops output
classes with fewer particles.

Class averages stream the member subtomograms one at a time: from the fast store beside the STAR
(``subtomograms.npy`` with one row per name in ``subtomograms_names.txt``, the ``rlnImageName``
values, memory-mapped) when it exists, else from each ``rlnImageName`` ``.mrc`` file (relative to the
working directory = RELION project directory, as RELION resolves it; the STAR's folder is tried too).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .io.mrc import read_volume
from .io.particles import CLASS, IMAGE, POSTERIOR
from .io.store import SubtomogramStore, find_star_stores, resolve_image_name
from .runtime.errors import UserError, file_error
from .runtime.log import logger, progress

# ----------------------------------------------------------------------------- options parsing


def parse_class_list(text: str | Sequence[int] | None, what: str = "--classes") -> list[int]:
    """``"1,4"`` or ``"1 4"`` or ``"2-5"`` → sorted class numbers (1-based)."""
    if text is None:
        return []
    if not isinstance(text, str):
        return sorted({int(t) for t in text})
    out: set[int] = set()
    for tok in re.split(r"[,\s]+", text.strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", tok)
        if not m:
            raise UserError(f"{what}: cannot read {tok!r}; write class numbers like 1,4 or 2-5")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo < 1 or hi < lo:
            raise UserError(f"{what}: bad class range {tok!r} (classes are numbered from 1)")
        out.update(range(lo, hi + 1))
    return sorted(out)


def parse_merges(groups: Iterable[str] | None) -> list[list[int]]:
    """``["2+5", "3+7+8"]`` → ``[[2, 5], [3, 7, 8]]``; a class may appear in one group only."""
    out: list[list[int]] = []
    seen: set[int] = set()
    for g in groups or []:
        for part in re.split(r"[,\s]+", g.strip()):
            if not part:
                continue
            if not re.fullmatch(r"\d+(\+\d+)+", part):
                raise UserError(f"--merge: cannot read {part!r}; write groups like 2+5")
            members = sorted({int(t) for t in part.split("+")})
            if seen & set(members):
                raise UserError(
                    f"--merge: class {sorted(seen & set(members))[0]} appears in two groups"
                )
            seen.update(members)
            out.append(members)
    return out


# ----------------------------------------------------------------------------- the split


@dataclass
class SplitResult:
    """The output of :func:`split_blocks`.

    ``classes`` maps each written (output) class number to its STAR blocks; ``summary`` has one row
    per class found (before selection) with columns ``class, size, mean_posterior, status`` (status
    ``written`` or why it was dropped); ``flavour`` is ``relion30``, ``relion31`` or ``relion5``.
    """

    classes: dict[int, dict[str, pd.DataFrame | dict]]
    summary: pd.DataFrame
    flavour: str
    particles_block: str
    members: dict[int, np.ndarray] = field(default_factory=dict)


def star_flavour(blocks: dict[str, pd.DataFrame | dict]) -> tuple[str, str]:
    """``(flavour, name of the particle block)`` of a STAR file's blocks."""
    if "particles" in blocks and isinstance(blocks["particles"], pd.DataFrame):
        df = blocks["particles"]
        relion5 = "general" in blocks or any(
            str(c).startswith("rlnCenteredCoordinate") for c in df.columns
        )
        if relion5:
            return "relion5", "particles"
        return ("relion31" if "optics" in blocks else "relion30"), "particles"
    loops = [k for k, b in blocks.items() if isinstance(b, pd.DataFrame)]
    if len(loops) == 1:
        return "relion30", loops[0]
    raise UserError("no data_particles block and not a single-table STAR file")


def split_blocks(
    blocks: dict[str, pd.DataFrame | dict],
    classes: Sequence[int] = (),
    exclude: Sequence[int] = (),
    merges: Sequence[Sequence[int]] = (),
    min_size: int = 0,
    min_probability: float = 0.0,
    source: str | Path = "input",
) -> SplitResult:
    """Split a clustered STAR file's blocks into one set of blocks per class (see module docstring)."""
    try:
        flavour, pblock = star_flavour(blocks)
    except UserError as exc:
        raise file_error(source, str(exc)) from None
    df = blocks[pblock]
    assert isinstance(df, pd.DataFrame)
    if CLASS not in df.columns:
        raise file_error(source, f"no {CLASS} column: cluster the particles first (disca_cluster)")
    try:
        original = df[CLASS].astype(np.int64).to_numpy()
    except (ValueError, TypeError):
        raise file_error(source, f"{CLASS} has values that are not integers") from None
    if len(original) and original.min() < 1:
        raise file_error(source, f"{CLASS} must be 1-based; found {original.min()}")
    posterior = df[POSTERIOR].to_numpy(dtype=np.float64) if POSTERIOR in df.columns else None
    if min_probability > 0 and posterior is None:
        raise file_error(
            source, f"--min-probability needs a {POSTERIOR} column, which this file lacks"
        )

    present = sorted(set(original.tolist()))
    mapping = {c: c for c in present}
    for group in merges:
        missing = [c for c in group if c not in mapping]
        if missing:
            raise file_error(
                source, f"--merge: class {missing[0]} has no particles (classes: {_fmt(present)})"
            )
        for c in group:
            mapping[c] = group[0]
    for opt_name, listed in (("--classes", classes), ("--exclude", exclude)):
        outputs = set(mapping.values())
        unknown = [c for c in listed if c not in outputs]
        if unknown:
            raise file_error(
                source,
                f"{opt_name}: class {unknown[0]} not present (classes: {_fmt(sorted(outputs))})",
            )

    out_class = np.array([mapping[c] for c in original], dtype=np.int64)
    keep_prob = np.ones(len(df), bool) if posterior is None else posterior >= min_probability
    rows = []
    written: dict[int, dict[str, pd.DataFrame | dict]] = {}
    members: dict[int, np.ndarray] = {}
    for c in sorted(set(out_class.tolist())):
        in_class = out_class == c
        sel = in_class & keep_prob
        n = int(sel.sum())
        mean_post = float(np.mean(posterior[sel])) if posterior is not None and n else float("nan")
        merged = "+".join(str(k) for k in sorted(k for k, v in mapping.items() if v == c))
        if classes and c not in classes:
            status = "not selected"
        elif c in exclude:
            status = "excluded"
        elif n == 0:
            status = "no particle above --min-probability"
        elif n < min_size:
            status = f"fewer than --min-size {min_size}"
        else:
            status = "written"
        rows.append(
            {
                "class": c,
                "merged_from": merged,
                "size": n,
                "size_before_probability_cut": int(in_class.sum()),
                "mean_posterior": mean_post,
                "status": status,
            }
        )
        if status != "written":
            continue
        part = df.loc[sel].copy()
        part[CLASS] = c
        # every other block (general, every optics group) is kept as read: RELION refuses particles
        # whose optics group is missing, and unused groups are harmless
        written[c] = {k: (part if k == pblock else v) for k, v in blocks.items()}
        members[c] = np.flatnonzero(sel)
    summary = pd.DataFrame(
        rows,
        columns=[
            "class",
            "merged_from",
            "size",
            "size_before_probability_cut",
            "mean_posterior",
            "status",
        ],
    )
    if not written:
        raise file_error(
            source, "no class left to write after --classes/--exclude/--min-size/--min-probability"
        )
    return SplitResult(written, summary, flavour, pblock, members)


def _fmt(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


# ----------------------------------------------------------------------------- class averages


@dataclass(frozen=True)
class AverageSources:
    """Where each class member's subtomogram is read from: the fast store(s) holding every member
    (``store_rows[i]``: the store row of particle row ``i``, −1 for non-members), else one ``.mrc``
    file per member (``files``)."""

    star_path: Path
    store: SubtomogramStore | None = None
    store_rows: np.ndarray | None = None
    files: dict[int, Path] = field(default_factory=dict)


def locate_averages(
    particles: pd.DataFrame,
    members: dict[int, np.ndarray],
    star_path: str | Path,
    general: dict | None = None,
) -> AverageSources | str:
    """Find every member's subtomogram once, before anything is computed or written.

    Returns the sources, or why there can be no averages (a string) when none of the members can be
    found: RELION 5 2D-stack pseudo-subtomograms, no ``rlnImageName``, or not one file found (a STAR
    used outside its project directory, say). Some members found and others not is a UserError naming
    the first missing file: the STAR's data are incomplete.
    """
    star_path = Path(star_path)
    if general and int(general.get("rlnTomoSubTomosAre2DStacks", 0) or 0) == 1:
        return "particles are RELION 5 2D-stack pseudo-subtomograms"
    if IMAGE not in particles.columns:
        return f"no {IMAGE} column"
    used = np.unique(np.concatenate([np.asarray(m, np.int64) for m in members.values()]))
    if not len(used):
        return "no particles in the classes kept"
    names = particles[IMAGE].astype(str).to_numpy()
    found = find_star_stores(names[used], star_path)
    if found is not None:
        store_rows = np.full(len(names), -1, np.int64)
        store_rows[used] = found.rows
        return AverageSources(star_path, store=found.store, store_rows=store_rows)
    files: dict[int, Path] = {}
    missing: list[int] = []
    for r in used.tolist():
        path = resolve_image_name(names[r], star_path)
        if path is None:
            missing.append(r)
        else:
            files[r] = path
    if not files:
        return f"none of its {len(used)} subtomograms found (first: {names[used[0]]})"
    if missing:
        raise file_error(
            names[missing[0]],
            f"subtomogram listed in {star_path} not found ({len(missing)} of {len(used)} missing; "
            "paths are relative to the project directory)",
        )
    return AverageSources(star_path, files=files)


def class_averages(
    sources: AverageSources, members: dict[int, np.ndarray]
) -> dict[int, np.ndarray]:
    """Unaligned average subtomogram of each class, streaming one subtomogram at a time from the
    sources :func:`locate_averages` found (the fast store(s), else the ``.mrc`` files)."""
    out: dict[int, np.ndarray] = {}
    if sources.store is not None:
        store = sources.store
        plural = "s" if len(store.paths) > 1 else ""
        logger.info("averaging from the fast store%s %s", plural, ", ".join(map(str, store.paths)))
        for c, rows in members.items():
            acc = np.zeros(store.volumes.shape[1:], np.float64)
            for r in progress(sources.store_rows[rows], desc=f"class {c} average", unit="subtomo"):
                acc += store.volumes[r]
            out[c] = (acc / max(len(rows), 1)).astype(np.float32)
        return out
    logger.info(
        "no fast store lists every particle of %s: reading the .mrc files", sources.star_path
    )
    for c, rows in members.items():
        acc = None
        for r in progress(rows, desc=f"class {c} average", unit="subtomo"):
            path = sources.files[int(r)]
            vol, _ = read_volume(path)
            if acc is None:
                acc = np.zeros(vol.shape, np.float64)
            elif vol.shape != acc.shape:
                raise file_error(
                    path, f"box {vol.shape} differs from the class's other subtomograms {acc.shape}"
                )
            acc += vol
        out[c] = (acc / max(len(rows), 1)).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- next steps


def next_steps(
    star_files: dict[int, str],
    averages: dict[int, str],
    flavour: str,
    particle_diameter: float,
    has_ctf: bool,
    optimisation_sets: dict[int, str] | None = None,
    jobs: int = 4,
) -> list[str]:
    """The RELION command lines to run next, one reconstruction and one refinement per class."""
    lines = [
        "# Run from the RELION project directory (paths are relative to it).",
        "# 1) Check each class: reconstruct it with the particles' current angles (if any).",
    ]
    ctf = " --ctf" if has_ctf else ""
    for c, star in star_files.items():
        if flavour == "relion5" and optimisation_sets and c in optimisation_sets:
            continue
        stem = star[: -len(".star")] if star.endswith(".star") else star
        lines.append(f"relion_reconstruct --i {star} --o {stem}_reconstruct.mrc{ctf}")
    lines.append(
        "# 2) Refine each class (3D auto-refine; RELION needs MPI, at least 3 ranks, for the two"
        " half-sets) from its unaligned average as the starting reference."
    )
    for c, star in star_files.items():
        ref = averages.get(c)
        ref_args = f"--ref {ref} --ini_high 60" if ref else "--denovo_3dref"
        inp = (
            f"--ios {optimisation_sets[c]}"
            if flavour == "relion5" and optimisation_sets and c in optimisation_sets
            else f"--i {star}"
        )
        lines.append(
            f"mkdir -p Refine3D/class_{c:03d} && "
            f"mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves {inp} {ref_args} --firstiter_cc"
            f"{ctf} --particle_diameter {particle_diameter:.0f} --flatten_solvent --zero_mask --oversampling 1"
            f" --healpix_order 2 --auto_local_healpix_order 4 --offset_range 5 --offset_step 2 --sym C1"
            f" --low_resol_join_halves 40 --norm --scale --pad 2 --j {jobs} --o Refine3D/class_{c:03d}/run"
        )
    lines.append("# 3) Put the refined averages back into the tomograms:")
    lines.append(
        "#    disca_reembed --i Refine3D/class_NNN/run_data.star --maps Refine3D/class_NNN/run_class001.mrc --tomograms TOMO.mrc --o Reembed/"
    )
    return lines
