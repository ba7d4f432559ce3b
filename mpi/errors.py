"""Errors of mpi/ (which imports nothing of hvdllm: hvdllm.errors re-exports these)."""


class PeerTimeout(TimeoutError):
    """A wait on another rank passed its deadline: that rank is lost or stuck."""

    exit_code = 1
