"""Smoke tests of benchmarks/' maintained tools that test_benchmark.py does
not run: each as a user starts it (python -m benchmarks.X, from the
repository's root), at tiny sizes, its output checked.
benchmarks/gpu_check.sh's own smoke test is its --cpu-smoke run (about
5 minutes: not in the suite); here its shell is parsed and the row
collector it calls is run."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _tool(module: str, *args: str) -> str:
  """python -m benchmarks.<module> args; its standard output."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run([sys.executable, '-m', f'benchmarks.{module}', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_pipeline_times_the_pipeline_with_and_without_augmentation(
    data_cache, tmp_path):
  out = tmp_path / 'rows.json'
  _tool('pipeline', f'--config.data.synthetic.cache_dir={data_cache}',
        f'--config.data.index_cache_dir={data_cache / "index"}',
        '--config.data.synthetic.num_train=96',
        '--config.data.synthetic.num_val=32',
        '--config.data.synthetic.num_processes=1', '--image_size=32',
        '--workers=0', '--batch_size=8', '--warmup_batches=1', '--batches=2',
        f'--output={out}')
  rows = json.loads(out.read_text())
  assert [(r['augment'], r['num_workers'], r['image_size']) for r in rows] == [
      (True, 0, 32), (False, 0, 32)]
  assert all(r['images_per_sec'] > 0 for r in rows)


def test_index_scale_indexes_every_linked_image(tmp_path):
  stdout = _tool('index_scale', '--num_images=300', '--processes=1',
                 f'--folder={tmp_path / "set"}')
  line = next(l for l in stdout.splitlines() if l.startswith('label rules'))
  kept = int(line.split('; ')[1].split(' kept')[0].replace(',', ''))
  dropped = json.loads(line.split('dropped ')[1].replace("'", '"'))
  # Codes 8-10 (None, Uncertain, No-Face) dropped, the rest kept: 300 all.
  assert kept + sum(dropped.values()) == 300 and kept < 300
  assert 'second start' in stdout and not (tmp_path / 'set').exists()


@pytest.fixture(scope='module')
def predicted(trained, tmp_path_factory) -> Path:
  """benchmarks.predict_speed on a copy of the trained run."""
  import shutil
  _, workdir, _ = trained
  copy = tmp_path_factory.mktemp('speed') / 'run'
  shutil.copytree(workdir, copy)
  stdout = _tool('predict_speed', f'--workdir={copy}', '--num_photos=4',
                 '--num_frames=6')
  assert '--- photos' in stdout and '--- pan.mp4' in stdout
  return copy


def test_predict_speed_predicts_the_photos_and_the_video(predicted):
  tables = sorted((predicted / 'report' / 'predict').glob(
      '*/predictions.csv'))
  assert len(tables) == 2
  rows = [list(csv.DictReader(t.open())) for t in tables]
  # The photos: 4 files cycling astronaut, camera, Grace Hopper, coffee:
  # three faces; the video's 6 frames pan over the three portraits.
  photo_rows = next(r for r in rows if not r[0].get('frame'))
  faces = [r for r in photo_rows if r['expression']]
  assert len(faces) == 3


def test_gpu_rows_collects_rows_and_reads_a_jobs_workdir(predicted, trained,
                                                        tmp_path):
  _, _, metrics = trained
  rows = tmp_path / 'rows.jsonl'
  source = tmp_path / 'benchmark.json'
  source.write_text(json.dumps([{'model': 'a'}, {'model': 'b'}]))
  _tool('gpu_rows', 'collect', str(source), f'--rows={rows}', '--part=step')
  _tool('gpu_rows', 'job', 'trained', str(predicted), f'--rows={rows}')
  _tool('gpu_rows', 'job', 'predicted', str(predicted), f'--rows={rows}')
  lines = [json.loads(l) for l in rows.read_text().splitlines()]
  assert [(r['part'], r.get('model')) for r in lines[:2]] == [
      ('step', 'a'), ('step', 'b')]
  assert lines[2]['test_accuracy'] == metrics['accuracy']
  assert lines[2]['epochs_trained'] == metrics['epochs_trained']
  assert lines[3]['predictions_rows'] > 0


@pytest.mark.parametrize('script', ['gpu_check.sh', 'gpu_wheels.sh'])
def test_gpu_scripts_parse(script):
  done = subprocess.run(['bash', '-n', str(ROOT / 'benchmarks' / script)],
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
