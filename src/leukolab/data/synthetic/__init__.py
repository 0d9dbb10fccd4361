"""Procedural, deterministic synthetic blood-smear data: WBC crops, tissue patches, smear fields.

No real data can be downloaded, so this package is the default data source for
the demo and the tests. Modules:

* :mod:`~leukolab.data.synthetic.raster` - coordinates, random fields, coverage
  and the finishing step (stain / illumination / colour jitter, blur, noise)
  shared by every renderer; images are composed in optical density (Beer-Lambert);
* :mod:`~leukolab.data.synthetic.cells` - the five WBC classes with their
  morphology (:func:`render_cell`), and red cells;
* :mod:`~leukolab.data.synthetic.tissue` - off-domain H&E-like tissue patches (unlabelled, or normal / tumour);
* :mod:`~leukolab.data.synthetic.writers` - the crop data sets
  (:func:`make_wbc_dataset`, :func:`make_tissue_dataset`, :func:`make_pool`);
* :mod:`~leukolab.data.synthetic.smears` - whole smear fields with boxes
  (:func:`render_smear`, :func:`make_smears`).

Every image gets its own nuisance variation whose spread grows with
``difficulty`` in [0, 1]. Everything is deterministic: a given
:class:`numpy.random.Generator` state gives the same image, and the writers
derive each image's generator from ``(seed, stream, index)``.
"""

from __future__ import annotations

from leukolab.data.synthetic.cells import WBC_CLASSES, render_cell
from leukolab.data.synthetic.patients import make_patients as make_patients
from leukolab.data.synthetic.tissue import TISSUE_CLASSES, render_tissue_patch
from leukolab.data.synthetic.writers import make_pool, make_tissue_dataset, make_wbc_dataset

__all__ = [
    "TISSUE_CLASSES",
    "WBC_CLASSES",
    "make_pool",
    "make_tissue_dataset",
    "make_wbc_dataset",
    "render_cell",
    "render_tissue_patch",
]
