"""The YOPO network (``yopo``), its data pipeline (``data``), tf.distribute (``distribute``) and the
TensorFlow import (``backend``). Nothing here imports TensorFlow at package import."""

# the smallest box YOPO takes: ten valid 3³ convolutions leave 1 voxel of 21 (here, not in yopo.py,
# so that checking a run's options does not import TensorFlow)
MIN_BOX = 21
