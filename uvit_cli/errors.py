"""Exceptions the library raises; the CLI turns each into one line and an exit code. Stdlib only."""

from __future__ import annotations


class UvitError(Exception):
    """Base class: a problem the user can act on. `exit_code` is what the CLI exits with."""

    exit_code: int = 1


class ConfigError(UvitError):
    """A preset or override that does not validate (unknown key, wrong type, missing file)."""

    exit_code = 2


class CheckpointError(UvitError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""

    exit_code = 2


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint whose keys or shapes do not fit the model built from the preset."""


class WeightsNotFoundError(UvitError):
    """Pretrained weights (VAE, CLIP, Inception) that could not be found locally."""

    exit_code = 2


class DataError(UvitError):
    """A data set, shard directory or input file that is missing, empty or inconsistent."""

    exit_code = 2


class TrainingDiverged(UvitError):
    """The loss became NaN or inf; the last good checkpoint is kept."""

    exit_code = 3


class ResourceError(UvitError):
    """A request that cannot fit in this machine's memory or on its disk, refused before allocating."""

    exit_code = 2
