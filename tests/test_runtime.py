"""The shared CLI plumbing: options, errors, provenance, atomic outputs, RELION External jobs."""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import starfile

from disca_tools.runtime.cli import (
    CommonOptions,
    ToolSpec,
    is_relion_external,
    opt,
    resolve_jobs,
    run_tool,
    translate_relion_args,
)
from disca_tools.runtime.errors import UserError
from disca_tools.runtime.log import progress
from disca_tools.runtime.outputs import atomic_path, check_not_input, prepare_output_dir
from disca_tools.runtime.provenance import CPU_FLAGS, cpu_info


@dataclass(kw_only=True)
class _Options(CommonOptions):
    i: str = opt("--i", "--input", help="input")
    o: str = opt("--o", "--output-dir", help="output folder")
    box: int = opt("--box", "--box-size", default=24, help="box")
    invert: bool | None = opt("--invert", default=None, negatable=True, help="invert")
    seed: int = opt("--seed", default=7, help="seed")


def _run(o: _Options) -> dict:
    src = Path(o.i)
    if not src.exists():
        raise UserError(f"{src}: file not found")
    out = prepare_output_dir(o.o, o.overwrite, ["result.txt"])
    with atomic_path(out / "result.txt") as tmp:
        tmp.write_text(f"{o.box} {o.invert}\n")
    for _ in progress(range(3), desc="work"):
        pass
    return {"box": o.box}


SPEC = ToolSpec(
    name="disca_dummy",
    doc="disca_dummy: a test tool.",
    options=_Options,
    run=_run,
    output_dir=lambda o: o.o,
    relion_inputs={"in_parts": "i"},
    relion_nodes=lambda o: [(f"{o.o}result.txt", "particles")],
)


def test_aliases_provenance_and_refusal(tmp_path, capsys):
    src = tmp_path / "in.star"
    src.write_text("data_\n")
    out = tmp_path / "out"
    assert (
        run_tool(
            SPEC, ["--input", str(src), "--output-dir", str(out), "--box-size", "32", "--no-invert"]
        )
        == 0
    )
    assert (out / "result.txt").read_text() == "32 False\n"
    record = json.loads((out / "run.json").read_text())
    assert record["options"]["box"] == 32 and record["seed"] == 7 and record["status"] == "success"
    assert record["results"]["box"] == 32
    assert record["libraries"]["numpy"] == importlib.metadata.version("numpy")
    assert record["libraries"]["keras"] == importlib.metadata.version("keras")
    assert record["cpus"] == os.cpu_count() and record["python"].count(".") == 2  # the machine
    assert record["cpu"] == cpu_info()["model"] and set(record["cpu_flags"]) <= set(CPU_FLAGS)
    assert "--box-size 32" in (out / "note.txt").read_text()
    # a second run refuses to overwrite, with one line naming the file, exit 2
    capsys.readouterr()
    assert run_tool(SPEC, ["--i", str(src), "--o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "result.txt" in err[0] and "--overwrite" in err[0]
    assert (out / "result.txt").read_text() == "32 False\n"
    assert run_tool(SPEC, ["--i", str(src), "--o", str(out), "--overwrite", "--invert"]) == 0
    assert (out / "result.txt").read_text() == "24 True\n"
    assert (out / "note.txt").read_text().count(
        "Executing new job"
    ) == 3 - 1  # refused run wrote nothing


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    assert run_tool(SPEC, ["--i", str(tmp_path / "missing.star"), "--o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"disca_dummy: error: {tmp_path / 'missing.star'}: file not found"]
    assert not (tmp_path / "o" / "result.txt").exists()


def test_bad_option_value_exit_2(tmp_path, capsys):
    assert run_tool(SPEC, ["--i", "x", "--o", str(tmp_path), "--box", "big"]) == 2
    assert "invalid int value" in capsys.readouterr().err


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_outputs_never_overwrite_inputs(tmp_path):
    f = tmp_path / "x.star"
    f.write_text("")
    with pytest.raises(UserError, match="overwrite an input"):
        check_not_input([tmp_path / "." / "x.star"], [f])


def test_relion_external_translation_and_markers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("in.star").write_text("data_\n")
    argv = ["--o", "External/job003/", "--in_parts", "in.star", "--box", "16", "--j", "2"]
    assert is_relion_external(argv)
    assert translate_relion_args(argv, SPEC.relion_inputs, _Options)[:4] == [
        "--o",
        "External/job003/",
        "--i",
        "in.star",
    ]
    assert run_tool(SPEC, argv) == 0
    job = Path("External/job003")
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    nodes = starfile.read(job / "RELION_OUTPUT_NODES.star", always_dict=True)["output_nodes"]
    assert nodes["rlnPipeLineNodeName"].tolist() == ["External/job003/result.txt"]
    assert nodes["rlnPipeLineNodeType"].tolist() == [3]
    assert nodes["rlnPipeLineNodeTypeLabel"].tolist() == ["ParticleGroupMetadata.star.relion"]
    # failure: success marker removed, failure marker written
    assert run_tool(SPEC, ["--o", "External/job003/", "--in_parts", "nope.star"]) == 2
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and not (
        job / "RELION_JOB_EXIT_SUCCESS"
    ).exists()


def test_relion_external_abort(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("in.star").write_text("data_\n")
    job = Path("External/job004")
    job.mkdir(parents=True)
    (job / "RELION_JOB_ABORT_NOW").touch()
    assert run_tool(SPEC, ["--o", "External/job004/", "--in_parts", "in.star"]) == 1
    assert (job / "RELION_JOB_EXIT_ABORTED").exists()
    assert not (job / "RELION_JOB_ABORT_NOW").exists()
    assert not (job / "RELION_JOB_EXIT_SUCCESS").exists()


def test_unknown_relion_input_is_user_error():
    with pytest.raises(UserError, match="--in_mics"):
        translate_relion_args(["--in_mics", "x.star"], SPEC.relion_inputs, _Options)


def test_resolve_jobs(monkeypatch):
    assert resolve_jobs(3) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert resolve_jobs(0) == 3  # the cores this process may use, not the machine's
    with pytest.raises(UserError, match="--j"):
        resolve_jobs(-1)


def test_cpu_info_reads_the_model_and_the_flags_that_change_the_numbers(tmp_path):
    """The model name and which of CPU_FLAGS the CPU has (first processor's lines; others ignored);
    an unreadable file gives platform.processor() and no flags."""
    fake = tmp_path / "cpuinfo"
    fake.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu amx_bf16\n"
    )
    assert cpu_info(fake) == {"model": "AMD EPYC 9R14", "flags": ["avx2", "avx512f", "avx512_bf16"]}
    fake.write_text("model name : Intel Xeon\nflags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_info(fake)["flags"] == list(CPU_FLAGS)
    missing = cpu_info(tmp_path / "absent")
    assert missing["flags"] == [] and isinstance(missing["model"], str) and missing["model"]
