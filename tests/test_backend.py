"""TensorFlow's start-up lines are kept off standard error, and nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from disca_tools.model.backend import is_no_cuda_line, is_startup_line

REPO = Path(__file__).resolve().parent.parent

# as TensorFlow 2.21 wrote them on this project's CPU machine
STARTUP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795573089.024892   11087 port.cc:153] oneDNN custom operations are on. You may see "
    "slightly different numerical results due to floating-point round-off errors from different "
    "computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1795573089.025221   11087 cudart_stub.cc:31] Could not find cuda drivers on your "
    "machine, GPU will not be used.",
    "I0000 00:00:1795573089.069787   11087 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other "
    "operations, rebuild TensorFlow with the appropriate compiler flags.",
]
NO_CUDA = (
    "E0000 00:00:1795573131.491785   11238 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"
)
KEPT = [
    "W0000 00:00:1795573131.491785   11238 op_level_cost_estimator.cc:699] Error in PredictCost()",
    "E0000 00:00:1795573131.491785   11238 cuda_dnn.cc:8579] could not create cudnn handle",
    "/x/keras/src/ops/nn.py:907: UserWarning: You are using a softmax over axis -1",
    "disca_cluster: Sim/particles.star: file not found",
    "I0000 is not a log line",
    "To enable the following instructions: nothing",
]


def test_startup_lines_are_recognised_and_no_other_line_is():
    assert all(is_startup_line(line) for line in STARTUP)
    assert not any(is_startup_line(line) for line in KEPT + [NO_CUDA])
    assert is_no_cuda_line(NO_CUDA)
    assert not any(is_no_cuda_line(line) for line in STARTUP + KEPT)


def _stderr_of(script: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO)  # the level left to import_tensorflow
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_importing_tensorflow_writes_only_the_other_lines():
    # the premise: a plain import writes start-up lines to descriptor 2
    plain = _stderr_of("import tensorflow")
    assert any(is_startup_line(line) for line in plain.splitlines())
    script = f"""
import os, sys
from disca_tools.model.backend import _FilteredStderr, import_tensorflow
with _FilteredStderr():
    os.write(2, {STARTUP[1]!r}.encode() + b"\\n")
    os.write(2, {KEPT[0]!r}.encode() + b"\\n")
    print("python line", file=sys.stderr)
    os.write(2, b"no newline at the end")
import_tensorflow()
import tensorflow as tf
assert float(tf.constant(1.0) + 1.0) == 2.0
os.write(2, b"descriptor 2 restored\\n")
"""
    lines = _stderr_of(script).splitlines()
    assert lines[:3] == [KEPT[0], "python line", "no newline at the end"]
    assert lines[-1] == "descriptor 2 restored"
    assert not any(is_startup_line(line) or is_no_cuda_line(line) for line in lines)


def test_a_training_run_shows_none_of_tensorflows_startup_lines(simulated_subtomogram_project):
    # disca_cluster must import TensorFlow only through import_tensorflow (checking the options
    # once imported it through the network's module, and every start-up line reached the terminal)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO)
    out = simulated_subtomogram_project / "StartupLines"
    args = ["--i", "Sim/particles.star", "--o", str(out), "--k-candidates", "2-3", "--pca-dim", "3",
            "--width-scale", "0.05", "--feature-dim", "16", "--max-iter", "1", "--seed", "1"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", "from disca_tools.cli.cluster import main; main()", *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=simulated_subtomogram_project,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "clusters.star").is_file()
    lines = proc.stderr.splitlines()
    assert any("INFO iteration 1:" in line for line in lines)  # the run's own log is there
    assert not [line for line in lines if is_startup_line(line) or is_no_cuda_line(line)]
