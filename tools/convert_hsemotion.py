"""HSEmotion's released model file as .safetensors, for fer_jax's import.

  python tools/convert_hsemotion.py enet_b0_8_va_mtl.pt \
      enet_b0_8_va_mtl.safetensors
  python main.py --mode=import --workdir=runs/hsemotion \
      --config.model.init_from=enet_b0_8_va_mtl.safetensors

A one-off, in a PyTorch environment with timm (fer_jax's test extras have
both). The released .pt (github.com/av-savchenko/face-emotion-recognition,
models/affectnet_emotions/) is a whole-model pickle: torch.load with
weights_only=False runs whatever code the pickle names. Run this only on
the file from that official release, never on a copy from elsewhere. The
.safetensors it writes holds tensors only: fer_jax reads it without
unpickling anything, and without torch.

The pickle names timm's modules, so it needs a timm that has them: the
current release names timm.layers (timm >= 0.9; 0.9.7 is reported to load
it in av-savchenko/hsemotion issue #5), older copies timm.models.layers
(timm 0.4-0.6; issue #4). The output holds the model's state dict and,
as metadata, its architecture (tf_efficientnet_b0: TensorFlow's SAME
padding and BatchNorm epsilon 1e-3, as HSEmotion's tf_efficientnet_b0_ns;
or efficientnet_b0), the source file's name and sha256, and the timm
version.
"""

import argparse
import datetime
import hashlib
import os
import tempfile
from pathlib import Path


def architecture(model) -> str:
  """'tf_efficientnet_b0' or 'efficientnet_b0', from the model's layers."""
  import torch
  modules = list(model.modules())
  same = any(type(m).__name__.startswith('Conv2dSame') for m in modules)
  eps = {m.eps for m in modules if isinstance(m, torch.nn.BatchNorm2d)}
  if type(model).__name__ == 'EfficientNet' and eps == {1e-3} and same:
    return 'tf_efficientnet_b0'
  if type(model).__name__ == 'EfficientNet' and eps == {1e-5} and not same:
    return 'efficientnet_b0'
  raise ValueError(f'{type(model).__name__} (SAME padding: {same}, BatchNorm '
                   f'epsilons {sorted(eps)}): not an EfficientNet that '
                   'fer_jax has')


def convert(source: Path, target: Path) -> dict:
  """Writes source's state dict to target (atomically); returns the
  metadata stored with it."""
  import safetensors.torch
  import timm
  import torch
  source, target = Path(source), Path(target)
  data = source.read_bytes()
  # Unpickles code: only the official release (module docstring).
  model = torch.load(source, map_location='cpu', weights_only=False)
  metadata = {'architecture': architecture(model), 'source': source.name,
              'source_sha256': hashlib.sha256(data).hexdigest(),
              'timm': timm.__version__,
              'converted': datetime.datetime.now().astimezone().isoformat(
                  timespec='seconds')}
  state = {k: v.detach().cpu().contiguous()
           for k, v in model.state_dict().items()}
  handle, temporary = tempfile.mkstemp(dir=target.parent,
                                       prefix=f'.{target.name}.')
  os.close(handle)
  try:
    safetensors.torch.save_file(state, temporary, metadata=metadata)
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)
  except BaseException:
    Path(temporary).unlink(missing_ok=True)
    raise
  return metadata


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('source', type=Path, help="HSEmotion's .pt")
  parser.add_argument('target', type=Path, help='the .safetensors to write')
  args = parser.parse_args()
  metadata = convert(args.source, args.target)
  print(f'Wrote {args.target}: {metadata}')


if __name__ == '__main__':
  main()
