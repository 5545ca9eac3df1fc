"""Helpers shared by the tests (importable because pyproject's pytest settings put tests/ on the path)."""
