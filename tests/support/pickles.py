"""A pickled payload that runs code when unpickled, for the tests that the safe checkpoint reader refuses it."""

from __future__ import annotations

import pathlib
from pathlib import Path


class TouchOnUnpickle:
    """A pickled payload: unpickling it calls ``Path.touch`` on ``marker``, as a malicious checkpoint would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))
