"""The one place lensprobe's version is written (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
"""lensprobe's version (PEP 440); the wheel's metadata and ``lensprobe --version`` read it."""
