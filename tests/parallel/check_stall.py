"""Ranks that call collectives in different orders: rank 0 waits on 'a', rank 1 on 'b'.
Horovod's stall inspector must end the job within HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, on every
launcher. Under MPI the ranks see Horovod's exception. Under Gloo Horovod's shutdown itself
stalls, so hvdllm's own Watchdog deadline (what the trainer wraps every step in) ends the job.
Either way this script must not exit 0 and must not hang."""
import os
import sys

import numpy as np

from hvdllm import runtime
from hvdllm.backends import load as load_backend

be = load_backend(os.environ.get("HVDLLM_BACKEND", "torch"))
rt = runtime.start(be)
nc = be.collectives.NumpyCollectives(be.Collectives())
watchdog = runtime.Watchdog(rt)
try:
    with watchdog.deadline(20, "the mismatched allreduce"):
        nc.allreduce(np.zeros(2, np.float32), name="order.a" if rt.rank == 0 else "order.b")
except Exception as e:  # noqa: the point is to show which error arrives
    print(f"rank {rt.rank}: {type(e).__name__}: {e}", flush=True)
    sys.exit(3)
print(f"rank {rt.rank}: no error", flush=True)
