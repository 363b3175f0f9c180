"""The errors soho's commands report as one line rather than a traceback, each with its exit code.

``soho-pretrain`` and ``soho-finetune`` (soho/cli/train.py) and ``soho-evaluate`` print
``<command>: error: <message>`` and exit with :attr:`SohoError.exit_code`; docs/RELIABILITY.md lists the codes.
Any other exception is a bug and keeps its traceback (exit code 1).
"""
from __future__ import annotations


class SohoError(Exception):
    """An expected way for a run to end early, with a message that says what to do about it."""

    exit_code = 1


class UserError(SohoError):
    """Something the user gave soho cannot be used: a config value, a path, the data, a checkpoint, an output
    directory another run is writing. Checked before a run writes anything wherever it can be."""

    exit_code = 2


class TrainingDiverged(SohoError):
    """``train.max_nonfinite_steps`` steps in a row had a non-finite loss or gradient norm, or the weights
    stopped being finite: the run stops without writing them anywhere."""

    exit_code = 3


class Interrupted(SohoError):
    """SIGTERM or SIGINT stopped the run after it wrote a checkpoint: exit code 128 + the signal number, what a
    shell reports for a process the signal ended (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
