"""The label space shared by data, models, metrics and reports (no jax)."""

EXPRESSIONS = ('Neutral', 'Happy', 'Sad', 'Surprise', 'Fear', 'Disgust',
               'Anger', 'Contempt')
NUM_CLASSES = len(EXPRESSIONS)
# AffectNet codes past the 8 expressions: dropped by default.
EXTRA_CODES = {8: 'None', 9: 'Uncertain', 10: 'No-Face'}
VA_MISSING = -2.0  # AffectNet's "no value" for valence and arousal.
