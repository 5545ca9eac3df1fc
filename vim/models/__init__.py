"""Vision Mamba backbones; importing this package registers the models with timm.

Modules: :mod:`.mixer` (the Mamba mixer, one or two directions), :mod:`.ss2d` (VMamba's mixer, four directions
of a token grid), :mod:`.mambavision_mixer` and :mod:`.attention` (MambaVision's two token mixers), :mod:`.block`
(the residual block from its parts), :mod:`.backbone` (the flat trunk shared by every modality), :mod:`.hierarchical`
(the trunk in stages, and its ``test_hier_mamba``), :mod:`.timm_api` (the input contract and timm's model API both
trunks share), :mod:`.patch_embed`, :mod:`.pos_embed` (middle class token), :mod:`.vision_mamba` (the timm image
backbones), :mod:`.checkpoint` (the safe reader and loading path of released checkpoints), :mod:`.weights` (released
weights by name), the hierarchical families VMamba :mod:`.vmamba` and MambaVision :mod:`.mambavision`, and the video /
point-cloud backbones :mod:`.video_mamba`, :mod:`.point_mamba`.
"""

from . import hierarchical, mambavision, point_mamba, video_mamba, vmamba  # noqa: F401  (register the families, test models)
from .backbone import MambaBackbone, drop_path_schedule
from .block import MambaBlock
from .checkpoint import load_checkpoint_into, load_official_checkpoint
from .mambavision_mixer import MambaVisionMixer
from .mixer import MambaMixer
from .patch_embed import StridedPatchEmbed
from .pos_embed import insert_middle_token, middle_token_index, resample_middle_token_pos_embed, split_middle_token
from .ss2d import SS2D
from .vision_mamba import VisionMamba, checkpoint_filter_fn

__all__ = [
    "SS2D",
    "MambaBackbone",
    "MambaBlock",
    "MambaMixer",
    "MambaVisionMixer",
    "StridedPatchEmbed",
    "VisionMamba",
    "checkpoint_filter_fn",
    "drop_path_schedule",
    "insert_middle_token",
    "load_checkpoint_into",
    "load_official_checkpoint",
    "middle_token_index",
    "resample_middle_token_pos_embed",
    "split_middle_token",
]


def __getattr__(name: str) -> type:
    """The old name ``BiMambaMixer`` of :class:`MambaMixer`, with a FutureWarning (see :mod:`.mixer`)."""
    if name == "BiMambaMixer":
        from . import mixer

        return mixer.BiMambaMixer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
