"""``tf.distribute`` for disca_cluster: which mode a run uses, this process's worker task, and the
strategy (mirrored on one node, multi-worker across nodes from TF_CONFIG or a SLURM ``srun`` step).

Everything but :func:`make_strategy` and :func:`is_multiworker` reads only the environment, so a
tool can decide its output folder before TensorFlow starts (TensorFlow prints its start-up lines
at import, which no environment variable silences in 2.21: a bad input's one-line error should
not come after them).
"""

from __future__ import annotations

import os

from ..runtime.errors import UserError

DISTRIBUTE = ("auto", "none", "mirrored", "multiworker")


def slurm_multitask() -> bool:
    """True inside an ``srun`` step of several tasks (one process per task)."""
    n = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or "1"
    try:
        return int(n) > 1 and "SLURM_PROCID" in os.environ
    except ValueError:
        return False


def resolve_distribute(mode: str = "auto") -> str:
    """``auto`` → ``multiworker`` when TF_CONFIG is set or inside a multi-task ``srun`` step,
    ``mirrored`` when more than one GPU is visible, ``none`` otherwise."""
    if mode not in DISTRIBUTE:
        raise ValueError(f"distribute must be one of {DISTRIBUTE}, got {mode!r}")
    if mode != "auto":
        return mode
    if os.environ.get("TF_CONFIG") or slurm_multitask():
        return "multiworker"
    import tensorflow as tf

    return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"


def worker_task(mode: str) -> tuple[int, bool]:
    """(task index, is chief) of this process for a resolved distribute ``mode``.

    From TF_CONFIG when set (the chief is task ``chief`` 0, or ``worker`` 0 when the cluster has no
    ``chief``), else from SLURM_PROCID (rank 0 is the chief); always (0, True) outside multiworker.
    Reads only the environment, so it can be called before TensorFlow starts.
    """
    import json

    if mode != "multiworker":
        return 0, True
    raw = os.environ.get("TF_CONFIG")
    if raw:
        try:
            cfg = json.loads(raw)
            task = cfg.get("task", {})
            ttype, index = str(task.get("type", "worker")), int(task.get("index", 0))
        except (ValueError, TypeError, AttributeError):
            return 0, True  # TensorFlow reports the malformed TF_CONFIG itself
        chief = ttype == "chief" or (
            ttype == "worker" and index == 0 and "chief" not in cfg.get("cluster", {})
        )
        return index, chief
    try:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
    except ValueError:
        rank = 0
    return rank, rank == 0


def slurm_resolver():
    """TensorFlow's SlurmClusterResolver for this srun step, ports from ``DISCA_PORT_BASE``. A step
    it cannot describe is a UserError.

    On a node without GPUs (CUDA_VISIBLE_DEVICES empty, or unset with no nvidia-smi) the resolver
    cannot be used as it is: it asks nvidia-smi for the GPUs, and it pairs each task of a node with
    a slot of ``gpus_per_task`` GPUs, so with none it lists no task (TensorFlow 2.21: ``range()``
    with step 0 fails). It is then given one placeholder slot per task of the step and told not to
    set CUDA_VISIBLE_DEVICES from them.
    """
    import shutil

    import tensorflow as tf

    raw = os.environ.get("DISCA_PORT_BASE", "8888")
    try:
        port = int(raw)
    except ValueError:
        raise UserError(f"DISCA_PORT_BASE: not a port number: {raw!r}") from None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    kwargs = {}
    if visible == "" or (visible is None and shutil.which("nvidia-smi") is None):
        tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
        slots = int(tasks) if tasks.isdigit() and int(tasks) > 0 else 1
        kwargs = {"gpus_per_node": slots, "gpus_per_task": 1, "auto_set_gpu": False}
    try:
        return tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        raise UserError(f"--distribute multiworker: SLURM step not usable ({exc})") from None


def make_strategy(mode: str):
    """The tf.distribute strategy for a resolved ``mode`` (none / mirrored / multiworker).

    ``mirrored``: MirroredStrategy over the visible logical GPUs, or, without GPUs, over the logical
    CPU devices (one unless ``tf.config.set_logical_device_configuration`` made more).
    ``multiworker``: MultiWorkerMirroredStrategy; the cluster comes from TF_CONFIG when it is set,
    else from SLURM (``SlurmClusterResolver``: one task per worker, ports from
    ``DISCA_PORT_BASE``, default 8888, GPUs shared out among a node's tasks).
    Must be called before any other TensorFlow operation runs in a multiworker job.
    """
    import tensorflow as tf

    if mode == "none":
        return tf.distribute.get_strategy()
    if mode == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if mode == "multiworker":
        resolver = None
        if not os.environ.get("TF_CONFIG") and "SLURM_PROCID" in os.environ:
            resolver = slurm_resolver()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    raise ValueError(f"resolve the distribute mode first, got {mode!r}")


def is_multiworker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
