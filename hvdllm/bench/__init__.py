"""Benchmarks (not tests): `hvdllm bench WHAT [ARGS...]` runs `hvdllm.bench.WHAT.main(ARGS)`.

- dp: data-parallel step time against a hand-written Horovod loop (and DDP), scaling efficiency.
- aggregation: allreduce bus bandwidth, compression, ZeRO-1 memory and speed, local SGD traffic.
- pipeline: GPipe / 1F1B efficiency against the ideal, activation memory, Chrome traces.
- tensor: allreduces and bytes per tensor-parallel block against theory, tp=2 against np=1.
- ps: parameter-server sync / async / SSP with a straggler, trainer step time with an evaluator.
- hf: Hugging Face import time and memory per rank at tp = 1..N; llama vs gpt2 step time.
- calibrate: this node's achieved FLOP/s, collective and point-to-point bandwidth and latency,
  memory per device: the calibration JSON `hvdllm plan --calibration` reads.
- plan: `hvdllm plan`'s predicted step time and memory against real `hvdllm train` runs of
  layouts at np = 1, 2 and 4.

Each driver launches its `*_worker.py` under mpirun -- the command hvdllm.launch builds for
`hvdllm launch` -- and prints it. What they share (launching, timing, tables, JSON, the worker's
start-up through hvdllm.backends and parallelize.build_engine) lives in hvdllm/bench/common.py.
"""
