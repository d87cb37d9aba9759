"""Importing TensorFlow and Keras without their start-up lines on the user's terminal.

TensorFlow 2.21 writes eight or nine lines to the process's standard error (file descriptor 2,
from C++, not through Python) when it is imported and when it first looks for GPUs: absl's
"All log messages before absl::InitializeLog()" preamble, INFO lines about oneDNN, the CUDA stubs and
the CPU's instructions, and on a machine without a GPU an error line for CUDA's failed ``cuInit``.
No environment variable silences them (``TF_CPP_MIN_LOG_LEVEL``, ``GLOG_minloglevel`` and
``ABSL_MIN_LOG_LEVEL`` were tried; tensorflow/tensorflow#100442). :func:`import_tensorflow` imports
both libraries with descriptor 2 passed through a filter that drops exactly those lines and forwards
every other line as it arrives (warnings, errors, Python warnings, a crash's last words).
"""

from __future__ import annotations

import os
import re
import sys
import threading

from ..runtime.log import logger

# absl INFO lines ("I0000 00:00:1795573089.024892   11087 port.cc:153] ...") and the preamble and
# continuation line of TensorFlow's start-up; nothing else is dropped
_STARTUP_LINE = re.compile(
    r"^(I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$)"
)
# CUDA's error when there is no GPU driver at all; dropped only when TensorFlow then finds no GPU
_NO_CUDA_LINE = re.compile(r"^E\d{4} .*\] failed call to cuInit: ")


def is_startup_line(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's start-up lines (absl INFO, preamble, CPU notice)."""
    return bool(_STARTUP_LINE.match(line))


def is_no_cuda_line(line: str) -> bool:
    """Whether ``line`` is CUDA's failed-``cuInit`` error (no driver on this machine)."""
    return bool(_NO_CUDA_LINE.match(line))


class _FilteredStderr:
    """Descriptor 2 redirected into a pipe for a block; a thread forwards each line to the real
    standard error unless it is a start-up line; failed-``cuInit`` lines are held back."""

    def __init__(self) -> None:
        self.held: list[str] = []

    def __enter__(self) -> _FilteredStderr:
        sys.stderr.flush()
        self.saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.thread = threading.Thread(target=self._forward, args=(read_end,), daemon=True)
        self.thread.start()
        return self

    def _forward(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                line = raw.decode(errors="replace").rstrip("\n")
                if is_no_cuda_line(line):
                    self.held.append(line)
                elif not is_startup_line(line):
                    os.write(self.saved, raw if raw.endswith(b"\n") else raw + b"\n")

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)  # closes the pipe's last write end: the thread sees its end
        self.thread.join(timeout=10.0)
        os.close(self.saved)


def import_tensorflow() -> None:
    """Import TensorFlow and Keras and list the GPUs, with TensorFlow's start-up lines filtered
    (see the module docstring). CUDA's failed-``cuInit`` line is shown when GPUs are found anyway,
    otherwise logged at debug level, and the CPU run is logged. In a process that has imported
    TensorFlow already (a later call included) it does nothing."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _FilteredStderr() as filtered:
        import keras  # noqa: F401
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    for line in filtered.held:
        if gpus:
            print(line, file=sys.stderr)
        else:
            logger.debug("TensorFlow: %s", line)
    if not gpus:
        logger.info("TensorFlow finds no GPU: running on the CPU")


def seed_deterministically(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (Keras' ``set_random_seed``) and ask TensorFlow for
    deterministic kernels, so that a seeded run repeats on the same machine; TensorFlow's Python
    logger shows errors only."""
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(int(seed))
    try:
        tf.config.experimental.enable_op_determinism()
    except AttributeError:  # pragma: no cover - TensorFlow before 2.9
        logger.debug("op determinism not available")
