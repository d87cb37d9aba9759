"""The one writer that every benchmark and probe saves its results through."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def result_files():
    spec = importlib.util.spec_from_file_location("result_files", BENCHMARKS / "result_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_save_result_records_machine_and_libraries(result_files, tmp_path):
    path = result_files.save_result("bench_x", "tag1", {"rows": [1, 2]}, "| a |\n", folder=tmp_path)
    assert path == tmp_path / "bench_x_tag1.json"
    record = json.loads(path.read_text())
    assert record["rows"] == [1, 2]
    assert record["machine"]["cpus"] >= 1
    assert record["machine"]["python"].count(".") == 2
    assert record["libraries"]["numpy"] == np.__version__
    assert (tmp_path / "bench_x_tag1.md").read_text() == "| a |\n"
    # written through a temporary file and a rename: nothing else is left in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_x_tag1.json", "bench_x_tag1.md"]


def test_a_save_interrupted_while_writing_keeps_the_previous_result(
    result_files, tmp_path, monkeypatch
):
    first = result_files.save_result("bench_x", "", {"value": 1}, folder=tmp_path)
    real_write_text = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        result_files.save_result("bench_x", "", {"value": 2}, folder=tmp_path)
    monkeypatch.undo()
    assert json.loads(first.read_text())["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["bench_x.json"]


def test_json_default_converts_what_json_cannot(result_files, tmp_path):
    path = result_files.save_result(
        "bench_x", "", {"snr": np.float32(0.5)}, folder=tmp_path, json_default=float
    )
    assert json.loads(path.read_text())["snr"] == 0.5


def test_save_figure_writes_the_format_of_its_suffix(result_files, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = result_files.save_figure(fig, tmp_path / "plot.png")
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
