"""The notebooks run top to bottom on the synthetic default, and are committed
without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["evaluation.ipynb", "error_analysis.ipynb"]


def _execute(name: str) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return nb


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{name} has outputs: strip them (e.g. nbstripout) before committing"
            )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_the_synthetic_default(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RECSYS_DATA", "synthetic")
    monkeypatch.setenv("RECSYS_LOG", "WARNING")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = _execute(name)  # raises CellExecutionError when a cell fails
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    if name == "evaluation.ipynb":
        assert len(images) >= 5
    else:
        assert images
