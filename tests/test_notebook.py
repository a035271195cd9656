"""training_colab.ipynb runs top to bottom (tiny settings) and produces its plots and models."""

import json

import nbformat
from nbclient import NotebookClient
from PIL import Image

import modelmeta
from conftest import ROOT


def test_notebook_runs_end_to_end_on_tiny_settings(tmp_path):
    notebook = nbformat.read(ROOT / "training_colab.ipynb", as_version=4)
    parameters = next(cell for cell in notebook.cells if cell.cell_type == "code" and "DATA_SOURCE =" in cell.source)
    parameters.source = "\n".join([
        'REPO_URL = ""', "INSTALL = False", 'DATA_SOURCE = "synthetic"', "SYNTH_COUNT = 40", "EPOCHS = 2",
        'PRESET = "tiny"', "BATCH_SIZE = 8", f'DATA_DIR = "{tmp_path / "data"}"', f'OUT = "{tmp_path / "out"}"',
        'UNLABELED_DIR = ""',
    ])
    NotebookClient(notebook, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on any cell error

    out = tmp_path / "out"
    for name in ["training_curves.png", "predictions.png", "confusions.png"]:
        with Image.open(out / name) as picture:
            assert picture.format == "PNG"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["epochs_run"] == 2
    assert (out / "crnn_ctc_best_safe.keras").exists()

    def printed(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")

    data = next(cell for cell in notebook.cells if cell.cell_type == "code" and "scan.channels()" in cell.source)
    assert "channels: colour (3), decided from the images" in printed(data)  # the captcha package draws in colour
    assert modelmeta.read_meta(out / "crnn_ctc_best.keras")["preprocess"]["channels"] == 3  # as train.py decided
    evaluation = next(cell for cell in notebook.cells if cell.cell_type == "code" and "metrics.json" in cell.source)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in saved["test"].items()}
    assert f"test split: {shown}" in printed(evaluation)  # the notebook shows this run's own scores
    assert f"marked low): {saved['abstain']}" in printed(evaluation)
    last = notebook.cells[-1]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in last.outputs)
    readings = [line for line in printed(last).splitlines() if " with confidence " in line]
    assert len(readings) == 8 and all(0.0 <= float(line.rsplit(" ", 1)[1]) <= 1.0 for line in readings)
