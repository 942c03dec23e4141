"""TensorBoard events of a resumed run."""

import struct
import time

from tensorboardX.proto import event_pb2

from fer_jax import reporting


def events(folder) -> list:
  """Every event in a folder's TensorBoard files (TFRecord framing)."""
  found = []
  for path in sorted(folder.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    while data:
      length, = struct.unpack('<Q', data[:8])
      found.append(event_pb2.Event.FromString(data[12:12 + length]))
      data = data[16 + length:]
  return found


def test_a_redone_epoch_hides_its_first_points_in_tensorboard(tmp_path):
  """A run resumed from step 10 writes step 20 again: TensorBoard is told
  to drop the events from step 11 on (purge), so no point shows twice."""
  with reporting.Writer(tmp_path, True) as writer:
    for step in (10, 20):
      writer.record({'epoch': step // 10, 'step': step, 'val_loss': 1.0})
  time.sleep(1.1)  # another event file (named by the second), as a resume
  with reporting.Writer(tmp_path, True) as writer:
    writer.keep_records_until(10)
    writer.record({'epoch': 2, 'step': 20, 'val_loss': 0.5})
  starts = [e.step for e in events(tmp_path / 'tb')
            if e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [11]
  scalars = [(e.step, e.summary.value[0].simple_value)
             for e in events(tmp_path / 'tb') if e.summary.value]
  assert scalars == [(10, 1.0), (20, 1.0), (20, 0.5)]  # 11+ purged
