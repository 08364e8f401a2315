"""Errors that reach the user as one line and a non-zero exit code.

`UserError` is for bad input (unknown names, missing files, bad checkpoints): the CLI prints its message
and exits 2 before any record is written. `ModelFailure` is raised while one model is evaluated (a
diverging sampler, non-finite log-likelihoods): the runner writes a `failed` record for that model and
goes on with the others.
"""

from __future__ import annotations


class BenchError(Exception):
    """Base class: the message is meant for the user, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class UserError(BenchError):
    """Bad input from the user: exit 2, nothing written."""


class UnknownNameError(UserError):
    def __init__(self, kind: str, name: str, choices):
        choices = sorted(choices)
        super().__init__(f"unknown {kind} '{name}'; valid choices: {', '.join(choices)}")
        self.kind, self.name, self.choices = kind, name, choices


class DataNotFoundError(UserError):
    pass


class CheckpointError(UserError):
    pass


class ModelFailure(BenchError):
    """A model failed during training or evaluation; recorded as a failed record."""

    exit_code = 1


class NonFiniteError(ModelFailure):
    pass


class WriteFailure(BenchError):
    """A result could not be written (a full disk, a lost mount): that result is lost, the run goes on."""

    exit_code = 1


class DistributedFailure(BenchError):
    """A rank of a torchrun job failed or lost contact: the whole run stops and no record is written."""

    exit_code = 1
