"""vim: Vision Mamba backbones for images, video and point clouds."""

__version__ = "0.1.0"
