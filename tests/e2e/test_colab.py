"""examples/colab.ipynb runs: its code cells, in order, on CPU, with a smoke-sized model.

Shell (`!pip ...`) and magic (`%...`) lines are Colab's install steps and are skipped: the
test runs against this checkout. After the cell tagged `parameters` the test sets fewer steps,
the smoke config and temporary directories, as papermill would.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import types

import pytest

from tests.helpers.runs import ROOT as ROOT_DIR

ROOT = pathlib.Path(ROOT_DIR)
NOTEBOOK = ROOT / "examples" / "colab.ipynb"


def _code_cells() -> list[tuple[list[str], str]]:
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            lines = [ln for ln in "".join(cell["source"]).splitlines()
                     if not ln.lstrip().startswith(("!", "%"))]
            cells.append((cell["metadata"].get("tags", []), "\n".join(lines)))
    return cells


def _stub_matplotlib(monkeypatch) -> None:
    """The plot cell needs only names that exist; Colab has matplotlib, CI may not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        return
    except ImportError:
        pass
    pyplot = types.ModuleType("matplotlib.pyplot")
    for name in ("figure", "plot", "scatter", "xlabel", "ylabel", "legend", "show"):
        setattr(pyplot, name, lambda *args, **kwargs: None)
    package = types.ModuleType("matplotlib")
    package.pyplot = pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", package)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)


def test_notebook_is_well_formed():
    nb = json.loads(NOTEBOOK.read_text())
    sources = ["".join(c["source"]) for c in nb["cells"]]
    assert any("pip install" in s for s in sources)  # installs from the repository
    for step in ("run(config, WORKDIR)", "plt.plot", "jaxllm.generate(", "export_checkpoint"):
        assert any(step in s for s in sources), step
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    assert sum("parameters" in tags for tags, _ in _code_cells()) == 1


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    _stub_matplotlib(monkeypatch)
    monkeypatch.chdir(tmp_path)
    overrides = dict(STEPS=4, CONFIG=str(ROOT / "jaxllm" / "configs" / "tiny.py") + ":smoke",
                     WORKDIR=str(tmp_path / "run"), HF_DIR=str(tmp_path / "hf"),
                     # conftest gives 8 CPU devices: the batch must split over them.
                     OVERRIDES=["stages.pretrain.batch_size=8"])
    namespace: dict = {"__name__": "__main__"}
    for index, (tags, source) in enumerate(_code_cells()):
        try:
            exec(compile(source, f"{NOTEBOOK.name}[code cell {index}]", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"code cell {index} raised {type(e).__name__}: {e}\n{source}")
        if "parameters" in tags:
            namespace.update(overrides)
    assert [r["step"] for r in namespace["train"]][-1] == 4
    assert os.path.exists(tmp_path / "hf" / "config.json")
    assert isinstance(namespace["jaxllm_text"], str) and namespace["jaxllm_text"]
