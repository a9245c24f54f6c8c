"""The quickstart notebook runs from top to bottom (random-weight pipeline)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_notebook_executes():
  path = os.path.join(REPO, "notebooks", "quickstart.ipynb")
  notebook = nbformat.read(path, as_version=4)
  for key in ("OFFICIAL_TOKENIZER", "OFFICIAL_TRANSFORMER",
              "TOKENIZER_WORKDIR", "TRANSFORMER_WORKDIR"):
    os.environ.pop(key, None)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3
  text = "".join(o.get("text", "") for o in outputs)
  assert "tokens still masked after each iteration: [" in text
