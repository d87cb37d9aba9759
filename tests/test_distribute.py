"""disca_cluster scale-out: tf.distribute training, sharded prediction and the merge step."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import simulate_subtomograms, working_directory  # noqa: E402

from disca_tools.cli import cluster as C
from disca_tools.cluster.matching import accuracy_after_matching
from disca_tools.io.star import read_particles, read_star_blocks, write_star_blocks
from disca_tools.model import distribute as D

REPO = Path(__file__).resolve().parents[1]
TINY = ["--k-candidates", "2-4", "--pca-dim", "4", "--width-scale", "0.1", "--feature-dim", "32",
        "--precision", "float32", "--seed", "3", "--max-iter", "1", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """3 very different structures at SNR 10 (30 each), clustered once with --distribute none."""
    root = tmp_path_factory.mktemp("dist")
    with working_directory(root):
        simulate_subtomograms("Sim", ["4v4r", "1s3x", "3d2f"], 30, 24, 10, 10, 1)
        args = ["--i", "Sim/particles.star", "--o", "Plain", "--distribute", "none", *TINY]
        assert C.main(args) == 0
        yield root


def _classes(path: str | Path) -> np.ndarray:
    return read_particles(path).particles["rlnClassNumber"].to_numpy()


def _results(folder: str) -> dict:
    return json.loads(Path(folder, "run.json").read_text())["results"]


def _check_agrees_with_plain(folder: str, replicas: int, distribute: str = "mirrored") -> None:
    res, plain = _results(folder), _results("Plain")
    assert res["distribute"] == distribute and res["replicas"] == replicas
    assert plain["distribute"] == "none" and plain["replicas"] == 1
    assert res["k"] == plain["k"] == 3
    truth = _classes("Sim/particles.star")
    assert (
        accuracy_after_matching(
            _classes("Plain/clusters.star"), _classes(f"{folder}/clusters.star")
        )
        >= 0.9
    )
    assert accuracy_after_matching(truth, _classes(f"{folder}/clusters.star")) >= 0.9
    assert np.load(f"{folder}/features.npy").shape == (90, 32)


def test_mirrored_on_the_single_cpu_device_matches_none(project):
    args = ["--i", "Sim/particles.star", "--o", "Mirrored", "--distribute", "mirrored", *TINY]
    assert C.main(args) == 0
    _check_agrees_with_plain("Mirrored", replicas=1)


def test_mirrored_over_two_logical_cpus_in_a_subprocess(project):
    # logical devices must be configured before TensorFlow starts: a fresh interpreter
    script = (
        "import os, sys\n"
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from disca_tools.cli.cluster import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    args = ["--i", "Sim/particles.star", "--o", "Mirrored2", "--distribute", "mirrored", *TINY]
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    res = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    _check_agrees_with_plain("Mirrored2", replicas=2)


def test_rotation_averaged_prediction_over_two_mirrored_replicas_matches_one_device():
    """Prediction under MirroredStrategy over two logical CPUs equals the same weights' on one
    device: with --predict-rotations every volume's copies stay on one replica; batches are
    rounded to multiples of the replicas (3 to 2), and the last batch of one volume (fewer than the
    replicas, which Keras' predict fails on) is padded, with and without copies."""
    script = (
        "import numpy as np, tensorflow as tf\n"
        "from pathlib import Path\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from disca_tools.model import yopo as Y\n"
        "from disca_tools.io.store import SubtomogramStore\n"
        "from disca_tools.model.data import predict_features\n"
        "vols = np.random.default_rng(1).normal(size=(10, 24, 24, 24)).astype(np.float32)\n"
        "store = SubtomogramStore(vols, [f'p{i}' for i in range(10)], Path('mem'))\n"
        "cfg = Y.YopoConfig(24, 2, 0.05, 8)\n"
        "strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])\n"
        "with strategy.scope():\n"
        "    mirrored = Y.feature_extractor(Y.build_yopo(cfg, seed=2))\n"
        "plain = Y.feature_extractor(Y.build_yopo(cfg, seed=7))\n"
        "plain.set_weights(mirrored.get_weights())\n"
        "rows = np.arange(9)[::-1]\n"
        "a = predict_features(mirrored, store, rows, batch_size=12, rotations=4, seed=3)\n"
        "b = predict_features(plain, store, rows, batch_size=12, rotations=4, seed=3)\n"
        "c = predict_features(plain, store, rows, batch_size=3, rotations=1, seed=3)\n"
        "d = predict_features(mirrored, store, rows, batch_size=3, rotations=1, seed=3)\n"
        "assert a.shape == c.shape == d.shape == (9, 8), (a.shape, c.shape, d.shape)\n"
        "np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)\n"
        "np.testing.assert_allclose(d, c, rtol=1e-4, atol=1e-5)\n"
        "assert not np.allclose(a, c, atol=1e-3)\n"
        "print('replicas', strategy.num_replicas_in_sync)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "replicas 2" in res.stdout


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _consecutive_free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports (SlurmClusterResolver numbers a node's tasks'
    ports from one base)."""
    for _ in range(50):
        base = _free_ports(1)[0]
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("localhost", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def _worker_environments(slurm: bool) -> list[dict]:
    """The cluster of two workers on this machine, as TF_CONFIG or as the variables of a SLURM
    step of two tasks on one node without GPUs (what ``srun`` sets)."""
    if slurm:
        base = _consecutive_free_ports(2)
        step = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
                "SLURM_STEP_TASKS_PER_NODE": "2", "DISCA_PORT_BASE": str(base),
                "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
        return [dict(step, SLURM_PROCID=str(i)) for i in range(2)]
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    return [
        {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        for i in range(2)
    ]


def _run_two_workers(
    name: str, script: str, timeout: float, slurm: bool = False, extra: tuple[str, ...] = ()
) -> tuple[list[int], Path, str]:
    """Run ``script`` (a disca_cluster main) as the two workers of a MultiWorkerMirroredStrategy
    on this machine with ``--o name`` (the cluster from TF_CONFIG, or with ``slurm`` from SLURM's
    variables): the exit codes (-9: killed at ``timeout`` s), the folder holding the non-chief
    worker's temporary files, and the logs' last lines."""
    tmp = Path(f"{name}Tmp").resolve()  # the non-chief worker's temporary folder goes here
    tmp.mkdir()
    args = ["--i", "Sim/particles.star", "--o", name, "--distribute", "multiworker", *TINY, *extra]
    procs = []
    base = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
    for i, cluster_env in enumerate(_worker_environments(slurm)):
        env = dict(base, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp),
                   **cluster_env)  # fmt: skip
        with open(f"{name}_worker{i}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # workers waiting for each other: killed below
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [Path(f"{name}_worker{i}.log").read_text().splitlines() for i in range(2)]
    # without TensorFlow's dumps of tensors (indented lines)
    tails = [
        "\n".join([x for x in lines if x.strip() and x[:1] not in " ["][-30:]) for lines in logs
    ]
    return [p.returncode for p in procs], tmp, "\n---\n".join(tails)


def _processes_with_env(entry: str) -> list[int]:
    """PIDs of this machine's processes whose environment holds ``entry`` (``NAME=value``)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return found


MAIN = (
    "import sys\nfrom disca_tools.cli.cluster import main\nraise SystemExit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("cluster_from", ["tf_config", "slurm", "tf_config_rotations"])
def test_multiworker_with_two_worker_processes(project, cluster_from):
    # "slurm": no TF_CONFIG; the cluster comes from an srun step's variables through TensorFlow's
    # SlurmClusterResolver, on a node without GPUs (as `srun --ntasks-per-node=2` on a CPU node).
    # "tf_config_rotations": features averaged over rotated copies, through each worker's local
    # compiled call of the copy-mean model
    name = f"Multi_{cluster_from}"
    extra = ("--predict-rotations", "3") if cluster_from.endswith("rotations") else ()
    codes, tmp, logs = _run_two_workers(name, MAIN, 300, slurm=cluster_from == "slurm", extra=extra)
    assert codes == [0, 0], f"exit codes {codes} (-9: killed after 300 s)\n{logs}"
    _check_agrees_with_plain(name, replicas=2, distribute="multiworker")
    rotations = json.loads(Path(name, "run_config.json").read_text())["predict_rotations"]
    assert rotations == (3 if extra else 1)
    loss = pd.read_csv(f"{name}/history.tsv", sep="\t")["loss"].to_numpy()
    assert np.isfinite(loss[0]) and loss[0] > 0  # iteration 0 was trained
    # only the chief writes --o; the other worker's temporary folder is gone once it exits
    assert not list(tmp.glob("disca_cluster_worker*"))


def test_a_failing_multiworker_run_exits_instead_of_hanging(project):
    # both workers fail inside distributed training (Keras' own fit, which fails with several
    # workers, instead of the custom step): they must end with an error, not wait for each other
    # until the job's time limit, and leave no temporary folder behind
    failing = (
        "import sys\n"
        "from disca_tools.cluster import training\n"
        "init = training.Trainer.__init__\n"
        "def keras_fit(self, *args, **kwargs):\n"
        "    init(self, *args, **kwargs)\n"
        "    self._multiworker = None\n"
        "training.Trainer.__init__ = keras_fit\n" + MAIN
    )
    codes, tmp, logs = _run_two_workers("Failing", failing, 300)
    assert codes == [1, 1], f"exit codes {codes} (-9: still running after 300 s)\n{logs}"
    assert logs.count("Traceback") == 2
    assert not list(tmp.glob("disca_cluster_worker*"))
    # the workers fitted the mixtures in worker processes before training failed: os._exit skips
    # atexit, so those are stopped by hand, not left running (they inherit this test's TMPDIR)
    deadline = time.monotonic() + 20
    while _processes_with_env(f"TMPDIR={tmp}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_with_env(f"TMPDIR={tmp}")


def test_three_shards_merged_equal_one_unsharded_run(project):
    base = ["--model", "Plain", "--precision", "float32", "-q"]
    assert C.main(["--i", "Sim/particles.star", "--o", "Whole", *base]) == 0
    for i in (1, 2, 3):
        assert (
            C.main(["--i", "Sim/particles.star", "--o", f"Shard{i}", "--shard", f"{i}/3", *base])
            == 0
        )
    meta = json.loads(Path("Shard2/shard.json").read_text())
    assert meta["shard"] == 2 and meta["n_shards"] == 3 and meta["n_rows"] == 90
    assert meta["rows"] == list(range(1, 90, 3))
    inp = read_particles("Sim/particles.star").particles
    s2 = read_particles("Shard2/clusters.star").particles
    assert list(s2.columns) == list(read_particles("Whole/clusters.star").particles.columns)
    assert (s2["rlnImageName"].to_numpy() == inp["rlnImageName"].to_numpy()[1::3]).all()
    assert np.load("Shard2/features.npy").shape == (30, 32)

    assert C.main(["--merge-shards", "Shard3", "Shard1", "Shard2", "--o", "Merged", "-q"]) == 0
    merged = read_particles("Merged/clusters.star").particles
    whole = read_particles("Whole/clusters.star").particles
    pd.testing.assert_frame_equal(merged.drop(columns="rlnMaxValueProbDistribution"),
                                  whole.drop(columns="rlnMaxValueProbDistribution"))  # fmt: skip
    np.testing.assert_allclose(merged["rlnMaxValueProbDistribution"],
                               whole["rlnMaxValueProbDistribution"], rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(_classes("Merged/clusters.star"), _classes("Whole/clusters.star"))
    np.testing.assert_allclose(
        np.load("Merged/features.npy"), np.load("Whole/features.npy"), rtol=1e-5, atol=1e-5
    )
    # the merged run repeats the training run's own assignment of these particles
    np.testing.assert_array_equal(_classes("Merged/clusters.star"), _classes("Plain/clusters.star"))


@pytest.mark.parametrize(
    "case", ["missing", "duplicate", "foreign_input", "foreign_model", "not_shard"]
)
def test_merge_refuses_bad_shard_sets(project, case, capsys):
    if not Path("Shard3/shard.json").is_file():
        test_three_shards_merged_equal_one_unsharded_run(project)
    dirs = ["Shard1", "Shard2", "Shard3"]
    if case == "missing":
        dirs = ["Shard1", "Shard3"]
    elif case == "duplicate":
        dirs = ["Shard1", "Shard2", "Shard3", "Shard2"]
    elif case == "foreign_input":
        blocks = read_star_blocks("Sim/particles.star")
        blocks["particles"] = blocks["particles"].iloc[::-1].reset_index(drop=True)
        write_star_blocks("Sim/reversed.star", blocks, overwrite=True)
        assert C.main(["--i", "Sim/reversed.star", "--o", "Foreign3", "--shard", "3/3",
                       "--model", "Plain", "--precision", "float32", "-q"]) == 0  # fmt: skip
        dirs = ["Shard1", "Shard2", "Foreign3"]
    elif case == "foreign_model":
        shutil.copytree("Shard3", "Other3", dirs_exist_ok=True)
        meta = json.loads(Path("Other3/shard.json").read_text())
        Path("Other3/shard.json").write_text(json.dumps(dict(meta, model_sha256="0" * 64)))
        dirs = ["Shard1", "Shard2", "Other3"]
    elif case == "not_shard":
        dirs = ["Shard1", "Shard2", "Whole"]
    capsys.readouterr()
    assert C.main(["--merge-shards", *dirs, "--o", f"Bad_{case}", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("disca_cluster: error:"), err
    expected = {"missing": "shard 2/3 missing", "duplicate": "also given as Shard2",
                "foreign_input": "different input STAR file", "foreign_model": "different model",
                "not_shard": "missing shard.json"}  # fmt: skip
    assert expected[case] in err[0], err[0]
    assert not Path(f"Bad_{case}").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--shard", "4/3", "--model", "Plain"],
        ["--shard", "two", "--model", "Plain"],
        ["--shard", "1/2"],
        ["--shard", "1/200", "--model", "Plain"],
    ],
)
def test_bad_shard_options_exit_2_and_write_nothing(project, args, capsys):
    capsys.readouterr()
    assert C.main(["--i", "Sim/particles.star", "--o", "BadShard", *args, "-q"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not Path("BadShard").exists()


def test_distribute_resolution_and_chief_from_environment(monkeypatch):
    for var in ("TF_CONFIG", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    assert D.resolve_distribute("auto") == "none"  # no GPU here
    assert D.resolve_distribute("mirrored") == "mirrored"
    cluster = {"worker": ["host1:2222", "host2:2222"]}
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})
    )
    assert D.resolve_distribute("auto") == "multiworker"
    assert D.worker_task("multiworker") == (1, False)
    opts = C.Options(i="in.star", o="Out")
    out = C._output_dir(opts)
    assert out != "Out" and "worker1" in out and C._output_dir(opts) == out  # idempotent
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}})
    )
    assert D.worker_task("multiworker") == (0, True)
    assert C._output_dir(C.Options(i="in.star", o="Out")) == "Out"
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert D.resolve_distribute("auto") == "multiworker"
    assert D.worker_task("multiworker") == (2, False)
    # assigning with --model never trains: every task writes its own --o
    assert C._output_dir(C.Options(i="in.star", o="Out", model="Run")) == "Out"
    assert D.worker_task("none") == (0, True)


def test_slurm_cluster_from_the_step_with_and_without_gpus(monkeypatch):
    # without GPUs TensorFlow's SlurmClusterResolver alone fails (nvidia-smi, then range() with step 0)
    from disca_tools.runtime.errors import UserError

    monkeypatch.delenv("TF_CONFIG", raising=False)
    for name, value in {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4",
                        "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
                        "DISCA_PORT_BASE": "9100", "CUDA_VISIBLE_DEVICES": ""}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    resolver = D.slurm_resolver()
    spec = resolver.cluster_spec().as_dict()
    assert spec == {"worker": ["node07:9100", "node07:9101", "node08:9100", "node08:9101"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 3)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # not set from the placeholder slots
    # a GPU node (4 GPUs granted to the step's 2 tasks on it): the resolver shares them out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    resolver = D.slurm_resolver()
    assert resolver.cluster_spec().as_dict() == spec
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # task 3 is the second on node08
    monkeypatch.setenv("DISCA_PORT_BASE", "88x")
    with pytest.raises(UserError, match="DISCA_PORT_BASE"):
        D.slurm_resolver()
    monkeypatch.setenv("DISCA_PORT_BASE", "9100")
    monkeypatch.delenv("SLURM_STEP_NODELIST")
    with pytest.raises(UserError, match="SLURM step not usable"):
        D.slurm_resolver()
