"""Feature extraction for images, video clips and point clouds: ``vimkit extract`` and :func:`extract`.

Command line::

    vimkit extract --model vim_small_patch16_224.in1k --input photos/ --out feats/       # released weights (timm tag)
    vimkit extract --checkpoint runs/points_quickstart/latest/checkpoints/last.ckpt --input clouds.h5 --out feats/ --tokens
    vimkit extract --model videomamba_tiny --checkpoint vm_t.pth --input clips.txt --out feats/ --layers 5 11 --format safetensors
    vimkit extract --model videomamba_small.k400_f8 --input k400.txt --out /shared/feats/ --devices 8 --num-nodes 4   # DDP

Python::

    manifest = vim.extract("pointmamba_small", "clouds/", "feats/", checkpoint="pm.safetensors")
    pooled, names = vim.read_features("feats/")          # (rows, D) and the input of each row

Weights: a ``checkpoint`` file, identified by the sha256 and size of its contents (read once per run to hash them), so
a file rewritten since (``last.ckpt`` after more training) is other weights, and the same bytes at another path the
same; else the released weights of the model name's timm tag (``vim_small_patch16_224.in1k``,
or the name's default tag), loaded by ``timm.create_model(name, pretrained=True)``, which downloads them once into its
cache (Hugging Face Hub or torch hub); a name without released weights, or no network and no cached file, is an
error naming the file looked for. Random weights only with ``random_weights=True`` (``--random-weights``), seeded
by ``seed``. The manifest records which.

Inputs: a folder (searched recursively), a list file (``.txt`` / ``.lst`` / ``.csv``: one path a line, relative to
the list's folder, spaces in it kept (``holiday photo.jpg``); a label or other fields after it follow a comma or tab
(``a.jpg,3``), or a space when the line does not end in the file's extension (``clips/a.mp4 3``); blank lines and
``#`` comments skipped), an HDF5 file of point clouds (``data`` (M, P, 3); inputs ``<file>[<row>]``; one that cannot
be opened is one input, ``<file>``, listed as failed) or a single file. The modality (images, video, points) follows
from the file extensions and must match the model; ``modality`` restricts it. Each input is prepared exactly as the
model's evaluation data (the datamodules' deterministic evaluation transforms), and features are computed in eval
mode, so runs are deterministic. The preprocessing
settings (image size, resize interpolation, crop fraction, mean and std; frames per clip; points per cloud) are the
model's, or with a Lightning ``.ckpt`` those its data module was trained with (``num_points=`` still wins); the
manifest's ``settings.preprocessing`` records them.

Outputs in ``out``: shards of ``shard_size`` inputs, ``shard-00000.<key>.npy`` (one file per feature
key) or ``shard-00000.safetensors`` (all keys), with keys ``pooled`` (rows, F): the model's pre-logits
feature; ``tokens`` (rows, L, D): the final tokens (``tokens=True``); ``layer<i>`` (rows, L', D): the
residual stream after block ``i`` (``layers=[i, ...]``). ``manifest.json`` records the settings, the
shards, and for each input (by absolute path) its shard and row, or the reason it failed (unreadable or invalid
inputs are listed, not fatal). Every file is written to a temporary name and moved into place, a shard's
``shard-00000.json`` last: a rerun with the same settings and inputs skips the finished shards and does the rest;
other settings or inputs are refused, naming what differs.

Processes: the shards go through Lightning's predict loop (:mod:`vim.extraction.loop`) on one device, or over
``devices`` x ``num_nodes`` DDP processes, each writing its own shards; rank 0 merges the manifest at the end. Shards
are fixed by input index, so the output is the same on any number of processes, and a run resumes on another number.
The process that starts the run (not those a launcher starts for the other ranks) locks ``out`` for the run (``fcntl``
lock on ``out/.extract.lock``, which the system releases when the process ends): a second run into the same folder
is refused, naming the process (pid, host, command) that holds it.

Modules, one job each: :mod:`~vim.extraction.inputs` (which files: folders, lists, HDF5 rows, their modality),
:mod:`~vim.extraction.model` (the model and its weights' identity), :mod:`~vim.extraction.manifest` (what a run records,
resuming, :func:`read_features`), :mod:`~vim.extraction.loop` (the predict loop and shard writing),
:mod:`~vim.extraction.api` (:func:`extract`) and :mod:`~vim.extraction.cli` (``vimkit extract``). What each modality's
files are and how they are prepared for a model is :mod:`vim.data.modalities`' table.
"""

from __future__ import annotations

from vim.data.modalities import MODALITIES, evaluation_preprocessing

from .api import LOCK, extract
from .cli import main
from .inputs import resolve_inputs
from .manifest import read_features

__all__ = ["LOCK", "MODALITIES", "evaluation_preprocessing", "extract", "main", "read_features", "resolve_inputs"]
