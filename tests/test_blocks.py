import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momos.blocks import from_blocks, num_blocks, reconstruct, to_blocks

shapes = st.lists(st.integers(1, 7), min_size=1, max_size=4)


@given(shape=shapes, s=st.integers(1, 9))
def test_blocks_round_trip_and_pad_with_zeros(shape, s):
    t = torch.randn(shape)
    blocks = to_blocks(t, s)
    assert blocks.shape == (num_blocks(t.numel(), s), s) == (math.ceil(t.numel() / s), s)
    assert torch.equal(from_blocks(blocks, t.shape), t)
    assert torch.equal(blocks.reshape(-1)[t.numel():], torch.zeros(blocks.numel() - t.numel()))


@given(shape=shapes, s=st.integers(1, 6), k=st.integers(1, 5))
def test_reconstruction_drops_padding(shape, s, k):
    numel = math.prod(shape)
    motifs = torch.randn(k, s)
    mosaic = torch.randint(0, k, (num_blocks(numel, s),))
    w = reconstruct(motifs, mosaic, shape)
    assert w.shape == tuple(shape)
    # every real entry comes from the motif of its block, at its offset in the block
    flat = w.reshape(-1)
    for i in range(numel):
        assert flat[i] == motifs[mosaic[i // s], i % s]


def test_reconstruct_casts():
    w = reconstruct(torch.ones(2, 2, dtype=torch.float16), torch.tensor([1, 0]), (3,), dtype=torch.float32)
    assert w.dtype == torch.float32 and w.tolist() == [1.0, 1.0, 1.0]


@settings(max_examples=60, deadline=None)
@given(s=st.integers(1, 9), k=st.integers(1, 20), m=st.integers(0, 40),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_reconstruct_copies_each_motif_bit_for_bit(s: int, k: int, m: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(s * 1000 + k * 40 + m)
    motifs = torch.randn(k, s, generator=g).to(dtype)
    motifs[0, 0] = -0.0
    motifs[-1, -1] = float("nan")  # any bit pattern survives the gather as it is
    mosaic = torch.randint(0, k, (m,), generator=g)
    got = reconstruct(motifs, mosaic, (m * s,))
    want = motifs[mosaic].reshape(-1)
    assert got.dtype == dtype
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(got.view(bits), want.view(bits))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, s=st.integers(1, 6), k=st.integers(1, 5), layout=st.sampled_from(["contiguous", "offset",
                                                                                          "transposed"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]))
def test_reconstruct_into_out_equals_reconstruct(shape, s, k, layout, dtype):
    """Written into `out` (padding cut, an offset storage, a transposed view alike), bit for bit."""
    numel = math.prod(shape)
    motifs = torch.randn(k, s).to(dtype)
    motifs[0, 0] = -0.0
    mosaic = torch.randint(0, k, (num_blocks(numel, s),))
    want = reconstruct(motifs, mosaic, shape)
    if layout == "offset":
        out = torch.full((numel + 1,), 7.0, dtype=dtype)[1:].view(shape)
    elif layout == "transposed" and len(shape) == 2:
        out = torch.full(tuple(shape)[::-1], 7.0, dtype=dtype).T
    else:
        out = torch.full(tuple(shape), 7.0, dtype=dtype)
    got = reconstruct(motifs, mosaic, shape, out=out)
    assert got is out
    # Compared as integers of the same width: -0.0 and every bit pattern count (a byte view would need a unit
    # stride, which a size-1 dimension of a "contiguous" transposed view need not have).
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(got.view(bits), want.view(bits))
