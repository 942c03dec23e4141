"""cli.py and the package: `pip install .` gives `import fer_jax` and the
fer-jax command anywhere, with the configs inside; --config=configs/...
finds the installed configs outside the repository."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fer_jax import cli
from tests.conftest import ROOT


@pytest.fixture(scope='module')
def installed(tmp_path_factory) -> Path:
  """The wheel of this tree, installed (without its dependencies, which
  this environment has) into a folder of its own."""
  folder = tmp_path_factory.mktemp('wheel')
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps',
                  '--no-build-isolation', '-q', '-w', str(folder / 'dist'),
                  str(ROOT)], check=True, cwd=folder, timeout=300)
  wheel, = (folder / 'dist').glob('fer_jax-*.whl')
  subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q',
                  '--target', str(folder / 'site'), str(wheel)], check=True,
                 timeout=300)
  return folder


def test_the_wheel_holds_the_package_and_its_configs_only(installed):
  wheel, = (installed / 'dist').glob('fer_jax-*.whl')
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split('/')[0] for n in names if not n.endswith('.dist-info')}
  assert {t for t in tops if not t.endswith('.dist-info')} == {'fer_jax'}
  for name in ('fer_jax/configs/default.py', 'fer_jax/configs/saved.py',
               'fer_jax/configs/ablations/imbalance.py', 'fer_jax/cli.py',
               'fer_jax/training.py', 'fer_jax/evaluation.py'):
    assert name in names


def test_installed_package_imports_and_runs_from_any_folder(installed,
                                                            tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(installed / 'site'),
         'GLIBC_TUNABLES': ''}
  done = subprocess.run(
      [sys.executable, '-c', 'import fer_jax, fer_jax.configs.default as d; '
       'print(fer_jax.__file__); print(d.get_config().model.name); '
       'print(callable(fer_jax.train), callable(fer_jax.evaluate))'],
      cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
  where, model, api = done.stdout.split('\n')[:3]
  assert Path(where).is_relative_to(installed / 'site')
  assert (model, api) == ('resnet18', 'True True')
  command = installed / 'site' / 'bin' / 'fer-jax'
  done = subprocess.run([sys.executable, str(command), '--helpshort'],
                        cwd=tmp_path, env=env, capture_output=True,
                        text=True)
  assert not done.stderr  # absl's help exits with status 1
  for flag in ('--config', '--mode', '--workdir', '--input'):
    assert flag in done.stdout
  # The installed configs, named as in the repository, from elsewhere.
  done = subprocess.run([sys.executable, str(command),
                         '--config=configs/rafdb.py', '--mode=evaluate',
                         f'--workdir={tmp_path / "none"}'], cwd=tmp_path,
                        env=env, capture_output=True, text=True)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      f'fer_jax: {tmp_path / "none" / "config.json"}: not found; is '
      f'{tmp_path / "none"} a training workdir?')


def test_config_path_prefers_the_working_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  packaged = str(cli.CONFIGS / 'ablations' / 'imbalance.py')
  assert cli.config_path('configs/ablations/imbalance.py:affectnet') == (
      packaged + ':affectnet')
  assert cli.config_path('configs/missing.py') == 'configs/missing.py'
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'rafdb.py').write_text('')
  assert cli.config_path('configs/rafdb.py') == 'configs/rafdb.py'
  assert cli._config_args(['x', '--config', 'configs/default.py']) == [
      'x', '--config', str(cli.CONFIGS / 'default.py')]
