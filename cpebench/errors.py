"""Errors a user can act on. Each message names the file, row, option or key at fault."""

from __future__ import annotations


class CpebenchError(Exception):
    """Base class: the CLI prints these as one clear line, never as a traceback."""


class ConfigError(CpebenchError):
    """A YAML file, preset or CLI override is invalid."""


class DataError(CpebenchError):
    """A prompt/data file is missing, malformed or fails its checksum."""


class ModelLoadError(CpebenchError):
    """A model id/dir cannot be loaded, or is not an SD-1.x pipeline."""


class RegistryError(CpebenchError):
    """An unknown method/metric/task name."""


class RunStateError(CpebenchError):
    """A run directory conflicts with the requested run."""
