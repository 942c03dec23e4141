"""Decoding, the face crop and the augmentations match torchvision and NumPy."""

import copy
import io

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from fer_jax.data import images
from fer_jax.configs import default

S = 32
_WARP_FLAGS = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP


def _augment(**overrides):
  """The default augment config with some fields changed."""
  augment = default.get_config().data.augment.copy_and_resolve_references()
  for name, value in overrides.items():
    setattr(augment, name, value)
  return augment


def _all_off():
  """Every augmentation at its neutral value."""
  return _augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                  rotation_degrees=0.0, brightness=0.0, contrast=0.0,
                  saturation=0.0, erasing_prob=0.0)


def _smooth_image(seed: int, size: int = S) -> np.ndarray:
  """Smooth uint8 RGB with strong gradients: 8 x 8 noise upsampled."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float64)
  image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _tensor(image: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _array(tensor: torch.Tensor) -> np.ndarray:
  return tensor.permute(1, 2, 0).numpy()


def _warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  return cv2.warpAffine(image, matrix, (S, S), flags=_WARP_FLAGS)


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.abs(a.astype(np.float64) - b.astype(np.float64))


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in]: the share of input pixel i in output pixel u."""
  step = n_in / n_out
  lo = np.arange(n_out)[:, None] * step
  i = np.arange(n_in)[None, :]
  overlap = np.clip(np.minimum(i + 1, lo + step) - np.maximum(i, lo), 0, None)
  return overlap / step


def _area_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Float64 area averaging of [H, W, C] to [size, size, C]."""
  rows = _area_weights(image.shape[0], size)
  cols = _area_weights(image.shape[1], size)
  return np.einsum('uh,hwc,vw->uvc', rows, image.astype(np.float64), cols,
                   optimize=True)


# warp_matrix

def test_axis_aligned_crop_matches_torchvision_resized_crop():
  image = _smooth_image(0)
  top, left, h, w = 5, 3, 20, 24
  want = _array(F.resized_crop(_tensor(image), top, left, h, w, [S, S],
                               InterpolationMode.BILINEAR, antialias=False))
  got = _warp(image, images.warp_matrix(
      S, (left + w / 2, top + h / 2, w, h), 0.0, False))
  # torchvision clamps at the crop's edges, OpenCV reads beyond them.
  assert _diff(got, want)[1:-1, 1:-1].max() <= 1


@pytest.mark.parametrize('angle', [10.0, -7.0])
def test_rotation_is_counter_clockwise_about_the_centre_as_torchvision(angle):
  image = _smooth_image(1)
  want = _array(F.rotate(_tensor(image), angle, InterpolationMode.BILINEAR))
  got = _warp(image, images.warp_matrix(S, (S / 2, S / 2, S, S), angle, False))
  y, x = np.mgrid[:S, :S] + 0.5
  inside = np.hypot(x - S / 2, y - S / 2) < S / 2 - 1  # away from the corners
  assert _diff(got, want).max(-1)[inside].max() <= 2


def test_flip_of_the_whole_image_mirrors_it_exactly():
  image = _smooth_image(2)
  got = _warp(image, images.warp_matrix(S, (S / 2, S / 2, S, S), 0.0, True))
  np.testing.assert_array_equal(got, image[:, ::-1])


# augment_image

def test_augment_with_everything_off_returns_the_image_unchanged():
  image = _smooth_image(3)
  for seed in range(5):
    got = images.augment_image(image, np.random.default_rng(seed), _all_off())
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, image)


def test_augment_is_deterministic_per_seed_and_keeps_shape_and_dtype():
  image = _smooth_image(4)
  augment = _augment(erasing_prob=0.5)
  first = images.augment_image(image, np.random.default_rng(7), augment)
  again = images.augment_image(image, np.random.default_rng(7), augment)
  other = images.augment_image(image, np.random.default_rng(8), augment)
  assert first.shape == image.shape and first.dtype == np.uint8
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


# colour_matrix

@pytest.mark.parametrize('seed', range(10))
def test_colour_matrix_matches_torchvision_brightness_contrast_saturation(
    seed):
  augment = _augment(brightness=0.1, contrast=0.3, saturation=0.2)
  rng = np.random.default_rng(seed)
  image = rng.integers(60, 181, (8, 8, 3), dtype=np.uint8)
  factors = copy.deepcopy(rng)
  b, c, s = (factors.uniform(max(0.0, 1 - x), 1 + x) for x in (
      augment.brightness, augment.contrast, augment.saturation))
  got = cv2.transform(image, images.colour_matrix(rng, image, augment))
  # torchvision on float64 in [0, 1]: on uint8 it truncates after every
  # step (errors up to 3 levels), which the composed matrix does not do.
  x = _tensor(image).double() / 255
  x = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, b), c), s)
  want = _array(x) * 255
  assert 0 < want.min() and want.max() < 255  # nothing clipped
  assert _diff(got, want).max() <= 1


def test_saturation_jitter_keeps_a_grey_image_grey():
  augment = _augment(brightness=0.2, contrast=0.2, saturation=0.5)
  rng = np.random.default_rng(0)
  grey = np.repeat(rng.integers(40, 200, (8, 8, 1), dtype=np.uint8), 3, -1)
  for _ in range(5):
    matrix = images.colour_matrix(rng, grey, augment)
    exact = grey.astype(np.float64) @ matrix[:, :3].T + matrix[:, 3]
    np.testing.assert_allclose(exact[..., 1:], exact[..., :1].repeat(2, -1),
                               atol=1e-9)
    # cv2.transform on uint8 rounds the matrix to 1/1024ths: one level off.
    got = cv2.transform(grey, matrix).astype(int)
    assert np.ptp(got, axis=-1).max() <= 1


# erase

def test_erasing_prob_zero_never_changes_the_image():
  image = _smooth_image(5)
  augment = _augment(erasing_prob=0.0)
  for seed in range(20):
    got = images.erase(image, np.random.default_rng(seed), augment)
    np.testing.assert_array_equal(got, image)


def test_erasing_changes_one_rectangle_within_scale_and_ratio_not_in_place():
  image = _smooth_image(6)
  before = image.copy()
  augment = _augment(erasing_prob=1.0)
  (scale_lo, scale_hi), (ratio_lo, ratio_hi) = (augment.erasing_scale,
                                                augment.erasing_ratio)
  for seed in range(30):
    got = images.erase(image, np.random.default_rng(seed), augment)
    np.testing.assert_array_equal(image, before)
    changed = np.any(got != image, axis=-1)
    ys, xs = np.nonzero(changed)
    assert ys.size, seed
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert changed.sum() == h * w, seed  # a full rectangle, nothing else
    # h and w are rounded: allow half a pixel on each.
    assert (h - 0.5) * (w - 0.5) <= scale_hi * S * S, seed
    assert (h + 0.5) * (w + 0.5) >= scale_lo * S * S, seed
    assert (h - 0.5) / (w + 0.5) <= ratio_hi, seed
    assert (h + 0.5) / (w - 0.5) >= ratio_lo, seed


# load

def _face_scene(red_x: int = 60) -> np.ndarray:
  """200 x 160 black with a red 40 px square at x red_x.., y 40..80."""
  scene = np.zeros((160, 200, 3), np.uint8)
  scene[40:80, red_x:red_x + 40] = (255, 0, 0)
  return scene


def _save(path, image: np.ndarray, fmt: str, **kwargs) -> str:
  Image.fromarray(image).save(path, format=fmt, **kwargs)
  return str(path)


@pytest.mark.parametrize('fmt,suffix', [('JPEG', 'jpg'), ('PNG', 'png')])
def test_load_resizes_another_size_to_a_square_uint8_rgb(tmp_path, fmt,
                                                         suffix):
  image = _smooth_image(7, 64)[:, :48]  # 48 wide, 64 high
  path = _save(tmp_path / f'a.{suffix}', image, fmt, **(
      {'quality': 95, 'subsampling': 0} if fmt == 'JPEG' else {}))
  got = images.load(path, 32)
  assert got.shape == (32, 32, 3) and got.dtype == np.uint8
  diff = _diff(got, _area_resize(image, 32))
  if fmt == 'PNG':  # lossless
    assert diff.max() <= 1
  else:
    assert diff.max() <= 8 and diff.mean() < 1.5


def test_load_greyscale_png_named_jpg_gives_three_equal_channels(tmp_path):
  grey = _smooth_image(8)[..., 0]
  path = _save(tmp_path / 'grey.jpg', grey, 'PNG')
  got = images.load(path, S)
  assert got.shape == (S, S, 3) and got.dtype == np.uint8
  for channel in range(3):
    np.testing.assert_array_equal(got[..., channel], grey)


def test_load_face_box_without_margin_is_the_red_square(tmp_path):
  path = _save(tmp_path / 'face.png', _face_scene(), 'PNG')
  got = images.load(path, 32, box=np.array([60, 40, 40, 40]), margin=0.0)
  assert got.shape == (32, 32, 3)
  assert _diff(got, np.array([255, 0, 0])).max() <= 1


def test_load_face_box_with_margin_half_centres_the_square(tmp_path):
  scene = _face_scene()
  path = _save(tmp_path / 'face.png', scene, 'PNG')
  got = images.load(path, 32, box=np.array([60, 40, 40, 40]), margin=0.5)
  # side 40 x (1 + 2 x 0.5) = 80 around the box's centre (80, 60).
  assert _diff(got, _area_resize(scene[20:100, 40:120], 32)).max() <= 1
  assert (got[8:24, 8:24] == (255, 0, 0)).all()
  for corner in (got[:8, :8], got[:8, -8:], got[-8:, :8], got[-8:, -8:]):
    assert (corner == 0).all()


def test_load_box_across_the_edge_is_padded_with_black_not_shifted(tmp_path):
  scene = _face_scene(red_x=0)
  path = _save(tmp_path / 'edge.png', scene, 'PNG')
  got = images.load(path, 32, box=np.array([0, 40, 40, 40]), margin=0.5)
  # The region x -20..60, y 20..100: 20 columns beyond the left edge.
  padded = np.pad(scene, ((0, 0), (20, 0), (0, 0)))[20:100, 0:80]
  assert _diff(got, _area_resize(padded, 32)).max() <= 1
  assert (got[:, :8] == 0).all()
  assert (got[8:24, 8:24] == (255, 0, 0)).all()


def test_load_face_box_on_a_jpeg_decoded_at_reduced_scale(tmp_path):
  scene = _face_scene()
  path = _save(tmp_path / 'face.jpg', scene, 'JPEG', quality=95)
  # The 40 px region at 8 px: decoded at 1/4 scale, box scaled with it.
  got = images.load(path, 8, box=np.array([60, 40, 40, 40]), margin=0.0)
  assert _diff(got[1:-1, 1:-1], np.array([255, 0, 0])).max() <= 40
  assert _diff(got, np.array([255, 0, 0])).mean() <= 10


def test_load_nan_box_is_the_whole_image(tmp_path):
  image = _smooth_image(9, 48)
  path = _save(tmp_path / 'a.png', image, 'PNG')
  np.testing.assert_array_equal(
      images.load(path, 16, box=np.full(4, np.nan)), images.load(path, 16))


def test_load_large_jpeg_at_reduced_dct_scale_is_close_to_area_average(
    tmp_path):
  y, x = np.mgrid[:512, :512] / 512
  image = 127.5 + 100 * np.stack([np.sin(2 * np.pi * (x + 0.3 * y)),
                                  np.cos(3 * np.pi * y),
                                  np.sin(np.pi * (x * y + 2 * x))], -1)
  image = np.round(image).astype(np.uint8)
  path = _save(tmp_path / 'big.jpg', image, 'JPEG', quality=95)
  got = images.load(path, 64)
  assert got.shape == (64, 64, 3)
  assert _diff(got, _area_resize(image, 64)).mean() < 3


def test_load_of_a_non_image_raises_value_error_naming_the_file(tmp_path):
  path = tmp_path / 'not_a_face.jpg'
  path.write_bytes(b'this is not an image')
  with pytest.raises(ValueError, match='not_a_face.jpg'):
    images.load(str(path), S)


def test_load_box_on_a_reduced_jpeg_whose_width_is_not_a_multiple_of_8(
    tmp_path):
  y, x = np.mgrid[:400, :801]  # 801 wide: decoded at 1/8 as 101 px
  scene = np.stack([np.clip(x - 560, 0, 255), np.clip(y - 60, 0, 255),
                    np.full(x.shape, 128)], -1).astype(np.uint8)
  path = _save(tmp_path / 'wide.jpg', scene, 'JPEG', quality=98,
               subsampling=0)
  got = images.load(path, 16, box=np.array([640, 120, 160, 160]))
  want = _area_resize(scene[120:280, 640:800], 16)
  assert _diff(got, want).max() <= 4


def test_load_refuses_a_face_box_outside_the_image(tmp_path):
  """Unchecked indexes can hold such boxes: never a black labelled face."""
  path = tmp_path / 'small.png'
  Image.new('RGB', (64, 64), (200, 10, 10)).save(path)
  with pytest.raises(ValueError, match=r'small\.png: face box \[500\.0, '
                     r'500\.0, 50\.0, 50\.0\] lies outside the 64x64 image'):
    images.load(str(path), 16, box=np.array([500.0, 500, 50, 50]))


def test_an_image_past_pillows_default_limit_is_read_as_opencv_reads_it(
    tmp_path):
  """180 megapixels: past Pillow's default decompression-bomb limit (179),
  within OpenCV's (2**30), which is now Pillow's too."""
  from fer_jax.data import index
  path = tmp_path / 'panorama.png'
  Image.new('L', (13500, 13300), 90).save(path, compress_level=1)
  assert index.check_image(str(path))[:3] == (13500, 13300, 'L')
  assert Image.MAX_IMAGE_PIXELS * 2 == 2 ** 30  # OpenCV's limit


def _with_orientation(pixels: np.ndarray, fmt: str, value: int) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = value
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, fmt, exif=exif, **(
      {'quality': 100} if fmt == 'JPEG' else {'lossless': True}
      if fmt == 'WEBP' else {}))
  return buffer.getvalue()


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG', 'WEBP', 'TIFF'])
def test_every_exif_orientation_is_turned_as_pillow_turns_it(fmt):
  """One reading of the EXIF (Pillow's) for every format: OpenCV misses it
  in PNGs (and turns TIFFs itself, as Pillow's libtiff does)."""
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
  for value in range(1, 9):
    data = _with_orientation(pixels, fmt, value)
    with Image.open(io.BytesIO(data)) as image:
      assert images.orientation(image) == value
      stored = np.asarray(image.convert('RGB'))
      shown = (stored if fmt == 'TIFF' else
               np.asarray(ImageOps.exif_transpose(image).convert('RGB')))
    assert shown.shape[:2] == ((5, 7) if value < 5 else (7, 5))
    np.testing.assert_array_equal(images.decode(data, 'x', orient=True),
                                  shown, err_msg=f'{fmt} {value}')
    np.testing.assert_array_equal(images.decode(data, 'x'), stored)


def test_malformed_exif_is_no_orientation():
  buffer = io.BytesIO()
  Image.new('RGB', (6, 4), (10, 20, 30)).save(
      buffer, 'JPEG', exif=b'Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff')
  with Image.open(io.BytesIO(buffer.getvalue())) as image:
    assert images.orientation(image) == 1
  assert images.decode(buffer.getvalue(), 'x', orient=True).shape == (
      4, 6, 3)
