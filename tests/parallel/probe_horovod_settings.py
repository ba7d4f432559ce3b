"""Run under mpirun -np 2 by tests/test_horovod_settings.py: starts Horovod the way `hvdllm train`
does (runtime.start with the config's aggregation settings), then makes one grouped allreduce of 8
small tensors (fused or not: the timeline says) and times 6 blocking allreduces (each waits for
Horovod's next cycle). Prints `elapsed <seconds>` on rank 0."""
import os
import sys
import time

import numpy as np

from hvdllm import backends, config, runtime

be = backends.load(os.environ["HVDLLM_BACKEND"])
cfg = config.load(None, sys.argv[1:])
rt = runtime.start(be, cfg.aggregation)
coll = be.Collectives()
coll.grouped_allreduce([be.from_host(np.ones(1000, np.float32)) for _ in range(8)], name="probe.group")
t0 = time.perf_counter()
for i in range(6):
    be.to_host(coll.allreduce(be.from_host(np.ones(10, np.float32)), name=f"probe.{i}"))
if rt.rank == 0:
    print(f"elapsed {time.perf_counter() - t0:.3f}")
