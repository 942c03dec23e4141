"""notebooks/walkthrough.ipynb, run top to bottom as a reader runs it."""

import json
import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = (Path(__file__).resolve().parents[1] / 'notebooks' /
            'walkthrough.ipynb')


def test_walkthrough_runs_top_to_bottom_and_shows_its_figures(
    tmp_path, monkeypatch):
  """The kernel inherits the environment: the work folder, fer_jax on its
  path, and the tests' XLA flags and compilation cache (conftest.py).
  Most of it is compiling ResNet18 and EfficientNet-B0, the suite's only
  EfficientNet training run."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert not any(cell.outputs or cell.execution_count for cell in code), (
      'store the notebook without outputs')
  monkeypatch.setenv('FER_JAX_NOTEBOOK_DIR', str(tmp_path))
  # fer_jax as `pip install -e .` gives it to a reader's kernel.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      filter(None, [str(NOTEBOOK.parents[1]), os.environ.get('PYTHONPATH')])))
  NotebookClient(notebook, timeout=600, kernel_name='python3', resources={
      'metadata': {'path': str(NOTEBOOK.parent)}}).execute()  # or raises
  shown = [output for cell in code for output in cell.outputs
           if 'image/png' in output.get('data', {})]
  # Samples, curves, confusion matrix, VA scatter, the annotated photo.
  assert len(shown) == 5
  # EfficientNet-B0 end to end (the suite's only EfficientNet training
  # run): its dropout trains, every test image is reported once, and the
  # record names its 4,007,548 backbone parameters.
  effnet = tmp_path / 'efficientnet_b0'
  saved = json.loads((effnet / 'config.json').read_text())['model']
  assert (saved['name'], saved['dropout_rate']) == ('efficientnet_b0', 0.2)
  report = json.loads((effnet / 'report' / 'test_metrics.json').read_text())
  assert sum(c['support'] for c in report['per_class'].values()) == 32
  assert report['epochs_trained'] == 1 and 0 <= report['accuracy'] <= 1
  summary = (effnet / 'model_summary.txt').read_text()
  assert re.search(r'total params backbone +4,007,548', summary)
  assert 'stage7_0/dw_conv/kernel' in summary
  assert list((tmp_path / 'resnet18' / 'report' / 'export').glob(
      'model-step*/model.onnx'))
