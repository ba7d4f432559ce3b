"""Sub-communicators: one per dp / pp / tp group of a Layout, and one per role.

Both functions are collective over `comm`: every rank of `comm` must call them, with the same
arguments, in the same order, or the job deadlocks in Split. They are deterministic (colors and
keys come only from the arguments), so ranks that agree on the Layout agree on the groups.
Call them once at start-up; the caller owns the returned communicators (`.Free()` them at exit).
"""
from __future__ import annotations

import hashlib


def subcomms(comm, layout, kind: str):
    """This rank's communicator for its `kind` group ('dp', 'pp', 'tp') of `layout`.

    color = index of the group in `layout.all_groups(kind)`; key = position within the group,
    so rank i of the returned communicator is `layout.group(kind)[i]`: group order, not world
    order, decides who is rank 0 (the one that broadcasts, the first pipeline stage).
    """
    if comm.Get_size() != layout.world_size or comm.Get_rank() != layout.rank:
        raise ValueError(f"layout ({layout.describe()}, rank {layout.rank}) does not describe "
                         f"this communicator (size {comm.Get_size()}, rank {comm.Get_rank()})")
    groups = layout.all_groups(kind)
    mine = layout.group(kind)
    color, key = groups.index(mine), mine.index(layout.rank)
    sub = comm.Split(color, key)
    sub.Set_name(f"{kind}{color}")
    return sub


def _roles(entry: str) -> list[str]:
    """'trainer+evaluator' -> ['evaluator', 'trainer']: a rank may hold several roles."""
    return sorted({r.strip() for r in entry.split("+") if r.strip()})


def split_roles(comm, role_of_rank: list[str]) -> dict:
    """{role: communicator of all ranks with that role} for each role this rank holds.

    `role_of_rank[r]` is rank r's role, or several joined by '+'. One Split per distinct role, in
    sorted order, with key = rank in `comm` (so sub-ranks keep world order). Every rank must pass
    the same list; that is checked first (a cheap allgather of a digest) because disagreeing
    lists would otherwise call Split a different number of times and hang.
    """
    from mpi4py import MPI

    if len(role_of_rank) != comm.Get_size():
        raise ValueError(f"role_of_rank has {len(role_of_rank)} entries for {comm.Get_size()} ranks")
    digest = hashlib.sha1("\n".join(role_of_rank).encode()).hexdigest()
    if len(set(comm.allgather(digest))) != 1:
        raise ValueError("ranks passed different role_of_rank lists to split_roles")
    rank = comm.Get_rank()
    mine = set(_roles(role_of_rank[rank]))
    out = {}
    for role in sorted({r for entry in role_of_rank for r in _roles(entry)}):
        sub = comm.Split(0 if role in mine else MPI.UNDEFINED, rank)
        if role in mine:
            sub.Set_name(role)
            out[role] = sub
    return out
