"""mindhier: fMRI-to-image reconstruction by hierarchy-to-hierarchy autoregression.

The library (this package minus ``mindhier.train``) holds models, data readers, sampling and
metrics; ``mindhier.train`` holds training loops and is never imported by the library.
"""

__version__ = "0.1.0"
