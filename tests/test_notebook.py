"""notebooks/walkthrough.ipynb, run top to bottom as a reader runs it."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = (Path(__file__).resolve().parents[1] / 'notebooks' /
            'walkthrough.ipynb')


def test_walkthrough_runs_top_to_bottom_and_shows_its_figures(
    tmp_path, monkeypatch):
  """The kernel inherits the environment: the work folder, and the tests'
  XLA flags and compilation cache (conftest.py). The notebook's sizes are
  tiny_config's, so its EfficientNet-B0 run (dropout 0.2, one epoch)
  compiles the programs of test_train's end-to-end EfficientNet-B0 run:
  whichever runs second reads them from the cache (90 s here instead of
  130 s on a busy 2-core machine)."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert not any(cell.outputs or cell.execution_count for cell in code), (
      'store the notebook without outputs')
  monkeypatch.setenv('FER_JAX_NOTEBOOK_DIR', str(tmp_path))
  NotebookClient(notebook, timeout=600, kernel_name='python3', resources={
      'metadata': {'path': str(NOTEBOOK.parent)}}).execute()  # or raises
  shown = [output for cell in code for output in cell.outputs
           if 'image/png' in output.get('data', {})]
  # Samples, curves, confusion matrix, VA scatter, the annotated photo.
  assert len(shown) == 5
  assert (tmp_path / 'efficientnet_b0' / 'report' / 'test_metrics.json'
          ).exists()
  assert list((tmp_path / 'resnet18' / 'report' / 'export').glob(
      'model-step*/model.onnx'))
