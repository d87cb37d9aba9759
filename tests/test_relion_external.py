"""RELION External job mode, proven with RELION 3.1's own pipeliner (headless).

``relion_pipeliner --addJobFromStar`` schedules an External job running ``bin/disca_split_star`` and
``--RunJobs`` runs it exactly as the GUI would (``--o External/job001/ --in_parts X --<label> <value>
--j N``); RELION then reads our RELION_OUTPUT_NODES.star into default_pipeline.star. Failure, an
argument RELION passes that the tool does not know, and RELION_JOB_ABORT_NOW are checked too.
RELION missing is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import starfile
from helpers import relion_exe  # noqa: E402

from disca_tools.cli.reembed import main as reembed_main
from disca_tools.cli.split_star import main as split_main
from disca_tools.io.star import read_star_blocks, write_star_blocks

pytestmark = pytest.mark.relion

REPO = Path(__file__).resolve().parent.parent
PIPELINE = "\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       1\n\n"
# RELION 3.1 status codes in default_pipeline.star
SUCCEEDED, FAILED = 2, 3


def _pipeliner() -> str:
    return relion_exe("relion_pipeliner")


def _job_star(path: Path, exe: Path, in_part: str, params: dict[str, str]) -> None:
    rows = [("fn_exe", str(exe)), ("in_part", in_part), ("nr_threads", "2")]
    for k, (label, value) in enumerate(params.items(), start=1):
        rows += [(f"param{k}_label", label), (f"param{k}_value", value)]
    body = "\n".join(f"{a} {b}" for a, b in rows)
    path.write_text(
        "\n# version 30001\n\ndata_job\n\n_rlnJobType 99\n_rlnJobIsContinue 0\n\n"
        "# version 30001\n\ndata_joboptions_values\n\nloop_\n_rlnJobOptionVariable #1\n"
        f"_rlnJobOptionValue #2\n{body}\n\n"
    )


def _run_pipeliner(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # our python for bin/ wrappers
    )
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return subprocess.run(
        [_pipeliner(), *args], capture_output=True, text=True, timeout=120, env=env
    )


def _pipeline() -> dict:
    return starfile.read("default_pipeline.star", always_dict=True)


@pytest.fixture
def relion_project(simulated_subtomogram_project: Path, tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(simulated_subtomogram_project, root)
    monkeypatch.chdir(root)
    blocks = read_star_blocks("Sim/particles.star")
    blocks["particles"]["rlnMaxValueProbDistribution"] = 0.8
    write_star_blocks("Sim/clusters.star", blocks)
    Path("default_pipeline.star").write_text(PIPELINE)
    return root


def test_relion_pipeliner_runs_split_star_as_external_job(relion_project: Path) -> None:
    _job_star(
        Path("job.star"), REPO / "bin" / "disca_split_star", "Sim/clusters.star", {"min-size": "2"}
    )
    res = _run_pipeliner("--addJobFromStar", "job.star")
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run_pipeliner("--RunJobs", "External/job001/", "--sec_wait_after", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    job = Path("External/job001")
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists(), (job / "run.err").read_text()[-2000:]
    assert (job / "class_003.star").exists() and (job / "class_003_average.mrc").exists()
    pipe = _pipeline()
    procs = pipe["pipeline_processes"]
    assert (
        procs.loc[
            procs["rlnPipeLineProcessName"] == "External/job001/", "rlnPipeLineProcessStatus"
        ].item()
        == SUCCEEDED
    )
    nodes = dict(
        zip(
            pipe["pipeline_nodes"]["rlnPipeLineNodeName"],
            pipe["pipeline_nodes"]["rlnPipeLineNodeType"],
            strict=True,
        )
    )
    for c in (1, 2, 3):  # RELION read our output nodes: particles (3) and 3D references (6)
        assert nodes[f"External/job001/class_{c:03d}.star"] == 3
        assert nodes[f"External/job001/class_{c:03d}_average.mrc"] == 6
    edges = pipe["pipeline_output_edges"]
    assert "External/job001/class_001.star" in set(edges["rlnPipeLineEdgeToNode"])
    # the GUI's extra parameter arrived as --min-size 2 and RELION's --j as --j
    run = (job / "run.json").read_text()
    assert '"min_size": 2' in run and '"j": 2' in run
    note = (job / "note.txt").read_text()  # RELION's note and ours, appended
    assert note.count("Executing new job") == 2


def test_relion_pipeliner_sees_failure(relion_project: Path) -> None:
    # an existing input (RELION's scheduler waits for missing inputs to appear) without class numbers
    blocks = read_star_blocks("Sim/particles.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnClassNumber"])
    write_star_blocks("Sim/noclass.star", blocks)
    _job_star(Path("job.star"), REPO / "bin" / "disca_split_star", "Sim/noclass.star", {})
    assert _run_pipeliner("--addJobFromStar", "job.star").returncode == 0
    res = _run_pipeliner("--RunJobs", "External/job001/", "--sec_wait_after", "0")  # must not hang
    assert res.returncode == 0, res.stderr[-2000:]
    job = Path("External/job001")
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and not (
        job / "RELION_JOB_EXIT_SUCCESS"
    ).exists()
    err = (job / "run.err").read_text()
    assert "Sim/noclass.star" in err and "rlnClassNumber" in err
    procs = _pipeline()["pipeline_processes"]
    assert procs["rlnPipeLineProcessStatus"].item() == FAILED


def test_unknown_parameter_still_ends_with_failure_marker(relion_project: Path, capsys) -> None:
    out = "External/job002/"
    assert (
        split_main(
            ["--o", out, "--in_parts", "Sim/clusters.star", "--no-such-option", "1", "--j", "1"]
        )
        == 2
    )
    assert Path(out, "RELION_JOB_EXIT_FAILURE").exists()  # else RELION's pipeliner waits forever
    assert "--no-such-option" in capsys.readouterr().err


def test_abort_now_stops_cleanly(relion_project: Path) -> None:
    job = Path("External/job003")
    job.mkdir(parents=True)
    (job / "RELION_JOB_ABORT_NOW").touch()
    assert (
        split_main(["--o", "External/job003/", "--in_parts", "Sim/clusters.star", "--j", "1"]) != 0
    )
    assert (job / "RELION_JOB_EXIT_ABORTED").exists()
    assert (
        not (job / "RELION_JOB_EXIT_SUCCESS").exists()
        and not (job / "RELION_JOB_ABORT_NOW").exists()
    )
    assert not any(job.glob("class_*"))  # stopped before writing any product


def test_output_nodes_file_format_for_reembed(relion_project: Path) -> None:
    assert (
        split_main(["--o", "External/job004/", "--in_parts", "Sim/clusters.star", "--j", "1"]) == 0
    )
    args = ["--o", "External/job005/", "--in_parts", "External/job004/class_001.star"]
    args += [
        "--in_3dref",
        "External/job004/class_001_average.mrc",
        "--tomo-shape",
        "400,100,40",
        "--angpix",
        "14",
    ]
    assert reembed_main([*args, "--spheres", "-q"]) == 0
    job = Path("External/job005")
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    nodes = starfile.read(job / "RELION_OUTPUT_NODES.star", always_dict=True)["output_nodes"]
    assert isinstance(nodes, pd.DataFrame)
    assert list(nodes.columns) == [
        "rlnPipeLineNodeName",
        "rlnPipeLineNodeType",
        "rlnPipeLineNodeTypeLabel",
    ]
    assert set(nodes["rlnPipeLineNodeName"]) == {
        "External/job005/simulated_reembedded.mrc",
        "External/job005/simulated_labels.mrc",
    }
    assert set(nodes["rlnPipeLineNodeType"]) == {6} and set(nodes["rlnPipeLineNodeTypeLabel"]) == {
        "DensityMap.mrc"
    }
    split_nodes = starfile.read("External/job004/RELION_OUTPUT_NODES.star", always_dict=True)[
        "output_nodes"
    ]
    assert all(Path(n).exists() and "//" not in n for n in split_nodes["rlnPipeLineNodeName"])


def test_abort_during_reembed_leaves_no_partial_volume(relion_project: Path) -> None:
    assert (
        split_main(
            ["--o", "Split/", "--classes", "1", "-q", "--no-averages"]
            + ["--i", "Sim/clusters.star"]
        )
        == 0
    )
    job = Path("External/job006")
    job.mkdir(parents=True)
    (job / "RELION_JOB_ABORT_NOW").touch()
    args = ["--o", "External/job006/", "--in_parts", "Split/class_001.star", "--in_3dref"]
    args += ["Sim/references/1bxn.mrc", "--tomo-shape", "400,100,40", "--angpix", "14", "--j", "1"]
    assert reembed_main(args) != 0
    assert (job / "RELION_JOB_EXIT_ABORTED").exists() and not (
        job / "RELION_JOB_EXIT_SUCCESS"
    ).exists()
    assert not [p.name for p in job.iterdir() if p.suffix == ".mrc" or ".tmp" in p.name]
