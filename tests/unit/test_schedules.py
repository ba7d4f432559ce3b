"""Pipeline schedules: structure, dependencies, deadlock freedom, bubble and memory, traces."""
import json

import pytest

from hvdllm.strategies.schedules import (
    COMPUTE,
    Instr,
    ScheduleDeadlock,
    build,
    gpipe,
    ideal_bubble,
    interleaved_1f1b,
    one_f_one_b,
    simulate,
    to_chrome_trace,
    validate_schedule,
)

PS = [1, 2, 3, 4]
MS = [1, 2, 3, 4, 8, 16]
V = 2
CASES = [(name, p, m, 1) for name in ("gpipe", "1f1b") for p in PS for m in MS]
CASES += [("interleaved", p, m, V) for p in PS for m in MS if m % p == 0]


def stages(name, p, m, v=1):
    return [build(name, p, m, s, v) for s in range(p)]


def ids(case):
    return "{}-p{}-m{}-v{}".format(*case)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_each_microbatch_runs_forward_and_backward_once_per_chunk(case):
    name, p, m, v = case
    sch = stages(name, p, m, v)
    validate_schedule(sch, p, m, v)
    for s, instrs in enumerate(sch):
        for op in COMPUTE:
            got = sorted((i.mb, i.chunk) for i in instrs if i.op == op)
            assert got == sorted((mb, c) for mb in range(m) for c in range(v)), (s, op)
        assert [i.op for i in instrs[-2:]] == ["reduce_grads", "step"]


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_first_and_last_virtual_stage_messages(case):
    name, p, m, v = case
    sch = stages(name, p, m, v)
    first, last = sch[0], sch[p - 1]
    assert not any(i.op in ("recv_act", "send_grad") and i.chunk == 0 for i in first)
    assert not any(i.op in ("send_act", "recv_grad") and i.chunk == v - 1 for i in last)
    if p == 1:  # chunks on one rank pass tensors in memory
        assert all(i.op in COMPUTE + ("reduce_grads", "step") for i in first)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_simulation_respects_dependencies(case):
    name, p, m, v = case
    res = simulate(stages(name, p, m, v), p, v)
    t = {}
    for s, tl in enumerate(res.timelines):
        for e in tl:
            if e.op in COMPUTE:
                t[(e.op, e.mb, e.chunk * p + s)] = (e.start, e.end)
    last = p * v - 1
    for mb in range(m):
        for vs in range(p * v):
            f, b = t[("forward", mb, vs)], t[("backward", mb, vs)]
            assert f[1] <= b[0]
            if vs > 0:
                assert t[("forward", mb, vs - 1)][1] <= f[0]
            if vs < last:
                assert t[("backward", mb, vs + 1)][1] <= b[0]
    for tl in res.timelines:  # a stage does one thing at a time
        assert all(a.end <= b.start + 1e-12 for a, b in zip(tl, tl[1:]))


def expected_makespan(name, p, m, v, comm):
    """Buffered sends, forward 1 and backward 2 per micro-batch per stage (1/v per chunk).
    Without communication cost every schedule reaches its ideal bubble: makespan
    3 * (m + (p - 1) / v). Each message then costs `comm` on the critical path once per hop it
    crosses: GPipe's first forward and last backward cross the p - 1 links each way; the
    interleaved schedule's cross its p*v - 1 virtual-stage links each way; 1F1B's steady state
    also waits for each micro-batch's gradient round trip on the last link, so its path takes
    max(m + p - 3, p - 1) round trips. One stage (p == 1) sends nothing."""
    ideal = 3.0 * (m + (p - 1) / v)
    if p == 1 or comm == 0:
        return ideal
    round_trips = {"gpipe": p - 1, "1f1b": max(m + p - 3, p - 1), "interleaved": p * v - 1}[name]
    return ideal + 2 * comm * round_trips


@pytest.mark.parametrize("comm", [0.0, 0.25])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_no_deadlock_with_buffered_sends(case, comm):
    """Runs to the end, in exactly the expected time, each stage busy 3m of it."""
    name, p, m, v = case
    res = simulate(stages(name, p, m, v), p, v, comm_time=comm, buffered=True)
    assert res.makespan == pytest.approx(expected_makespan(name, p, m, v, comm), abs=1e-9)
    assert res.bubble == pytest.approx(1 - 3.0 * m / res.makespan, abs=1e-9)
    for tl in res.timelines:
        assert sum(e.end - e.start for e in tl if e.op in COMPUTE) == pytest.approx(3.0 * m)
    if comm == 0:
        assert res.bubble == pytest.approx(ideal_bubble(p, m, v), abs=1e-9)


@pytest.mark.parametrize("comm", [0.0, 0.25])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "interleaved"], ids=ids)
def test_gpipe_and_1f1b_survive_rendezvous_sends(case, comm):
    """Blocking (unbuffered, MPI_Ssend-like) sends: the message order in each gap is safe."""
    name, p, m, v = case
    buffered = simulate(stages(name, p, m), p, comm_time=comm)
    rendezvous = simulate(stages(name, p, m), p, comm_time=comm, buffered=False)
    if comm == 0.0:
        assert rendezvous.makespan == pytest.approx(buffered.makespan)
    else:   # a sender now waits for its receiver too: never faster, and slower once messages cost
        assert rendezvous.makespan >= buffered.makespan - 1e-9
        assert (rendezvous.makespan > buffered.makespan + 1e-9) == (p > 1 and m > 1)
    for tl in rendezvous.timelines:
        assert sum(e.end - e.start for e in tl if e.op in COMPUTE) == pytest.approx(3.0 * m)


def test_interleaved_needs_non_blocking_sends():
    """Interleaved sends activations several micro-batches ahead of the gradients its
    neighbour sends first, so blocking rendezvous sends deadlock (Megatron uses batched
    isend/irecv); with buffered sends it runs (checked above). p == 1 has no messages."""
    with pytest.raises(ScheduleDeadlock):
        simulate(stages("interleaved", 2, 4, 2), 2, 2, buffered=False)
    simulate(stages("interleaved", 1, 4, 2), 1, 2, buffered=False)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("m", MS)
def test_peak_inflight_activations(p, m):
    assert simulate(stages("gpipe", p, m), p).peak_inflight == [m] * p
    peak = simulate(stages("1f1b", p, m), p).peak_inflight
    assert peak == [min(p - s, m) for s in range(p)]
    assert all(k <= p - s for s, k in enumerate(peak))


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("m", MS)
def test_bubble_of_gpipe_and_1f1b_is_ideal(p, m):
    for name in ("gpipe", "1f1b"):
        res = simulate(stages(name, p, m), p, fwd_time=1.0, bwd_time=2.0, comm_time=0.0)
        assert abs(res.bubble - (p - 1) / (m + p - 1)) < 1e-9, name
        assert abs(res.bubble - ideal_bubble(p, m)) < 1e-9
        assert res.makespan == pytest.approx((m + p - 1) * 3.0)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "interleaved"], ids=ids)
def test_interleaved_bubble_is_ideal_and_beats_1f1b(case):
    """With m % p == 0, no comm cost and a chunk costing 1/v of a stage, the simulated
    interleaved bubble is exactly (p-1)/(v*m+p-1): strictly below 1F1B's when p > 1."""
    _, p, m, v = case
    res = simulate(stages("interleaved", p, m, v), p, v)
    assert abs(res.bubble - ideal_bubble(p, m, v)) < 1e-9
    flat = simulate(stages("1f1b", p, m), p)
    if p > 1:
        assert res.bubble < flat.bubble and res.makespan < flat.makespan
    assert res.peak_inflight == [min(2 * (p - s - 1) + (v - 1) * p + 1, m * v) for s in range(p)]


@pytest.mark.parametrize("p", [2, 3, 4])
def test_fewer_microbatches_than_stages(p):
    for m in range(1, p):
        for name in ("gpipe", "1f1b"):
            sch = stages(name, p, m)
            validate_schedule(sch, p, m)
            for buffered in (True, False):
                res = simulate(sch, p, buffered=buffered)
                assert abs(res.bubble - ideal_bubble(p, m)) < 1e-9


def test_gpipe_runs_backwards_in_reverse_and_1f1b_alternates():
    assert [i for i in gpipe(2, 3, 1) if i.op in COMPUTE] == [
        Instr("forward", 0), Instr("forward", 1), Instr("forward", 2),
        Instr("backward", 2), Instr("backward", 1), Instr("backward", 0)]
    assert [(i.op[0], i.mb) for i in one_f_one_b(3, 4, 0) if i.op in COMPUTE] == [
        ("f", 0), ("f", 1), ("f", 2), ("b", 0), ("f", 3), ("b", 1), ("b", 2), ("b", 3)]
    assert one_f_one_b(2, 1, 0) == [Instr("forward", 0), Instr("send_act", 0), Instr("recv_grad", 0),
                                    Instr("backward", 0), Instr("reduce_grads"), Instr("step")]


def test_swapped_instructions_deadlock():
    """Stage 0 waits for a gradient before sending the activation that produces it."""
    sch = stages("1f1b", 2, 2)
    s0 = sch[0]
    a, b = s0.index(Instr("send_act", 0)), s0.index(Instr("recv_grad", 0))
    s0[a], s0[b] = s0[b], s0[a]
    validate_schedule(sch, 2, 2)  # locally each stage still looks fine
    for buffered in (True, False):
        with pytest.raises(ScheduleDeadlock) as err:
            simulate(sch, 2, buffered=buffered)
        assert err.value.stuck == {0: Instr("recv_grad", 0), 1: Instr("recv_act", 0)}
        assert "stage 0: waiting in recv_grad(mb=0, chunk=0)" in str(err.value)


def test_naive_message_order_deadlocks_only_without_buffering():
    """Sending the gradient before receiving the next activation (the obvious order) makes
    both neighbours block in a send: fine with buffering, a deadlock with rendezvous."""
    p, m = 2, 4
    sch = stages("1f1b", p, m)
    for s in range(p):
        for n in range(len(sch[s]) - 1):
            if sch[s][n].op == "recv_act" and sch[s][n + 1].op == "send_grad":
                sch[s][n], sch[s][n + 1] = sch[s][n + 1], sch[s][n]
    simulate(sch, p, buffered=True)
    with pytest.raises(ScheduleDeadlock):
        simulate(sch, p, buffered=False)


def test_compute_without_input_is_invalid():
    sch = stages("gpipe", 2, 1)
    sch[1].remove(Instr("recv_act", 0))
    with pytest.raises(ValueError, match="recv_act"):
        validate_schedule(sch, 2, 1)
    with pytest.raises(ValueError, match="input activation"):
        simulate(sch, 2)


def test_validate_reports_problems():
    sch = stages("1f1b", 2, 2)
    sch[0] = [i for i in sch[0] if i != Instr("backward", 1)]
    sch[1] = sch[1][:-1]
    with pytest.raises(ValueError) as err:
        validate_schedule(sch, 2, 2)
    assert "backward(mb=1, chunk=0) appears 0x" in str(err.value)
    assert "stage 1: must end with" in str(err.value)
    with pytest.raises(ValueError, match="expected 3 stage"):
        validate_schedule(sch, 3, 2)


def test_argument_errors():
    with pytest.raises(ValueError, match="parallel.schedule"):
        build("zero-bubble", 2, 4, 0)
    with pytest.raises(ValueError, match="multiple of the number of stages"):
        interleaved_1f1b(4, 6, 0, 2)
    with pytest.raises(ValueError, match="stage 2 out of range"):
        build("gpipe", 2, 4, 2)
    with pytest.raises(ValueError, match="unknown pipeline instruction"):
        Instr("fwd", 0)
    with pytest.raises(ValueError, match="parallel.schedule"):
        build("1f1b", 2, 4, 0, v=2)
    assert interleaved_1f1b(3, 5, 1, 1) == one_f_one_b(3, 5, 1)
    assert ideal_bubble(4, 8, 2) == pytest.approx(3 / 19)


def test_chrome_trace():
    p, m, v = 4, 8, 2
    res = simulate(stages("interleaved", p, m, v), p, v, comm_time=0.1)
    trace = json.loads(json.dumps(to_chrome_trace(res)))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == sum(i.op in COMPUTE for s in stages("interleaved", p, m, v) for i in s) == 2 * p * m * v
    assert {e["tid"] for e in xs} == set(range(p))
    names = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    assert [e["args"]["name"] for e in names] == [f"stage {s}" for s in range(p)]
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in xs)
    assert max(e["ts"] + e["dur"] for e in xs) == pytest.approx(res.makespan * 1000)
