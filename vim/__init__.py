"""vim: Vision Mamba backbones for images, video and point clouds.

``import vim`` registers every backbone with timm (``timm.create_model("vim_small_patch16_224")``).
``vim.extract(...)`` writes features of a folder, list or HDF5 file for any of the three modalities;
it is loaded on first use, since it needs the data readers (PyAV, h5py) that plain timm users do not.
"""

from . import models  # registers the backbones with timm

__version__ = "0.1.0"
__all__ = ["extract", "models", "read_features"]


def __getattr__(name: str):
    if name in ("extract", "read_features"):
        from .extraction import extract, read_features

        globals().update(extract=extract, read_features=read_features)
        return globals()[name]
    raise AttributeError(f"module 'vim' has no attribute {name!r}")
