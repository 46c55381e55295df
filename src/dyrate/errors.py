"""Typed exceptions. The CLI turns any DyrateError into one line on stderr and exit code 2."""


class DyrateError(Exception):
    """Base class of every error dyrate raises on bad input."""


class InputError(DyrateError, ValueError):
    """Bad user input: a missing or corrupt image, a malformed prompt, a bad option value."""


class PolicySpecError(DyrateError, ValueError):
    """An unknown policy name or bad policy parameters."""


class CheckpointError(DyrateError, ValueError):
    """A directory or file that is not a usable checkpoint (model or predictor)."""
