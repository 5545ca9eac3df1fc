"""What every modality's dataset hands its loader, besides the sample itself.

A dataset item is either the loaded sample (a named tuple whose first two fields are the input and the class
index, then its ``path`` and ``notes``) or :class:`Unreadable`, which the batch's collate function leaves out
and lists in the batch's ``skipped`` field. Unlabelled samples (``predict``) carry the class index
:data:`UNLABELLED`.
"""

from __future__ import annotations

from typing import NamedTuple

UNLABELLED = -1
"""The class index of a sample without a label (``predict``)."""


class Unreadable(NamedTuple):
    """A sample that could not be read, or failed its checks, and why."""

    path: str
    reason: str


class DataWarning(UserWarning):
    """Something in the data that the pipeline worked around: an unreadable sample skipped, an empty class folder,
    a small image upsampled, a truncated video used up to its last frame. The message names the file."""
