"""Notebooks run top to bottom (their code cells, in order, as one script)."""
import json
import os
import subprocess
import sys

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "notebooks")


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs(name, tmp_path):
  with open(os.path.join(NOTEBOOKS, name)) as f:
    cells = json.load(f)["cells"]
  script = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
  path = tmp_path / "notebook.py"
  path.write_text(script)
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.run([sys.executable, str(path)], cwd=NOTEBOOKS, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "predicted:" in proc.stdout
