"""Errors lensprobe raises. Each message names the problem and the fix."""


class LensprobeError(Exception):
    """Base class of every error lensprobe raises on purpose."""


class ModelError(LensprobeError, TypeError):
    """The object is not a model lensprobe can analyse (or cannot be loaded/saved)."""


class InputError(LensprobeError, ValueError):
    """Bad input: tokens, hook names, layers, heads, dtypes, devices."""


class NonFiniteError(LensprobeError, FloatingPointError):
    """NaN or inf appeared in activations or results."""
