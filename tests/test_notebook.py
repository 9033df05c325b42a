"""examples/quickstart.ipynb runs top to bottom (nbclient), on a short input."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (dev extra)")
nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (dev extra)")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_executes(monkeypatch, tmp_path):
    monkeypatch.setenv("FIDELITY_QUICKSTART_LENGTH", "1500")
    monkeypatch.setenv("FIDELITY_QUICKSTART_ANCHORS", "96")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "res.plot(), res.plot('depth') and cmp.plot() must render"
