"""Benchmarks (not tests): `hvdllm bench WHAT [ARGS...]` runs `hvdllm.bench.WHAT.main(ARGS)`.

- dp: data-parallel step time of hvdllm against a hand-written Horovod loop (and, for torch,
  DistributedDataParallel), plus weak-scaling efficiency; see hvdllm/bench/dp.py.

Shared timing, table and JSON helpers live in hvdllm/bench/common.py.
"""
