"""Objectives: what a task's loss is (see :mod:`leukolab.objectives.base`).

Importing this package registers the built-in objectives in
:data:`leukolab.registry.OBJECTIVES` (a new objective module adds its import here).
"""

from leukolab.objectives import ae, classification, detection, dino, mae, mil  # noqa: F401 - registers them
