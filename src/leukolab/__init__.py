"""leukolab: white-blood-cell images in, answers out.

Layers, each in its own subpackage: ``data`` (readers, splits, synthetic
generator) -> ``models`` (backbone/head registry) -> ``objectives`` (what a
batch's loss is) -> ``training`` (the one loop) -> ``evaluation`` (metrics,
plots) -> ``cli``.
"""

__version__ = "0.1.0"
