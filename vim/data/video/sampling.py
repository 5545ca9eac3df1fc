"""Which frames make a clip: segment-based sampling (TSN / VideoMamba's "sparse" sampling).

Training draws one frame at a random offset in each of ``num_frames`` equal segments; evaluation takes the frame at a
fixed offset of each segment, clip ``k`` of ``n`` at ``(k + 1) / (n + 1)`` of the segment.
"""

from __future__ import annotations

from typing import Protocol


class RandInt(Protocol):
    """A ``random.Random``, or the ``random`` module itself (its global generator, seeded per sample)."""

    def randint(self, a: int, b: int) -> int: ...


def segment_indices(
    num_available: int, num_frames: int, rng: RandInt | None = None, clip: int = 0, num_clips: int = 1
) -> list[int]:
    """Frame indices of one clip by segment-based sampling.

    The frames ``0 .. num_available - 1`` are cut into ``num_frames`` segments of ``s = (num_available - 1) / num_frames``
    frames. With ``rng`` (training) segment ``i`` gives a random frame in ``[round(s * i), round(s * (i + 1))]``;
    without, it gives ``round(s * i) + int(s * (clip + 1) / (num_clips + 1))``, so the ``num_clips`` test clips
    sit at evenly spaced offsets. Indices never pass the last frame; when ``num_available < num_frames`` frames repeat.
    """
    if num_available < 1 or num_frames < 1:
        raise ValueError(f"segment_indices needs num_available >= 1 and num_frames >= 1, got {num_available}, {num_frames}")
    segment = (num_available - 1) / num_frames
    last = num_available - 1
    if rng is not None:
        return [min(rng.randint(round(segment * i), round(segment * (i + 1))), last) for i in range(num_frames)]
    offset = int(segment * (clip + 1) / (num_clips + 1))
    return [min(round(segment * i) + offset, last) for i in range(num_frames)]
