"""mpi/: thin, typed wrappers over mpi4py for point-to-point traffic between ranks.

Pipeline stages, parameter servers and evaluators move bytes between two ranks with these;
Horovod handles collectives inside a group. Importing this package never initialises MPI and
works without mpi4py installed (mpi4py.MPI is imported inside the functions that need it), and
nothing here imports torch, tensorflow or horovod.
"""
from .groups import split_roles, subcomms
from .p2p import (
                  DTYPES,
                  HEADER_LEN,
                  KINDS,
                  MAX_TAG,
                  TIMEOUT_SETTING,
                  Mailbox,
                  Request,
                  decode_header,
                  describe_tag,
                  encode_header,
                  irecv,
                  isend,
                  poll_any,
                  recv_array,
                  recv_into,
                  recv_obj,
                  send,
                  send_array,
                  send_obj,
                  tag,
                  tag_ub,
                  wait,
                  waitall,
)

__all__ = ["DTYPES", "HEADER_LEN", "KINDS", "MAX_TAG", "TIMEOUT_SETTING", "Mailbox", "Request",
           "decode_header", "describe_tag", "encode_header", "irecv", "isend", "poll_any",
           "recv_array", "recv_into", "recv_obj", "send", "send_array", "send_obj", "split_roles",
           "subcomms", "tag", "tag_ub", "wait", "waitall"]
