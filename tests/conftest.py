"""Shared fixtures. Two simulated CPU devices, so every pmapped test shards."""

import atexit
import importlib.metadata
import os
import shutil
import tempfile

NUM_DEVICES = 2
_JAXLIB = importlib.metadata.version('jaxlib')


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a test process with `devices` simulated CPU devices, and
  the flags of the XLA_FLAGS the tests started with (e.g.
  `--xla_cpu_max_isa=AVX2`, to run the suite as on an AVX2-only CPU).

  The tests compile about a hundred programs and run each for a few steps
  of 32 px images: LLVM's optimisation level 0 compiles them in 40-60% of
  the time (ResNet18's train step 5.8 -> 3.8 s, EfficientNet-B0's init
  12.7 -> 6.4 s) and runs them at most 2.5x slower, a net gain of about a
  fifth of the suite. The HLO is optimised as ever; only the machine code
  is plainer, and what the tests compare is within float32 rounding.

  XLA's older fusion emitters (`--xla_cpu_use_fusion_emitters=false`, a
  flag of jaxlib 0.10.2) halve compiling again at -O0: EfficientNet-B0's
  32 px gradient 8.3-9.9 -> 4.0-5.3 s, ResNet18's 2.8-3.2 -> 1.3-1.4 s;
  the suite 412 and 479 -> 380 and 392 s. Users keep XLA's defaults (at
  -O2 the older emitters compile ResNet18's step in 24-26 s against 16-18
  s, for no faster step); test_kernels checks that their gradient is the
  suite's.
  """
  ours = [f'--xla_force_host_platform_device_count={devices}',
          '--xla_backend_optimization_level=0']
  if _JAXLIB == '0.10.2':  # XLA aborts on a flag it does not know
    ours.append('--xla_cpu_use_fusion_emitters=false')
  names = {flag.split('=')[0] for flag in ours}
  given = [flag for flag in os.environ.get('XLA_FLAGS', '').split()
           if flag.split('=')[0] not in names]
  return ' '.join(ours + given)


# Must be set before jax is first imported by any test module.
os.environ['XLA_FLAGS'] = xla_flags(NUM_DEVICES)
# Small pages, so that no main.py process of the tests restarts itself
# (fer_jax/hugepages.py; test_hugepages checks that restart). The tests'
# programs are tiny: with huge pages, test_kernels, test_steps and
# test_train took 25-28 s of system time against 16-18 s, for no shorter
# run. The xdist workers start after this and inherit it.
os.environ.setdefault('GLIBC_TUNABLES', '')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests (and the main.py processes they start) compile the same tiny
# steps: XLA's executables are kept on disk for the session and reused.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='xla_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'],
                  ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import hashlib  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain's worker processes read absl flags, which main.py parses.
flags.FLAGS.mark_as_parsed()

ROOT = Path(__file__).resolve().parents[1]

from fer_jax.configs import default  # noqa: E402


# pytest-xdist (pytest.ini: --dist loadfile --no-loadscope-reorder) hands
# each worker a whole file at a time, in the order collected; the suite
# ends when the last file started ends. These files take longest (seconds
# of a run on 2 cores, docs/performance.md), so they start first and the short
# ones fill the gaps: longest-first, not xdist's default most-tests-first,
# which started the 110 s notebook last.
LONGEST_FIRST = ('test_notebook.py', 'models/test_kernels.py',
                 'test_ablate.py', 'test_train.py', 'test_distributed.py',
                 'test_steps.py', 'test_configs.py', 'test_export.py')


def pytest_collection_modifyitems(items):
  """Files of LONGEST_FIRST first, in its order; the others as collected."""
  def rank(item):
    path = item.path.relative_to(ROOT / 'tests').as_posix()
    return (LONGEST_FIRST.index(path) if path in LONGEST_FIRST
            else len(LONGEST_FIRST))
  items.sort(key=rank)


def command_line(config, workdir) -> list[str]:
  """main.py with the flags that turn the default config into config."""
  from fer_jax import config_rules
  flat = lambda c: config_rules.flatten(config_rules.as_json(c))
  want, default_fields = flat(config), flat(default.get_config())
  flags = [f'--config.{key}={want[key]}' for key in sorted(want)
           if want[key] != default_fields.get(key)]
  return [sys.executable, str(ROOT / 'main.py'), f'--workdir={workdir}',
          *flags]


def tree_digest(folder: Path, skip: tuple[str, ...] = ()) -> dict:
  """{relative path: sha256} of every file below folder, but for those
  below the relative folders in skip."""
  folder = Path(folder)
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file() and not any(
              p.relative_to(folder).is_relative_to(s) for s in skip)}


def live_children() -> set[int]:
  """The running (not zombie) child processes of this process, but for
  multiprocessing's resource tracker (one per process, for its lifetime)."""
  children = set()
  for stat in Path('/proc').glob('[0-9]*/stat'):
    try:
      fields = stat.read_text().rsplit(')', 1)[1].split()
      command = (stat.parent / 'cmdline').read_bytes()
    except OSError:  # ended meanwhile
      continue
    if (int(fields[1]) == os.getpid() and fields[0] != 'Z' and
        b'resource_tracker' not in command):
      children.add(int(stat.parent.name))
  return children


def tiny_config(cache_dir: Path):
  """The default config shrunk to seconds: 32 px, 96 + 32 images, batch 8,
  the three-layer tiny_cnn (a lifecycle test's claim is not the
  backbone's; ResNet18's tracing and compilation were most of each run's
  20-25 s, and most of each main.py process's start)."""
  config = default.get_config()
  config.model.name = 'tiny_cnn'
  config.data.image_size = 32
  config.data.synthetic.num_train = 96
  config.data.synthetic.num_val = 32
  config.data.synthetic.cache_dir = str(cache_dir)
  config.data.synthetic.num_processes = 1
  config.data.index_cache_dir = str(cache_dir / 'index')
  config.data.num_threads = 1
  config.train.num_epochs = 2
  config.train.batch_size = 8
  config.train.eval_batch_size = 16
  config.train.log_every_steps = 2
  # TensorBoard's sample figures cost about a second an epoch, a tenth of
  # a tiny main.py process; the shared `trained` run draws them.
  config.train.num_sample_images = 0
  # The face contract's calibration: 256 detections would be a second of
  # every tiny run; the contract's own tests calibrate fully.
  config.data.face_calibration_samples = 8
  return config


@pytest.fixture(scope='session')
def data_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp('data_cache')


@pytest.fixture
def config(data_cache):
  return tiny_config(data_cache)


@pytest.fixture(scope='session')
def trained(tmp_path_factory, data_cache):
  """One finished two-epoch run of the tiny config: (config, workdir,
  metrics). Read-only: a test that writes into a run uses `finished`, and
  the session fails if any file of this one changed."""
  from fer_jax import training
  config = tiny_config(data_cache)
  # Mid-epoch checkpoints too (steps 4, 8, 12, 16 of 2 x 9), for resume;
  # keeping 5 keeps epoch 1's (step 9) for the evaluation tests.
  config.train.checkpoint_every_steps = 4
  config.train.keep_checkpoints = 5
  config.train.num_sample_images = 8
  workdir = tmp_path_factory.mktemp('run')
  metrics = training.train_and_evaluate(config, str(workdir))
  before = tree_digest(workdir)
  yield config, workdir, metrics
  assert tree_digest(workdir) == before, (
      'a test wrote into the shared trained run; give it `finished`')


@pytest.fixture
def finished(trained, tmp_path):
  """A copy of the trained run, for a test that writes into it."""
  config, workdir, metrics = trained
  shutil.copytree(workdir, tmp_path / 'run')
  return config, tmp_path / 'run', metrics


@pytest.fixture(scope='session')
def photos() -> dict[str, Path]:
  """Real photographs that fer_jax did not draw, from registry packages:
  NASA's portrait of the astronaut Eileen Collins (scikit-image), Grace
  Hopper (U.S. Navy; matplotlib); without a face: a cat, a cup of coffee
  and a rocket (scikit-image). All public domain or CC0."""
  import skimage.data
  from tests.face_sets import photo_paths
  images = Path(skimage.data.__file__).parent
  return {**photo_paths(), 'cat': images / 'chelsea.png',
          'coffee': images / 'coffee.png', 'rocket': images / 'rocket.jpg'}
