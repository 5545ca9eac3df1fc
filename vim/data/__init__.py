"""Classification data for images, video clips and point clouds.

- :mod:`vim.data.labelled`: the shared base of the three data modules (loaders, resumable shuffling, skip
  reporting, class lists); :mod:`vim.data.images`, :mod:`vim.data.video` and :mod:`vim.data.points` are siblings on it,
  each with its readers, transforms (functions every caller asks, as timm's ``create_transform``), dataset and data
  module.
- :mod:`vim.data.folders` (the class-folder layout), :mod:`vim.data.samples` (what datasets hand their loaders),
  :mod:`vim.data.sampling` (seeded, resumable sampling), :mod:`vim.data.workers` (loader processes).
- :mod:`vim.data.modalities`: the modality table (each modality's file extensions, a model's evaluation preprocessing,
  the dataset of a list of files), read by feature extraction through the family's declared ``modality``.
- :mod:`vim.data.generated`: the quickstarts' generated datasets.
"""
