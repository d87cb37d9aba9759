"""Subtomograms for YOPO: the streaming store, batches, and rotation augmentation.

The store
    ``subtomograms.npy`` (``np.save`` of an (M, S, S, S) float32/float16 array, opened as a memmap)
    plus ``subtomograms_names.txt`` (the ``rlnImageName`` of each row). ``disca_extract`` and
    ``disca_simulate`` write one beside their particles.star; a STAR that merges several
    extractions is read from their stores in place. When no store covers every particle,
    :func:`load_particle_volumes` streams the per-particle ``.mrc`` files into a store in the
    output folder once, so that epochs read from a memmap. Only one batch of volumes is ever in
    memory.

Batches
    Every volume is normalised on the fly to zero mean and unit standard deviation (per volume).
    Training batches draw from the N originals plus N rotated copies (:func:`train_dataset`): for
    each epoch a seeded permutation of the 2N entries; rotated entries get a fresh rotation drawn
    uniformly on SO(3) (Haar measure, :func:`disca_tools.geometry.random_rotations`), applied in the
    TensorFlow graph by trilinear interpolation about the true box centre ``S // 2`` (RELION's
    convention, as :func:`disca_tools.geometry.rotate_volume`); voxels whose source falls outside
    the box are filled with N(0, 1) noise, matching the normalised data. No process pools: the
    generator reads the memmap, an XLA-compiled graph rotates, ``prefetch`` overlaps both with
    training.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..geometry import random_rotations
from ..io.mrc import read_info, read_volume
from ..io.particles import IMAGE, ParticleTable
from ..io.store import (
    NAMES_FILE,
    STORE_FILE,
    SubtomogramStore,
    find_star_stores,
    open_store,
    resolve_image_name,
)
from ..runtime.errors import UserError, file_error
from ..runtime.log import check_abort, logger, progress

_CHUNK = 256


def resolve_image_paths(image_names: list[str], star_path: str | Path) -> list[Path]:
    """The file of each rlnImageName (:func:`disca_tools.io.store.resolve_image_name`); all must exist."""
    out: list[Path] = []
    for name in image_names:
        name = str(name)
        if "@" in name:
            raise file_error(
                star_path, f"image {name!r} is a stack entry; 3D subtomograms must be one .mrc each"
            )
        path = resolve_image_name(name, star_path)
        if path is None:
            raise file_error(
                star_path,
                f"image file {name} not found (relative to the working directory or the STAR file's folder)",
            )
        out.append(path)
    return out


def _check_volumes(vols: np.ndarray, where: list[str]) -> None:
    """Raise a UserError naming the first NaN/inf or constant volume of a chunk."""
    flat = np.asarray(vols, dtype=np.float32).reshape(len(vols), -1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        raise file_error(
            where[int(np.argmin(finite))], "subtomogram contains NaN or infinite values"
        )
    std = flat.std(axis=1)
    if not (std > 0).all():
        raise file_error(where[int(np.argmin(std > 0))], "subtomogram is constant (zero variance)")


def validate_store(store: SubtomogramStore, rows: np.ndarray) -> None:
    """Check the used rows for NaN/inf and constant volumes, streaming in chunks."""
    rows = np.asarray(rows)
    order = np.sort(np.unique(rows))
    for start in progress(
        range(0, len(order), _CHUNK), total=-(-len(order) // _CHUNK), desc="checking"
    ):
        r = order[start : start + _CHUNK]
        _check_volumes(store.volumes[r], [store.source(i) for i in r])


def build_store(
    paths: list[Path], names: list[str], folder: str | Path, float16: bool = False
) -> SubtomogramStore:
    """Stream per-particle MRC files into ``folder/subtomograms.npy`` (+ names), atomically.

    Checks on the way that all volumes are cubic, of one size, finite and not constant.
    """
    if not paths:
        raise UserError("no subtomograms to read")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = read_info(paths[0])
    shape = first.shape_zyx
    if len(set(shape)) != 1:
        raise file_error(paths[0], f"subtomogram is not cubic: {shape}")
    final = folder / STORE_FILE
    tmp = folder / f".{STORE_FILE}.{os.getpid()}.tmp.npy"
    dtype = np.float16 if float16 else np.float32
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(paths), *shape))
    try:
        for start in progress(
            range(0, len(paths), _CHUNK), total=-(-len(paths) // _CHUNK), desc="reading"
        ):
            chunk = paths[start : start + _CHUNK]
            vols = []
            for p in chunk:
                v, _ = read_volume(p)
                if v.shape != shape:
                    raise file_error(
                        p, f"subtomogram size {v.shape} differs from {shape} ({paths[0]})"
                    )
                vols.append(v)
            block = np.stack(vols)
            _check_volumes(block, [str(p) for p in chunk])
            arr[start : start + len(chunk)] = block
        arr.flush()
        del arr
        names_tmp = folder / f".{NAMES_FILE}.{os.getpid()}.tmp"
        names_tmp.write_text("".join(f"{n}\n" for n in names))
        os.replace(tmp, final)
        os.replace(names_tmp, folder / NAMES_FILE)
    finally:
        if tmp.exists():
            tmp.unlink()
    store = open_store(folder)
    assert store is not None
    return store


@dataclass
class ParticleVolumes:
    """Where a particle table's subtomograms are: a store covering them, or the .mrc files."""

    box: int
    store: SubtomogramStore | None = None
    rows: np.ndarray | None = None
    paths: list[Path] | None = None
    names: list[str] | None = None


def locate_particle_volumes(
    table: ParticleTable, star_path: str | Path, work_dir: str | Path
) -> ParticleVolumes:
    """Find the subtomograms of a particle table without writing anything.

    The fast store beside the STAR file when it covers every particle, else a store already built
    in ``work_dir`` for the same images, else the stores of the extractions a merged STAR combines
    (:func:`disca_tools.io.store.find_star_stores`), else the rlnImageName .mrc files (all must exist).
    """
    if IMAGE not in table.particles.columns:
        raise file_error(
            star_path, f"no {IMAGE} column: which subtomogram belongs to each particle?"
        )
    names = [str(n) for n in table.particles[IMAGE]]
    if not names:
        raise file_error(star_path, "no particles")
    found = find_star_stores(names, star_path, also_in=(Path(work_dir),))
    if found is not None:
        return ParticleVolumes(found.store.box, store=found.store, rows=found.rows)
    paths = resolve_image_paths(names, star_path)
    shape = read_info(paths[0]).shape_zyx
    if len(set(shape)) != 1:
        raise file_error(paths[0], f"subtomogram is not cubic: {shape}")
    return ParticleVolumes(int(shape[0]), paths=paths, names=names)


def load_particle_volumes(
    table: ParticleTable,
    star_path: str | Path,
    work_dir: str | Path,
    located: ParticleVolumes | None = None,
) -> tuple[SubtomogramStore, np.ndarray]:
    """The store holding a particle table's subtomograms and the store row of each particle.

    See :func:`locate_particle_volumes`; .mrc files are streamed into ``work_dir/subtomograms.npy``
    once (checked for size, NaN and constant volumes). A store's used rows are checked too.
    """
    loc = located or locate_particle_volumes(table, star_path, work_dir)
    if loc.store is not None:
        n_stores = len(loc.store.paths)
        logger.info(
            "Reading subtomograms from %s%s",
            loc.store.path,
            f" and {n_stores - 1} more stores (one per extraction)" if n_stores > 1 else "",
        )
        validate_store(loc.store, loc.rows)
        return loc.store, loc.rows
    logger.info("Building a subtomogram store in %s from %d MRC files", work_dir, len(loc.paths))
    store = build_store(loc.paths, loc.names, work_dir)
    return store, np.arange(len(loc.names), dtype=np.int64)


# ----------------------------------------------------------------------------- batches


def normalise(vols: np.ndarray) -> np.ndarray:
    """Per-volume zero mean, unit standard deviation, float32."""
    x = np.asarray(vols, dtype=np.float32)
    axes = tuple(range(1, x.ndim))
    m = x.mean(axis=axes, keepdims=True)
    s = x.std(axis=axes, keepdims=True)
    return (x - m) / np.where(s > 0, s, 1.0)


def gather(store: SubtomogramStore, rows: np.ndarray) -> np.ndarray:
    """Normalised volumes of store ``rows`` (any order), reading the memmap in ascending order."""
    rows = np.asarray(rows)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *store.volumes.shape[1:]), dtype=np.float32)
    out[order] = store.volumes[rows[order]]
    return normalise(out)


def batch_bounds(total: int, batch_size: int, multiple: int = 1) -> list[tuple[int, int]]:
    """``(start, stop)`` of each batch of ``total`` examples. With ``multiple`` (the replicas of a
    tf.distribute strategy, which split every batch evenly) the last batch is cut to a multiple of
    it: up to ``multiple`` − 1 examples of an epoch are left out (others in each shuffled epoch)."""
    bounds = []
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        stop = start + (stop - start) // multiple * multiple
        if stop > start:
            bounds.append((start, stop))
    return bounds


def train_batches(
    store: SubtomogramStore,
    rows: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    augment: bool = True,
    multiple: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.int32, np.ndarray, np.ndarray]]:
    """One epoch of training batches ``(volumes, rotations, n_originals, noise_seed, targets)``.

    The epoch covers the N originals and, with ``augment``, N rotated copies, in a random order
    (within a batch, originals first: the first ``n_originals``). Originals carry the identity
    matrix; copies a uniform random rotation. Batches are of ``batch_size``; see
    :func:`batch_bounds` for ``multiple``.
    """
    n = len(rows)
    order = rng.permutation(2 * n if augment else n)
    for start, stop in batch_bounds(len(order), batch_size, multiple):
        check_abort()
        e = order[start:stop]
        e = e[np.argsort(e >= n, kind="stable")]  # originals first: only the rest is rotated
        p = e % n
        rotated = e >= n
        mats = np.broadcast_to(np.eye(3, dtype=np.float32), (len(e), 3, 3)).copy()
        if rotated.any():
            mats[rotated] = random_rotations(int(rotated.sum()), rng).astype(np.float32)
        noise_seed = rng.integers(0, 2**31 - 1, size=2, dtype=np.int64)
        n_originals = np.int32(len(e) - int(rotated.sum()))
        y = np.asarray(targets[p], dtype=np.float32)
        yield gather(store, rows[p]), mats, n_originals, noise_seed, y


def rotate_volumes(vols, mats, noise):
    """Rotate a batch of volumes (B, S, S, S) in TensorFlow: ``out(x) = vol(M·(x − c) + c)``.

    ``mats`` (B, 3, 3) act on (x, y, z) vectors, ``c = S // 2``; trilinear interpolation; voxels
    whose source lies outside the box take the value of ``noise`` (B, S, S, S).
    """
    import tensorflow as tf

    vols = tf.convert_to_tensor(vols, tf.float32)
    s = int(vols.shape[1])
    c = float(s // 2)
    r = tf.range(s, dtype=tf.float32)
    zz, yy, xx = tf.meshgrid(r, r, r, indexing="ij")
    grid = tf.stack([tf.reshape(xx, [-1]), tf.reshape(yy, [-1]), tf.reshape(zz, [-1])], axis=1) - c
    src = tf.einsum("bij,nj->bni", tf.cast(mats, tf.float32), grid) + c  # (B, S³, 3) as (x, y, z)
    valid = tf.reduce_all((src >= 0.0) & (src <= s - 1.0), axis=-1)
    base = tf.clip_by_value(tf.floor(src), 0.0, s - 2.0)
    frac = src - base
    i0 = tf.cast(base, tf.int32)
    flat = tf.reshape(vols, [tf.shape(vols)[0], -1])
    out = tf.zeros(tf.shape(valid), tf.float32)
    for dz in (0, 1):
        wz = frac[..., 2] if dz else 1.0 - frac[..., 2]
        for dy in (0, 1):
            wy = frac[..., 1] if dy else 1.0 - frac[..., 1]
            for dx in (0, 1):
                wx = frac[..., 0] if dx else 1.0 - frac[..., 0]
                idx = ((i0[..., 2] + dz) * s + (i0[..., 1] + dy)) * s + (i0[..., 0] + dx)
                out += wz * wy * wx * tf.gather(flat, idx, batch_dims=1)
    out = tf.where(valid, out, tf.reshape(tf.cast(noise, tf.float32), tf.shape(valid)))
    return tf.reshape(out, tf.shape(vols))


@functools.cache
def compiled_rotation():
    """:func:`rotate_volumes` compiled with XLA (once per batch shape). On the 2-core CPU it rotates
    2,000 24³ volumes in 0.2 s, against 1.2 s as a plain graph (benchmarks/bench_em_parts.py); on a
    CPU the augmentation takes its cores from training, so this is time off every epoch."""
    import tensorflow as tf

    return tf.function(rotate_volumes, jit_compile=True)


@functools.cache
def dataset_rotation():
    """The rotation the training dataset maps with: :func:`compiled_rotation` if an XLA function
    runs inside a ``tf.data`` map on this machine (checked once on a tiny batch), else the plain
    graph, with a warning. XLA inside ``tf.data`` is checked here on CPUs only; TensorFlow has had
    device-placement bugs with it, so a failure costs speed, never the run."""
    import tensorflow as tf

    fn = compiled_rotation()
    probe = (tf.zeros((1, 4, 4, 4)), tf.eye(3, batch_shape=[1]), tf.zeros((1, 4, 4, 4)))
    try:
        for _ in tf.data.Dataset.from_tensors(probe).map(fn):
            pass
        return fn
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to the plain graph
        logger.warning(
            "XLA rotation unavailable inside tf.data (%s: %s); using the plain graph (slower)",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return tf.function(rotate_volumes)


def train_dataset(
    store: SubtomogramStore,
    rows: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    seed: int,
    augment: bool = True,
    multiple: int = 1,
):
    """A tf.data.Dataset of ``(x (B,S,S,S,1), y (B,K))`` streaming one epoch per iteration over it.

    Each pass over the dataset (each Keras epoch) draws a new order and new rotations from one
    generator seeded with ``seed``, so a run is reproducible. ``multiple``: the number of
    replicas under a strategy (every batch a multiple of it; :func:`batch_bounds`).
    """
    import tensorflow as tf

    s = store.box
    k = int(targets.shape[1])
    rng = np.random.default_rng(seed)

    def gen():
        yield from train_batches(store, rows, targets, batch_size, rng, augment, multiple)

    sig = (
        tf.TensorSpec((None, s, s, s), tf.float32),
        tf.TensorSpec((None, 3, 3), tf.float32),
        tf.TensorSpec((), tf.int32),
        tf.TensorSpec((2,), tf.int64),
        tf.TensorSpec((None, k), tf.float32),
    )
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig)

    rotate_batch = dataset_rotation()

    def rotate(x, m, k, noise_seed, y):
        # the k originals come first in a batch (identity matrices, which reproduce them exactly):
        # only the copies need noise. The whole batch is rotated so that the compiled function
        # sees two shapes (full and last batch), not one per number of copies.
        noise = tf.random.stateless_normal(tf.shape(x[k:]), seed=noise_seed)
        noise = tf.concat([tf.zeros_like(x[:k]), noise], axis=0)
        return rotate_batch(x, m, noise)[..., None], y

    n_batches = len(batch_bounds(len(rows) * (2 if augment else 1), batch_size, multiple))
    ds = ds.apply(tf.data.experimental.assert_cardinality(n_batches))
    ds = ds.map(rotate, num_parallel_calls=1, deterministic=True).prefetch(2)
    # Under tf.distribute ``batch_size`` is the global batch, split among the replicas. A
    # generator has no files to shard: every worker runs the same seeded generator and keeps its
    # part of each batch (DATA sharding), so workers never see the same sample.
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(opts)


def inference_dataset(
    store: SubtomogramStore,
    rows: np.ndarray,
    batch_size: int,
    copies: tuple[np.ndarray, np.ndarray] | None = None,
    multiple: int = 1,
):
    """A tf.data.Dataset of normalised ``x (B,S,S,S,1)`` in the order of ``rows``.

    ``multiple`` (a divisor of ``batch_size``): the last batch is padded to a multiple of it by
    repeating its last volume (under a ``tf.distribute`` strategy with that many replicas, a batch
    smaller than it would leave a replica with no data, which Keras' ``predict`` fails on); the
    caller drops the extra rows, which come last.

    ``copies``: ``(matrices (R, 3, 3), fills (R, S, S, S))``: each batch becomes
    ``(B, R + 1, S, S, S, 1)``, every volume followed by R copies of it rotated as the training
    augmentation rotates (:func:`rotate_volumes`), copy r by matrix r, its voxels from outside the
    box taking the values of fill r. The volumes are read once, whatever R."""
    import tensorflow as tf

    if batch_size % multiple:
        raise ValueError(f"batch size {batch_size} is not a multiple of {multiple}")
    s = store.box
    rows = np.asarray(rows)

    def gen():
        for start in range(0, len(rows), batch_size):
            check_abort()
            chunk = rows[start : start + batch_size]  # only the last can be short
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], -len(chunk) % multiple)])
            yield gather(store, chunk)[..., None]

    sig = tf.TensorSpec((None, s, s, s, 1), tf.float32)
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
    ds = ds.apply(tf.data.experimental.assert_cardinality(-(-len(rows) // batch_size)))
    if copies is not None:
        rotate_batch = dataset_rotation()
        mats = tf.constant(copies[0], tf.float32)
        fills = tf.constant(copies[1], tf.float32)
        r = int(copies[0].shape[0])

        def with_copies(x):
            # one call rotates the R copies of the whole batch: rows copy-major, (R·B, S, S, S)
            b = tf.shape(x)[0]
            vols = tf.reshape(tf.tile(x[None, ..., 0], [r, 1, 1, 1, 1]), [-1, s, s, s])
            rotated = rotate_batch(vols, tf.repeat(mats, b, axis=0), tf.repeat(fills, b, axis=0))
            rotated = tf.transpose(tf.reshape(rotated, [r, b, s, s, s]), [1, 0, 2, 3, 4])
            return tf.concat([x[:, None, ..., 0], rotated], axis=1)[..., None]

        ds = ds.map(with_copies, num_parallel_calls=1, deterministic=True)
    return ds.prefetch(2)


def prediction_rotations(count: int, box: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` rotations (uniform on SO(3)) and noise fills (standard normal, as the training
    copies' fill) of :func:`predict_features`' rotated copies: ``(count, 3, 3)``, ``(count, S, S, S)``.
    The same for every particle and batch, so features depend on ``seed`` only, not on how the rows
    are batched or sharded."""
    rng = np.random.default_rng([int(seed), 0x7E57])
    mats = random_rotations(count, rng).astype(np.float32).reshape(count, 3, 3)
    fills = rng.standard_normal((count, box, box, box), dtype=np.float32)
    return mats, fills


def predict_features(
    extractor,
    store: SubtomogramStore,
    rows: np.ndarray,
    batch_size: int = 64,
    local: bool = False,
    rotations: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Features (N, F) float32 of the store ``rows``, in inference mode, streamed from the memmap.

    ``rotations`` > 1: the mean of the features of each volume and of ``rotations`` − 1 rotated
    copies of it (:func:`prediction_rotations` of ``seed``; ``disca_cluster --predict-rotations``),
    in one pass that reads each volume once; a batch then holds ``batch_size // rotations``
    volumes with their copies, so the network still sees ``batch_size`` volumes at a time.
    ``local``: compute every row in this process with a plain compiled call instead of
    ``model.predict`` (used by multi-worker training, where each worker needs all the features and
    ``predict`` would split the rows among the workers).
    """
    rows = np.asarray(rows)
    if len(rows) == 0:
        return np.zeros((0, int(extractor.output.shape[-1])), dtype=np.float32)
    # Under a tf.distribute strategy Keras' predict fails on a batch smaller than the replicas
    # (a replica without data: InvalidArgumentError on MirroredStrategy over two logical CPUs),
    # so the batches are multiples of the replicas (also an even split), the last one padded.
    replicas = 1 if local else int(extractor.distribute_strategy.num_replicas_in_sync)
    per_batch = max(1, batch_size // max(rotations, 1) // replicas) * replicas
    if rotations <= 1:
        ds = inference_dataset(store, rows, per_batch, multiple=replicas)
        return _predict_pass(extractor, ds, local)[: len(rows)]
    from .yopo import copy_mean_model

    copies = prediction_rotations(rotations - 1, store.box, seed)
    ds = inference_dataset(store, rows, per_batch, copies, multiple=replicas)
    return _predict_pass(copy_mean_model(extractor, rotations), ds, local)[: len(rows)]


_LOCAL_STEP = "_disca_local_predict_step"


def _predict_pass(model, ds, local: bool) -> np.ndarray:
    """One pass of ``model`` over the batches of ``ds`` (at least one): (N, F) float32."""
    if not local:
        return np.asarray(model.predict(ds, verbose=0), dtype=np.float32)
    import tensorflow as tf

    from .yopo import kept_on

    # kept on the model: each EM iteration's prediction reuses the traced function
    step = kept_on(
        model,
        _LOCAL_STEP,
        lambda: tf.function(lambda x: model(x, training=False), reduce_retracing=True),
    )
    return np.concatenate([np.asarray(step(x), dtype=np.float32) for x in ds])
