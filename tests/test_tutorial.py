"""examples/tutorial.ipynb runs top to bottom on small settings, and is stored without outputs."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "tutorial.ipynb"

if os.environ.get("CI"):  # the test extra installs the docs extra: missing, it must fail, not skip
    import nbclient
    import nbformat
else:
    nbformat = pytest.importorskip("nbformat", reason="the docs extra is not installed (pip install -e '.[docs]')")
    nbclient = pytest.importorskip("nbclient", reason="the docs extra is not installed")
    pytest.importorskip("ipykernel", reason="the docs extra is not installed")


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "clear the notebook's outputs"


def test_tutorial_executes(tmp_path, monkeypatch):
    # a kernel of this very interpreter (not whatever 'python3' kernel the machine has)
    spec = tmp_path / "jupyter" / "kernels" / "uapx-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "uapx test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("UAPX_TUTORIAL_N", "60")
    monkeypatch.setenv("UAPX_TUTORIAL_STEPS", "3")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="uapx-test", timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.outputs if out.get("output_type") == "stream")
    assert "PerturbationSet(n=60, shape=(1, 28, 28), norm='l2', eps=2" in text
    assert "UAPEvaluation('svd:v1'" in text and "random directions: fooling rate" in text
    assert "top singular values:" in text and "best global UAP:" in text and "of the held-out images" in text
    assert "AnalyzeResult(out=" in text
