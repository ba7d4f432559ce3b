"""hvdllm/flat.py (one flat vector for the model, its padding and its k shards) and
hvdllm/placement.py (where a slice or a range of a slice sits in the whole array)."""
import itertools

import numpy as np
import pytest

from hvdllm import placement
from hvdllm.flat import FlatLayout

LAYOUTS = [
    {"a": (3, 4)},
    {"w": (5, 7), "b": (7,), "s": (), "e": (2, 3, 4)},
    {"wte": (64, 8), "h.0.w": (8, 24), "h.0.b": (24,), "ln": (8,), "one": (1,)},
]


@pytest.mark.parametrize("shapes", LAYOUTS, ids=lambda s: "+".join(s))
def test_flatten_unflatten_round_trip_and_decay_mask(shapes):
    flat = FlatLayout(shapes)
    rng = np.random.default_rng(0)
    arrays = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    v = flat.flatten(arrays)
    assert v.dtype == np.float32 and v.shape == (flat.total,) == (sum(int(np.prod(s)) for s in shapes.values()),)
    np.testing.assert_array_equal(flat.flatten(list(arrays.values())), v)      # list in canonical order
    back = flat.unflatten(v)
    assert list(back) == list(shapes)
    for n, a in arrays.items():
        assert back[n].shape == tuple(shapes[n])
        np.testing.assert_array_equal(back[n], a)
    # offsets: parameter n occupies [offsets[i], offsets[i+1]), in order, without gaps
    assert flat.offsets[0] == 0 and flat.offsets[-1] == flat.total and np.all(np.diff(flat.offsets) >= 1)
    mask = flat.decay_mask()
    for i, (n, s) in enumerate(shapes.items()):
        assert mask[flat.offsets[i]:flat.offsets[i + 1]].tolist() == [len(s) >= 2] * int(np.prod(s))


@pytest.mark.parametrize("shapes", LAYOUTS, ids=lambda s: "+".join(s))
@pytest.mark.parametrize("k", list(range(1, 13)) + [16, 31, 64, 100])
def test_pad_and_shards_cover_every_element_exactly_once(shapes, k):
    flat = FlatLayout(shapes)
    padded = flat.padded_total(k)
    assert padded % k == 0 and flat.total <= padded < flat.total + k
    v = np.arange(1, flat.total + 1, dtype=np.float32)
    pv = flat.pad(v, k)
    assert pv.size == padded and np.array_equal(pv[:flat.total], v) and not pv[flat.total:].any()
    count = np.zeros(padded, int)
    ranges = [flat.shard_range(k, i) for i in range(k)]
    for lo, hi in ranges:
        assert hi - lo == padded // k
        count[lo:hi] += 1
    assert np.all(count == 1)
    assert ranges[0][0] == 0 and ranges[-1][1] == padded and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # the shards' elements, concatenated, are the padded vector (what an allgather rebuilds)
    np.testing.assert_array_equal(np.concatenate([pv[lo:hi] for lo, hi in ranges]), pv)
    assert flat.pad(pv, k) is pv      # already padded: returned as it is


# -- placement -------------------------------------------------------------------------------------
FULL = np.arange(6 * 12, dtype=np.float32).reshape(6, 12)
PLACEMENTS = [None] + [placement.make(axis, parts, i, groups) for axis, parts, groups in
                       [(0, 2, 1), (0, 3, 1), (1, 2, 1), (1, 4, 1), (1, 2, 3), (1, 4, 3)] for i in range(parts)]


def cuts(n, seed):
    rng = np.random.default_rng(seed)
    inner = sorted(set(rng.integers(1, n, size=min(n - 1, 3)).tolist())) if n > 1 else []
    return [0, *inner, n]


@pytest.mark.parametrize("pl", PLACEMENTS, ids=str)
def test_ranged_take_join_round_trip(pl):
    sl = placement.take(FULL, pl)
    n = sl.size
    for seed in range(4):
        c = cuts(n, seed)
        pieces = [(placement.take(FULL, placement.ranged(pl, a, b, sl.shape)), placement.ranged(pl, a, b, sl.shape))
                  for a, b in zip(c, c[1:])]
        for (arr, rpl), a, b in zip(pieces, c, c[1:]):
            np.testing.assert_array_equal(arr, sl.reshape(-1)[a:b])
            assert placement.base(rpl) == pl
            assert placement.global_shape(arr.shape, rpl) == FULL.shape
        np.testing.assert_array_equal(placement.join_ranges(pieces[::-1]), sl)   # any order
    assert placement.global_shape(sl.shape, pl) == FULL.shape


@pytest.mark.parametrize("axis,parts,groups", [(0, 2, 1), (0, 3, 1), (1, 2, 1), (1, 4, 3)])
def test_assemble_inverts_take_in_any_order(axis, parts, groups):
    slices = [(placement.take(FULL, placement.make(axis, parts, i, groups)), placement.make(axis, parts, i, groups))
              for i in range(parts)]
    for order in itertools.islice(itertools.permutations(slices), 6):
        np.testing.assert_array_equal(placement.assemble(list(order)), FULL)
    with pytest.raises(ValueError, match="do not cover"):
        placement.assemble(slices[1:])
    assert placement.make(axis, 1, 0, groups) is None


def test_fused_qkv_slice_takes_its_piece_of_every_block():
    """groups=3: [q | k | v] along the axis; tp rank i holds piece i of q, of k and of v."""
    pl = placement.make(1, 2, 1, 3)
    got = placement.take(FULL, pl)
    want = np.concatenate([FULL[:, 2:4], FULL[:, 6:8], FULL[:, 10:12]], axis=1)
    np.testing.assert_array_equal(got, want)


def test_join_ranges_duplicates_gaps_and_short_sets():
    sl = FULL.reshape(-1)
    shape = FULL.shape

    def piece(a, b):
        return sl[a:b], placement.ranged(None, a, b, shape)
    # a tied weight from two stages, cut at different places: any complete chain joins
    both = [piece(0, 30), piece(30, 72), piece(0, 10), piece(10, 50), piece(50, 72)]
    np.testing.assert_array_equal(placement.join_ranges(both), FULL)
    with pytest.raises(ValueError, match=r"leave elements \[30, 40\)"):
        placement.join_ranges([piece(0, 30), piece(40, 72)])
    with pytest.raises(ValueError, match="end at 50 of 72"):
        placement.join_ranges([piece(0, 20), piece(20, 50)])
