"""Typed errors. Each says what to do; the CLI maps them to exit codes and ends every rank."""

# mpi/ raises it and imports nothing of hvdllm; a user-facing error like the ones below
# (USER_ERRORS), not a bug.
from mpi.errors import PeerTimeout


class HvdllmError(Exception):
    """Base class: an error a user can act on."""

    exit_code = 1


class ConfigError(HvdllmError):
    """The configuration is invalid. Raised once, listing every problem with the key to fix."""

    exit_code = 2

    def __init__(self, problems):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class LaunchError(HvdllmError):
    """The process was started in a way this strategy cannot run under (e.g. no MPI)."""


class CheckpointError(HvdllmError):
    """A checkpoint is missing, incomplete or does not match the model."""


class InjectedFailure(RuntimeError):
    """Raised by train.fail_at_step / a server's fail_at_update: proves that one failing rank
    ends the whole job (a bug-shaped error on purpose: it prints its traceback)."""


USER_ERRORS = (HvdllmError, PeerTimeout)
