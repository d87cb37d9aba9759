"""disca_tools: template- and label-free structure discovery in cryo-electron tomography.

DoG picking, subtomogram extraction, DISCA deep iterative clustering, and the hand-off to RELION.
"""

__version__ = "0.1.0"
