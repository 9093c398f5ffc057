"""Batched normalisation and augmentation on the batch's device, chosen per band kind from the modality registry.

DataLoader workers only read and decode; :class:`DeviceTransforms` does the rest on whatever device the batch is on
(CPU in tests, CUDA on the cluster), called by the DataModule in ``on_after_batch_transfer``. Per band kind:

- ``sar_db``: clip (fixed range, per-band patterns or stats percentiles), standardise; optional VV−VH channels (the
  registry's ``polarisation_pairs``).
- ``optical``: scale to physical units, standardise.  ``coherence``: clip to [0, 1], standardise.
- ``continuous`` inputs: standardise (optionally clipped); ``continuous`` targets: physical units, invalid → 0.
- ``phase``: (sin, cos) of the wrapped phase, or unwrapped phase minus its per-chip median; raw phase is never
  interpolated.
- ``categorical`` targets: upstream codes → 0..K−1 by a lookup table, nodata/unknown → ``ignore_index``;
  categorical inputs become one-hot channels.

Nodata and NaN give ``<modality>_valid`` masks; invalid input pixels are 0 (the mean) before any resampling, so no
NaN reaches a model. Geometry (random resized crop + resize onto the training grid in ONE ``grid_sample`` per
modality, then a dihedral flip/rotation by exact index ops) uses the same per-sample parameters for every modality
and mask of a sample; masks and labels are resampled with nearest, images bilinear. Random parameters come from a
``torch.Generator`` seeded by a hash of (seed, rank, step), drawn on the CPU (so CPU and CUDA agree), except the
noise fields, which are drawn on the device.

Modules, one job each (imports go down this list):

- :mod:`.defaults`: ``DEFAULT_CONFIG`` and merging a user config over it.
- :mod:`.stats`: the per-band ``stats.json`` lookups the plans make.
- :mod:`.bands`: band plans, one :class:`~.bands.BandPlan` record per selected band; :func:`bands_needed`.
- :mod:`.params`: the random parameters of a batch, one draw function per augmentation.
- :mod:`.geometry`: dihedral index ops, crop boxes as affine maps, the resampling.
- :mod:`.normalise`: band plans applied to stored tensors; validity masks.
- :mod:`.pipeline`: :class:`DeviceTransforms` (all of the above, per batch) and :func:`build_device_transforms`.
"""

from .bands import bands_needed
from .defaults import DEFAULT_CONFIG
from .geometry import dihedral
from .params import seed_of, to_device
from .pipeline import DeviceTransforms, build_device_transforms

__all__ = ["DEFAULT_CONFIG", "DeviceTransforms", "bands_needed", "build_device_transforms", "dihedral", "seed_of",
           "to_device"]
