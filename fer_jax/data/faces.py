"""Procedural face drawing for the synthetic AffectNet set (PIL and NumPy).

A face is drawn in a canonical frame from a parameter dict: identity
(shape, skin, hair, eyes), expression geometry (mouth curve and openness,
eyes, brows, nose wrinkle) and pose; then placed on a cluttered background,
lit, noised and JPEG-compressed. Only the expression geometry depends on the
class and on valence/arousal, so colour and position carry no label.
"""

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fer_jax.labels import NUM_CLASSES

SKIN_TONES = ((255, 224, 196), (241, 194, 155), (224, 172, 105),
              (198, 134, 66), (141, 85, 36), (92, 56, 36))
HAIR_COLOURS = ((20, 15, 10), (60, 40, 25), (110, 75, 40), (190, 160, 100),
                (150, 150, 150), (120, 40, 20))
IRIS_COLOURS = ((60, 40, 20), (40, 90, 140), (60, 110, 60), (30, 30, 30))

# Expression geometry per class, as (smile, mouth_open, mouth_width,
# smirk, eye_open, brow_raise, brow_tilt, wrinkle); rows follow EXPRESSIONS.
# smile: corners up (+) or down (-); smirk: one corner up (contempt);
# brow_tilt: inner ends up (+, sad/fear) or down (-, anger); wrinkle: nose
# wrinkle and raised upper lip (disgust).
GEOMETRY = np.array([
    # smile open  width smirk eye  raise tilt wrinkle
    [0.0, 0.0, 1.0, 0.0, 0.55, 0.0, 0.0, 0.0],     # Neutral
    [1.0, 0.3, 1.25, 0.0, 0.4, 0.1, 0.0, 0.0],     # Happy
    [-0.9, 0.0, 0.9, 0.0, 0.4, 0.1, 0.9, 0.0],     # Sad
    [0.0, 1.0, 0.55, 0.0, 1.0, 1.0, 0.0, 0.0],     # Surprise
    [-0.4, 0.55, 1.3, 0.0, 1.0, 0.6, 0.8, 0.0],    # Fear
    [-0.5, 0.15, 0.95, 0.0, 0.3, -0.4, -0.3, 1.0],  # Disgust
    [-0.3, 0.0, 0.8, 0.0, 0.3, -0.6, -1.0, 0.0],   # Anger
    [0.0, 0.0, 1.0, 1.4, 0.45, 0.0, 0.0, 0.0],     # Contempt
], dtype=np.float64)
assert GEOMETRY.shape[0] == NUM_CLASSES

# Valence/arousal centres, after Russell's circumplex model of affect.
VA_CENTRES = np.array([
    [0.0, 0.0], [0.7, 0.3], [-0.65, -0.35], [0.2, 0.75],
    [-0.6, 0.75], [-0.7, 0.2], [-0.55, 0.6], [-0.45, -0.05]])
VA_SPREAD = 0.15  # standard deviation around each centre
# How far valence and arousal move the geometry away from the class's own:
# valence bends the mouth, arousal opens the eyes and mouth and lifts brows.
VALENCE_TO_SMILE = 0.9
AROUSAL_TO_EYES = 0.6
AROUSAL_TO_BROWS = 0.5
AROUSAL_TO_MOUTH = 0.3


def draw_params(rng: np.random.Generator, label: int) -> dict:
  """Valence, arousal, expression geometry, identity and pose of one face."""
  va = np.clip(VA_CENTRES[label] + rng.normal(0, VA_SPREAD, 2), -1, 1)
  dv, da = va - VA_CENTRES[label]
  intensity = rng.uniform(0.85, 1.1)
  g = GEOMETRY[0] + intensity * (GEOMETRY[label] - GEOMETRY[0])
  g = g + rng.normal(0, 0.04, g.shape)  # individual variation
  smile, mouth_open, width, smirk, eye_open, raise_, tilt, wrinkle = g
  return dict(
      valence=float(va[0]), arousal=float(va[1]),
      smile=smile + VALENCE_TO_SMILE * dv,
      mouth_open=max(0.0, mouth_open + AROUSAL_TO_MOUTH * da),
      mouth_width=width, smirk=smirk, smirk_side=rng.choice((-1, 1)),
      eye_open=float(np.clip(eye_open + AROUSAL_TO_EYES * da, 0.05, 1.3)),
      brow_raise=raise_ + AROUSAL_TO_BROWS * da, brow_tilt=tilt,
      wrinkle=max(0.0, wrinkle),
      # identity
      face_w=rng.uniform(0.85, 1.1), face_h=rng.uniform(0.9, 1.1),
      eye_gap=rng.uniform(0.33, 0.42), mouth_y=rng.uniform(0.45, 0.55),
      skin=_jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 15),
      hair=_jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 15),
      hair_style=int(rng.integers(3)),
      iris=IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))],
      brow_width=rng.uniform(0.06, 0.09),
      # pose, lighting and capture
      angle=rng.uniform(-10, 10), scale=rng.uniform(0.85, 1.05),
      shift=rng.uniform(-0.08, 0.08, 2),
      light=rng.uniform(-0.5, 0.5, 2), brightness=rng.uniform(0.75, 1.2),
      contrast=rng.uniform(0.75, 1.2), noise=rng.uniform(0, 3),
      jpeg_quality=int(rng.integers(50, 96)),
      background_seed=int(rng.integers(2**31)),
  )


def _jitter(rng, colour, amount):
  return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255))
               for c in colour)


def _curve(left, right, mid_y, n=12):
  """Points from left to right whose middle passes through mid_y."""
  t = np.linspace(0, 1, n)
  x = left[0] + t * (right[0] - left[0])
  y = left[1] + t * (right[1] - left[1])
  y = y + 4 * t * (1 - t) * (mid_y - (left[1] + right[1]) / 2)
  return np.stack([x, y], axis=1)


def _face_geometry(p: dict, canvas: int) -> dict:
  """Canonical-frame polygons of every facial part, and the 68 landmarks."""
  cx, cy = canvas * 0.5, canvas * 0.52
  fw, fh = canvas * 0.30 * p['face_w'], canvas * 0.38 * p['face_h']
  pt = lambda u, v: np.array([cx + u * fw, cy + v * fh])
  parts = {}
  # Jaw: the lower half of the face ellipse, left ear to right ear.
  a = np.linspace(math.pi, 0, 17)
  parts['jaw'] = np.stack([cx - fw * np.cos(a), cy + fh * np.sin(a)], 1)
  # Brows: inner ends move with tilt, the whole brow with raise.
  for side, name in ((-1, 'brow_l'), (1, 'brow_r')):
    base = -0.38 - 0.14 * p['brow_raise']
    inner = pt(side * 0.14, base - 0.13 * p['brow_tilt'])
    outer = pt(side * 0.62, base + 0.02)
    arch = -0.04 - 0.06 * max(0.0, p['brow_raise'])
    parts[name] = _curve(outer, inner, (outer[1] + inner[1]) / 2 + arch * fh,
                         5)
  # Nose: bridge and base.
  parts['nose_bridge'] = np.stack([pt(0, v) for v in (-0.2, -0.08, 0.04, 0.16)])
  parts['nose_base'] = np.stack([pt(u, 0.2 - 0.03 * (1 - abs(u) / 0.12))
                                 for u in (-0.12, -0.06, 0, 0.06, 0.12)])
  # Eyes: six points around an ellipse whose height follows eye_open.
  ew = 0.19 * fw
  eh = ew * (0.08 + 0.55 * p['eye_open'])
  for side, name in ((-1, 'eye_l'), (1, 'eye_r')):
    c = pt(side * p['eye_gap'], -0.12)
    a = np.array([math.pi, 2 * math.pi / 3, math.pi / 3, 0,
                  -math.pi / 3, -2 * math.pi / 3])
    parts[name] = np.stack([c[0] + ew * np.cos(a), c[1] - eh * np.sin(a)], 1)
  # Mouth: corners bend with smile (and one of them with smirk); the lips
  # part with mouth_open; disgust raises the upper lip.
  mw = 0.36 * fw * p['mouth_width']
  my = cy + p['mouth_y'] * fh
  corner = [my - 0.16 * fh * p['smile']] * 2
  # A smirk lifts one corner and lowers the other a little.
  corner[(p['smirk_side'] + 1) // 2] -= 0.2 * fh * p['smirk']
  corner[(1 - p['smirk_side']) // 2] += 0.05 * fh * p['smirk']
  gap = 0.24 * fh * p['mouth_open']
  left, right = np.array([cx - mw, corner[0]]), np.array([cx + mw, corner[1]])
  upper = _curve(left, right, my - gap / 2 - 0.1 * fh * p['wrinkle'], 7)
  lower = _curve(left, right, my + gap / 2, 7)
  parts['mouth_outer'] = np.concatenate([upper, lower[::-1][1:-1]])
  parts['mouth_inner'] = np.stack([upper[0], upper[2], upper[3], upper[4],
                                   upper[6], lower[4], lower[3], lower[2]])
  parts['geometry'] = dict(cx=cx, cy=cy, fw=fw, fh=fh, ew=ew, eh=eh,
                           upper=upper, lower=lower, gap=gap)
  return parts


def landmarks_68(parts: dict) -> np.ndarray:
  """[68, 2] points in the iBUG order that AffectNet's landmarks follow."""
  return np.concatenate([
      parts['jaw'], parts['brow_l'], parts['brow_r'][::-1],
      parts['nose_bridge'], parts['nose_base'], parts['eye_l'],
      parts['eye_r'], parts['mouth_outer'], parts['mouth_inner']])


def _draw_face(p: dict, canvas: int, parts: dict) -> Image.Image:
  """The face on a transparent layer, in the canonical frame."""
  g = parts['geometry']
  layer = Image.new('RGBA', (canvas, canvas), (0, 0, 0, 0))
  d = ImageDraw.Draw(layer)
  cx, cy, fw, fh = g['cx'], g['cy'], g['fw'], g['fh']
  skin, hair = p['skin'], p['hair']
  dark = tuple(int(c * 0.7) for c in skin)
  line = max(1, int(canvas * 0.016))
  if p['hair_style'] == 2:  # long hair behind the face
    d.ellipse([cx - fw * 1.2, cy - fh * 1.15, cx + fw * 1.2, cy + fh * 0.7],
              fill=hair)
  for side in (-1, 1):  # ears
    ex = cx + side * fw
    d.ellipse([ex - fw * 0.14, cy - fh * 0.2, ex + fw * 0.14, cy + fh * 0.1],
              fill=skin)
  d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
  if p['hair_style'] >= 1:  # a cap of hair over the forehead
    d.chord([cx - fw * 1.04, cy - fh * 1.08, cx + fw * 1.04, cy - fh * 0.2],
            180, 360, fill=hair)
  brow_w = max(1, int(fh * p['brow_width']))
  for name in ('brow_l', 'brow_r'):
    d.line([tuple(q) for q in parts[name]], fill=hair, width=brow_w,
           joint='curve')
  for name in ('eye_l', 'eye_r'):
    e = parts[name]
    ecx, ecy = e[:, 0].mean(), e[:, 1].mean()
    ew, eh = g['ew'], g['eh']
    d.ellipse([ecx - ew, ecy - eh, ecx + ew, ecy + eh], fill=(245, 245, 245))
    r = min(eh, ew * 0.5)
    d.ellipse([ecx - r, ecy - r, ecx + r, ecy + r], fill=p['iris'])
    rp = r * 0.45
    d.ellipse([ecx - rp, ecy - rp, ecx + rp, ecy + rp], fill=(10, 10, 10))
    d.arc([ecx - ew, ecy - eh, ecx + ew, ecy + eh], 180, 360, fill=dark,
          width=line)
    d.arc([ecx - ew, ecy - eh, ecx + ew, ecy + eh], 0, 180, fill=dark,
          width=max(1, line // 2))
  d.line([tuple(q) for q in parts['nose_bridge'][1:]], fill=dark, width=line)
  d.line([tuple(q) for q in parts['nose_base']], fill=dark, width=line)
  if p['wrinkle'] > 0.3:  # nose wrinkles of disgust
    for side in (-1, 1):
      for k in range(3):
        y = cy - fh * (0.02 + 0.06 * k)
        d.line([(cx + side * fw * 0.07, y),
                (cx + side * fw * 0.24, y + fh * 0.04)], fill=dark,
               width=line * 2)
  lip = (min(255, int(skin[0] * 0.75 + 60)), int(skin[1] * 0.5),
         int(skin[2] * 0.5))
  upper, lower = g['upper'], g['lower']
  if g['gap'] > fh * 0.02:
    mouth = [tuple(q) for q in np.concatenate([upper, lower[::-1]])]
    d.polygon(mouth, fill=(60, 15, 20))
    if p['smile'] > 0.4:  # teeth of a broad smile
      teeth = np.concatenate([upper, upper[::-1] + [0, g['gap'] * 0.35]])
      d.polygon([tuple(q) for q in teeth], fill=(240, 240, 230))
    d.line(mouth + [mouth[0]], fill=lip, width=line * 2, joint='curve')
  else:
    d.line([tuple(q) for q in upper], fill=lip, width=line * 2, joint='curve')
  return layer


def _background(seed: int, canvas: int) -> Image.Image:
  """A cluttered, coloured background independent of the label."""
  rng = np.random.default_rng(seed)
  t = np.linspace(0, 1, canvas)[:, None, None]
  c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
  grad = c0 + (c1 - c0) * (t if rng.random() < 0.5 else t.transpose(1, 0, 2))
  image = Image.fromarray(np.broadcast_to(grad, (canvas, canvas, 3))
                          .astype(np.uint8))
  d = ImageDraw.Draw(image)
  for _ in range(rng.integers(2, 7)):
    x0, y0 = rng.uniform(-0.2, 1, 2) * canvas
    w, h = rng.uniform(0.1, 0.6, 2) * canvas
    colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
    shape = d.ellipse if rng.random() < 0.5 else d.rectangle
    shape([x0, y0, x0 + w, y0 + h], fill=colour)
  return image.filter(ImageFilter.GaussianBlur(canvas * 0.01))


def _pose_matrix(p: dict, canvas: int) -> np.ndarray:
  """2x3 affine map from the canonical frame to the image (rotate, scale, shift)."""
  a = math.radians(p['angle'])
  rot = p['scale'] * np.array([[math.cos(a), -math.sin(a)],
                               [math.sin(a), math.cos(a)]])
  c = np.array([canvas / 2, canvas / 2])
  offset = c + p['shift'] * canvas - rot @ c
  return np.concatenate([rot, offset[:, None]], axis=1)


def render(p: dict, size: int, supersample: int = 2
           ) -> tuple[bytes, np.ndarray]:
  """JPEG bytes of the face image and its 68 landmarks in pixels [68, 2]."""
  canvas = size * supersample
  parts = _face_geometry(p, canvas)
  forward = _pose_matrix(p, canvas)
  inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
  face = _draw_face(p, canvas, parts).transform(
      (canvas, canvas), Image.Transform.AFFINE, tuple(inverse.ravel()),
      resample=Image.Resampling.BILINEAR)
  image = _background(p['background_seed'], canvas)
  image.paste(face, (0, 0), face)
  # Lighting, contrast and sensor noise at the output resolution.
  image = image.resize((size, size), Image.Resampling.BOX)
  x = np.asarray(image, dtype=np.float32)
  yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
  x = x * (1 + p['light'][0] * xx + p['light'][1] * yy)[..., None]
  x = (x - 128) * p['contrast'] + 128 * p['brightness']
  noise = np.random.default_rng(p['background_seed'] + 1).normal(
      0, p['noise'], x.shape)
  image = Image.fromarray(np.clip(x + noise, 0, 255).astype(np.uint8))
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=p['jpeg_quality'])
  points = landmarks_68(parts) @ forward[:, :2].T + forward[:, 2]
  return buffer.getvalue(), points / supersample
