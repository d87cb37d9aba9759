"""The SLURM example scripts (examples/slurm_*.sh), run end to end under a stand-in ``sbatch``.

The stand-in runs each submitted job at once, in order, as SLURM would run it: array tasks with
SLURM_ARRAY_TASK_ID, ``--wrap`` commands through ``sh -c``, output to the ``--output`` file (a job
whose output folder does not exist fails without running, as under SLURM), and a job whose
``afterok`` dependency failed is cancelled (``--kill-on-invalid-dep``). The scripts were also run
on a real SLURM (README, "Containers and clusters"); this keeps them working in CI, which has none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import relion_exe, working_directory

from disca_tools.cli import cluster as C
from disca_tools.cli import split_star as S
from disca_tools.io.mrc import read_volume, write_volume
from disca_tools.io.star import read_particles
from disca_tools.simulate.imaging import Imaging
from disca_tools.simulate.tomogram import simulate_tomogram

REPO = Path(__file__).resolve().parents[1]

FAKE_SBATCH = r'''#!PYTHON
"""A stand-in for sbatch: runs the job now; state in $FAKE_SLURM_STATE (JSON)."""
import json, os, re, subprocess, sys

state_path = os.environ["FAKE_SLURM_STATE"]
state = json.load(open(state_path)) if os.path.exists(state_path) else {"next": 1, "jobs": []}
args, opts, i = sys.argv[1:], {}, 0
while i < len(args) and args[i].startswith("--"):
    key, _, value = args[i][2:].partition("=")
    opts[key] = value if _ else True
    i += 1
script = args[i:]
if script:  # the script's own #SBATCH lines, below the command line's options
    for line in open(script[0]):
        if line.startswith("#SBATCH --"):
            key, _, value = line.split()[1][2:].partition("=")
            opts.setdefault(key, value if _ else True)
job = state["next"]
state["next"] += 1
failed = False
dep = opts.get("dependency")
if dep:
    ids = [int(x) for x in dep.split(":", 1)[1].split(":")]
    failed = any(j["id"] in ids and j["failed"] for j in state["jobs"])
tasks = [None]
if "array" in opts:
    lo, hi = map(int, opts["array"].split("-"))
    tasks = list(range(lo, hi + 1))
if not failed:
    for t in tasks:
        out = opts.get("output", f"slurm-{job}.out")
        name = opts.get("job-name", "job")
        out = out.replace("%A", str(job)).replace("%a", str(t)).replace("%j", str(job))
        out = out.replace("%x", name)
        if os.path.dirname(out) and not os.path.isdir(os.path.dirname(out)):
            failed = True  # SLURM: "Could not open stdout file", the job ends without a log
            continue
        env = dict(os.environ, SLURM_JOB_ID=str(job))
        env["SLURM_CPUS_PER_TASK"] = str(opts.get("cpus-per-task", 1))
        if t is not None:
            env["SLURM_ARRAY_TASK_ID"] = str(t)
        cmd = ["sh", "-c", opts["wrap"]] if "wrap" in opts else ["bash", *script]
        with open(out, "w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        failed = failed or rc != 0
state["jobs"].append({"id": job, "failed": failed, "opts": opts, "script": script})
json.dump(state, open(state_path, "w"))
print(job if "parsable" in opts else f"Submitted batch job {job}")
'''


@pytest.fixture
def slurm_env(tmp_path: Path) -> dict:
    """The environment of a login node whose ``sbatch`` is the stand-in."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    exe = bin_dir / "sbatch"
    exe.write_text(FAKE_SBATCH.replace("PYTHON", sys.executable, 1))
    exe.chmod(0o755)
    relion_dir = str(Path(relion_exe("relion_star_handler")).parent)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), relion_dir])
    return dict(
        os.environ,
        PATH=f"{path}{os.pathsep}{os.environ['PATH']}",
        FAKE_SLURM_STATE=str(tmp_path / "slurm_state.json"),
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(REPO),
    )


def _jobs(env: dict) -> list[dict]:
    p = Path(env["FAKE_SLURM_STATE"])
    return json.loads(p.read_text())["jobs"] if p.is_file() else []


def _bash(script: str, *args: str, env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "examples" / script), *args], env=dict(env, **extra),
                          capture_output=True, text=True)  # fmt: skip


@pytest.fixture
def tomogram_project(tmp_path: Path) -> Path:
    """Two small simulated tomograms in Tomograms/ (one per folder, as a project keeps them)."""
    root = tmp_path / "project"
    for i in (1, 2):
        sim = simulate_tomogram(["4v4r", "3j9i"], (160, 160, 64), 8, 14.0, 2.0, Imaging(), seed=i)
        folder = root / "Tomograms" / f"TS_0{i}"
        folder.mkdir(parents=True)
        write_volume(folder / f"TS_0{i}.mrc", sim.volume_zyx, 14.0)
    (root / "tomograms.txt").write_text("Tomograms/TS_01/TS_01.mrc\n\nTomograms/TS_02/TS_02.mrc\n")
    return root


def test_pick_extract_array_and_relion_merge(tomogram_project, slurm_env):
    with working_directory(tomogram_project):
        res = _bash("slurm_pick_extract.sh", "tomograms.txt", env=slurm_env, DIAMETER="250",
                    EXTRACT_ARGS="--tilt-range 60")  # fmt: skip
        assert res.returncode == 0, res.stderr
        jobs = _jobs(slurm_env)
        assert [j["opts"].get("array") for j in jobs] == ["1-2", None]  # blank line ignored
        assert not any(j["failed"] for j in jobs), list(Path("logs").glob("*.out"))
        assert jobs[1]["opts"]["dependency"] == f"afterok:{jobs[0]['id']}"
        per_tomogram = [read_particles(f"Extract/TS_0{i}/particles.star") for i in (1, 2)]
        merged = read_particles("Extract/particles.star")  # written by relion_star_handler
        assert len(merged) == sum(len(t) for t in per_tomogram) > 0
        names = [n for t in per_tomogram for n in t.particles["rlnImageName"]]
        assert sorted(merged.particles["rlnImageName"]) == sorted(names)
        assert all(Path(n).is_file() for n in names)
        assert set(merged.particles["rlnMicrographName"]) == {
            "Tomograms/TS_01/TS_01.mrc",
            "Tomograms/TS_02/TS_02.mrc",
        }
        assert Path("tomograms.txt").read_text().count("\n") == 3  # the list is left as it was
        # disca_cluster and disca_split_star read the merged STAR from the per-tomogram stores
        tiny = ["--k-candidates", "2-3", "--pca-dim", "2", "--width-scale", "0.1",
                "--feature-dim", "16", "--max-iter", "1", "-q"]  # fmt: skip
        assert C.main(["--i", "Extract/particles.star", "--o", "Cluster", *tiny]) == 0
        assert not Path("Cluster/subtomograms.npy").exists()  # no second copy of the data
        clusters = read_particles("Cluster/clusters.star").particles
        assert list(clusters["rlnImageName"]) == list(merged.particles["rlnImageName"])
        assert S.main(["--i", "Cluster/clusters.star", "--o", "Split", "-q"]) == 0
        for cls, members in clusters.groupby("rlnClassNumber"):
            mean = np.mean([read_volume(n)[0] for n in members["rlnImageName"]], axis=0)
            average, _ = read_volume(f"Split/class_{cls:03d}_average.mrc")
            assert np.allclose(average, mean, atol=1e-5)
        # a second submission would overwrite the first: refused before anything is submitted
        again = _bash("slurm_pick_extract.sh", "tomograms.txt", env=slurm_env)
        assert again.returncode == 2 and len(_jobs(slurm_env)) == 2
        assert (
            again.stderr.strip() == "slurm_pick_extract.sh: Picks/TS_01 exists: move it away first"
        )


@pytest.mark.parametrize(
    "lines, message",
    [
        ("Tomograms/TS_01/TS_01.mrc\nTomograms/none.mrc\n", "Tomograms/none.mrc does not exist"),
        ("\n\n", "lists no tomogram"),
        ("Tomograms/TS_01/TS_01.mrc\nTomograms/TS_01.mrc\n", "two tomograms are named TS_01"),
    ],
)
def test_pick_extract_refuses_bad_lists_before_submitting(
    tomogram_project, slurm_env, lines, message
):
    with working_directory(tomogram_project):
        Path("Tomograms/TS_01.mrc").symlink_to("TS_01/TS_01.mrc")
        Path("bad.txt").write_text(lines)
        res = _bash("slurm_pick_extract.sh", "bad.txt", env=slurm_env)
        assert res.returncode == 2
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"slurm_pick_extract.sh: bad.txt: {message}")
        assert _jobs(slurm_env) == [] and not Path("logs").exists()


def test_a_failed_task_cancels_the_merge(tomogram_project, slurm_env):
    with working_directory(tomogram_project):
        Path("Tomograms/TS_02/TS_02.mrc").write_bytes(b"not an MRC file")
        res = _bash("slurm_pick_extract.sh", "tomograms.txt", env=slurm_env)
        assert res.returncode == 0, res.stderr  # submitted; task 2 fails on the cluster
        array, merge = _jobs(slurm_env)
        assert array["failed"] and merge["failed"] and not Path("Extract/particles.star").exists()
        err = Path(f"logs/pick_extract_{array['id']}_2.out").read_text().strip().splitlines()
        assert len(err) == 1 and err[0].startswith("disca_pick: error: Tomograms/TS_02/TS_02.mrc")
        assert not Path(f"logs/merge_{merge['id']}.out").exists()


def test_cluster_predict_shards_and_merge_equal_the_trained_run(
    simulated_subtomogram_project, slurm_env, tmp_path
):
    project = shutil.copytree(simulated_subtomogram_project, tmp_path / "project")
    # the default --precision on both sides: the shards compute features as the run did
    with working_directory(project):
        tiny = ["--k-candidates", "2-4", "--pca-dim", "4", "--width-scale", "0.1",
                "--feature-dim", "32", "--max-iter", "1", "-q"]  # fmt: skip
        assert C.main(["--i", "Sim/particles.star", "--o", "Run", *tiny]) == 0
        res = _bash("slurm_cluster.sh", "predict", "Sim/particles.star", "Assign", "Run", "3",
                    env=slurm_env, DISCA_SIF="", DISCA_GPUS="0", DISCA_CPUS="1",
                    DISCA_PARTITION="cpu")  # fmt: skip
        assert res.returncode == 0, res.stderr
        jobs = _jobs(slurm_env)
        assert not any(j["failed"] for j in jobs)
        array, merge = jobs
        assert array["opts"]["array"] == "1-3" and "gres" not in array["opts"]
        assert merge["opts"]["dependency"] == f"afterok:{array['id']}"
        assert array["opts"]["wrap"].startswith("disca_cluster ")  # no container
        run = read_particles("Run/clusters.star").particles
        merged = read_particles("Assign/merged/clusters.star").particles
        assert list(merged["rlnImageName"]) == list(run["rlnImageName"])
        assert (merged["rlnClassNumber"].to_numpy() == run["rlnClassNumber"].to_numpy()).all()
        assert np.allclose(np.load("Assign/merged/features.npy"), np.load("Run/features.npy"))


def test_cluster_script_refuses_bad_settings(tmp_path, slurm_env):
    with working_directory(tmp_path):
        res = _bash("slurm_cluster.sh", "predict", "p.star", "Out", "Run", "2", env=slurm_env,
                    DISCA_GPUS="two")  # fmt: skip
        assert res.returncode == 2
        assert (
            res.stderr.strip() == "slurm_cluster.sh: DISCA_GPUS must be a whole number, got 'two'"
        )
        assert _jobs(slurm_env) == []
