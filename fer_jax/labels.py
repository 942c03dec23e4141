"""The label spaces shared by data, models, metrics and reports (no jax).

Every data set's labels are read into canonical codes: 0-7 the expressions
below (AffectNet's codes), past them the reasons a row carries no
expression (EXTRA_CODES, dropped and counted by name). A run's label space
(`data.classes`) is a tuple of canonical names in the head's order: a
preset, or the names given comma-separated; '' takes the data set's own:
its layout's preset, or for class folders the classes that have a folder.
"""

EXPRESSIONS = ('Neutral', 'Happy', 'Sad', 'Surprise', 'Fear', 'Disgust',
               'Anger', 'Contempt')
NUM_CLASSES = len(EXPRESSIONS)
# Codes past the 8 expressions: dropped. 8-10 are AffectNet's; 11 and 12
# are FERPlus's unknown and the rows without a majority.
EXTRA_CODES = {8: 'None', 9: 'Uncertain', 10: 'No-Face', 11: 'Unknown',
               12: 'No-Majority'}
VA_MISSING = -2.0  # AffectNet's "no value" for valence and arousal.

# The names data sets use for the expressions (lower case) -> canonical code.
CLASS_ALIASES = {
    'neutral': 0, 'happy': 1, 'happiness': 1, 'sad': 2, 'sadness': 2,
    'surprise': 3, 'surprised': 3, 'fear': 4, 'fearful': 4, 'disgust': 5,
    'disgusted': 5, 'anger': 6, 'angry': 6, 'contempt': 7,
}
# Each benchmark's classes in its own order (the order its papers'
# confusion matrices use).
PRESETS = {
    'affectnet8': EXPRESSIONS,
    'affectnet7': EXPRESSIONS[:7],
    'rafdb': ('Surprise', 'Fear', 'Disgust', 'Happy', 'Sad', 'Anger',
              'Neutral'),
    'fer2013': ('Anger', 'Disgust', 'Fear', 'Happy', 'Sad', 'Surprise',
                'Neutral'),
    'ferplus': ('Neutral', 'Happy', 'Surprise', 'Sad', 'Anger', 'Disgust',
                'Fear', 'Contempt'),
}
# The layouts' own label spaces; class folders ('folders') have the classes
# that have a folder (run_classes).
LAYOUT_PRESETS = {'synthetic': 'affectnet8', 'npy': 'affectnet8',
                  'csv': 'affectnet8', 'rafdb': 'rafdb',
                  'fer2013': 'fer2013', 'ferplus': 'ferplus'}


def parse_classes(spec: str, layout: str) -> tuple[str, ...]:
  """The label space data.classes names; ValueError naming a bad name.

  spec: '' (the layout's own), a preset (PRESETS) or comma-separated
  expression names (canonical or their variants, any case).
  """
  if not isinstance(spec, str):
    raise ValueError(f'data.classes: {spec!r} is not a string')
  spec = spec.strip() or LAYOUT_PRESETS.get(layout, 'affectnet8')
  if spec.lower() in PRESETS:
    return PRESETS[spec.lower()]
  names = [s.strip() for s in spec.split(',')]
  unknown = [s for s in names if s.lower() not in CLASS_ALIASES]
  if unknown:
    raise ValueError(f'data.classes: {unknown[0]!r} is not an expression '
                     f'({", ".join(EXPRESSIONS)}) or a preset '
                     f'({", ".join(PRESETS)})')
  classes = tuple(EXPRESSIONS[CLASS_ALIASES[s.lower()]] for s in names)
  if len(set(classes)) < len(classes):
    raise ValueError(f'data.classes: {spec!r} names a class twice')
  if len(classes) < 2:
    raise ValueError(f'data.classes: {spec!r} has fewer than 2 classes')
  return classes


def run_classes(config) -> tuple[str, ...]:
  """The label space of a run's config (ml_collections; data.classes and
  data.layout; configs from before data.classes: AffectNet's 8).

  data.classes '' on class folders: the classes that have a folder under
  data.root (ValueError naming the folders where fewer than 2 have).
  """
  spec = config.data.get('classes', '')
  if (isinstance(spec, str) and not spec.strip() and
      config.data.layout == 'folders'):
    # The space is in the folders: read by the data module (imported here,
    # when needed, as it imports this one).
    from fer_jax import data as data_lib
    return data_lib.folder_classes(config.data)
  return parse_classes(spec, config.data.layout)


def code_name(code: int) -> str:
  """The name of a canonical code: an expression or an EXTRA_CODES reason."""
  return EXPRESSIONS[code] if code < NUM_CLASSES else EXTRA_CODES.get(
      code, f'code {code}')
