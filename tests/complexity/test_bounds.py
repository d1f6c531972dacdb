"""The bounds of MOMOS.md as properties that real MoMos tensors and brute-force enumerations must satisfy."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import momos
from momos import complexity
from momos.blocks import num_blocks, reconstruct
from momos.complexity.bounds import header_bits
from momos.config import index_bits
from momos.io.format import pack_bits, unpack_bits
from momos.nn.packed import packed_tensors
from momos.nn.parametrize import prepared_tensors

TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Holder(nn.Module):
    """One trainable tensor of a given shape."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(36, 9), nn.LayerNorm(9), nn.Linear(9, 3))


def witness(model: nn.Module) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A concrete description of the MoMos tensors of a packed model, and what it decodes to.

    Header fields at 64 bits; per bank its table in the motif dtype, then the mosaics of its tensors as one
    stream of ceil(log2 k)-bit indices (momos.io.format's bit packing).
    """
    banks: dict[int, list] = {}
    for name, tensor in packed_tensors(model):
        banks.setdefault(id(tensor.table), []).append((name, tensor))
    parts, decoded = [], {}
    for members in banks.values():
        table = members[0][1].table
        k, s = table.num_motifs, table.block_size
        motifs = table.motifs
        assert motifs.element_size() * 8 == table.config.motif_bits  # stored at q bits
        parts.append(np.array([k, s, motifs.element_size()], "<i8").tobytes())
        for _, t in members:
            parts.append(np.array([0, len(t.shape), *t.shape], "<i8").tobytes())
        table_bytes = motifs.contiguous().view(torch.uint8).numpy().tobytes()
        stream = pack_bits(np.concatenate([t.mosaic.numpy().astype(np.int64) for _, t in members]), index_bits(k))
        parts += [table_bytes, stream]
        # decode from the bytes alone
        back = torch.frombuffer(bytearray(table_bytes), dtype=torch.uint8).view(motifs.dtype).view(k, s)
        indices = torch.from_numpy(unpack_bits(stream, sum(t.num_blocks for _, t in members), index_bits(k))
                                   .astype(np.int64))
        start = 0
        for name, t in members:
            decoded[name] = reconstruct(back, indices[start:start + t.num_blocks], t.shape, dtype=t.dtype)
            start += t.num_blocks
    return b"".join(parts), decoded


@settings(max_examples=25, deadline=None)
@given(block_size=st.integers(1, 9), capacity=st.sampled_from([0.01, 0.05, 0.2, 0.7, 1.0]),
       dtype=st.sampled_from(sorted(TORCH)), scope=st.sampled_from(["global", "tensor"]),
       force_zero=st.booleans(), seed=st.integers(0, 3))
def test_prop_3_3_description_length_of_real_packed_models(block_size: int, capacity: float, dtype: str,
                                                           scope: str, force_zero: bool, seed: int) -> None:
    """Prop 3.3: a packed model's MoMos tensors are exactly recovered from a description of at most
    sum over banks of ``k*s*q + m*ceil(log2 k)`` bits plus ζ = 64 bits per header field (3 per bank,
    2 + ndim per tensor) + 8 bits of byte alignment per bank; and that bound is tight to the alignment."""
    config = momos.MoMosConfig(block_size=block_size, capacity=capacity, motif_dtype=dtype, scope=scope,
                               force_zero=force_zero, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", momos.MoMosWarning)  # tensors of a zero-only bank stay dense
        try:
            model = momos.prepare(small_net(seed), config)
        except momos.MoMosSelectionError:
            assume(False)  # every bank would hold only the zero motif: nothing is packed
    momos.refresh(model)
    packed = momos.convert(model)
    data, decoded = witness(packed)
    for name, tensor in packed_tensors(packed):
        assert torch.equal(decoded[name], tensor())
    bound = complexity.description_length(packed)
    assert 8 * len(data) <= bound.bits
    assert bound.bits - 8 * len(data) <= 8 * len(bound.banks)
    for bank in bound.banks:
        assert bank.ratio == (bank.num_motifs * block_size * bank.motif_bits
                              + bank.num_blocks * index_bits(bank.num_motifs)) / (bank.numel * bank.motif_bits)


def test_description_length_refuses_unconverted_models() -> None:
    with pytest.raises(momos.MoMosStateError, match="convert"):
        complexity.description_length(small_net(0))


@settings(max_examples=300, deadline=None)
@given(numel=st.integers(1, 200_000), block_size=st.integers(1, 32),
       capacity=st.floats(0.001, 1.0, allow_nan=False), motif_bits=st.sampled_from([16, 32]))
def test_cor_3_4_ratio_to_dense_is_c_plus_index_bits_over_sq(numel: int, block_size: int, capacity: float,
                                                              motif_bits: int) -> None:
    """Cor 3.4: with k = floor(c*m) >= 1 and p = m*s - n padded entries, the exact ratio
    (k*s*q + m*b)/(n*q) differs from c + b/(s*q) by less than (s + p*(c + b/(s*q)))/n, equals it when there
    is no rounding, and so MoMos is shorter than dense whenever c + b/(s*q) is below 1 by more than that."""
    m = num_blocks(numel, block_size)
    config = momos.MoMosConfig(block_size=block_size, capacity=capacity)
    k = config.num_motifs_for(m)
    if math.floor(capacity * m + 1e-9) < 1:  # clamped to one motif: the corollary's k = c*m does not hold
        return
    exact = complexity.dense_ratio(k, block_size, m, numel, motif_bits)
    approx = complexity.approximate_dense_ratio(capacity, k, block_size, motif_bits)
    padding = m * block_size - numel
    tolerance = (block_size + padding * approx) / numel + 1e-9
    assert abs(exact - approx) <= tolerance
    if padding == 0 and k == capacity * m:
        assert exact == pytest.approx(approx, rel=1e-12)
    if approx < 1 - tolerance:
        assert exact < 1
    if approx > 1 + tolerance:
        assert exact > 1


@settings(max_examples=100, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 12), s=st.integers(1, 6), pad=st.integers(0, 5),
       alpha=st.floats(-10, 10), beta=st.floats(-10, 10), seed=st.integers(0, 2**31))
def test_lemma_3_5_reconstruction_is_linear_in_the_bank(m: int, k: int, s: int, pad: int, alpha: float,
                                                        beta: float, seed: int) -> None:
    """Lemma 3.5: for a fixed mosaic M, Ŵ(a*Z1 + b*Z2, M) = a*Ŵ(Z1, M) + b*Ŵ(Z2, M), and Ŵ(Z, M) = A_M vec(Z)."""
    g = torch.Generator().manual_seed(seed)
    numel = max(1, m * s - min(pad, s - 1))
    mosaic = torch.randint(0, k, (m,), generator=g)
    z1, z2 = torch.randn(k, s, generator=g, dtype=torch.float64), torch.randn(k, s, generator=g, dtype=torch.float64)
    shape = (numel,)
    combined = reconstruct(alpha * z1 + beta * z2, mosaic, shape)
    separate = alpha * reconstruct(z1, mosaic, shape) + beta * reconstruct(z2, mosaic, shape)
    assert torch.allclose(combined, separate, rtol=1e-12, atol=1e-12)
    assert torch.equal(complexity.mosaic_matrix(mosaic, k, s, numel) @ z1.reshape(-1), reconstruct(z1, mosaic, shape))


def free_matrix(mosaic: torch.Tensor, k: int, s: int, numel: int, force_zero: bool) -> torch.Tensor:
    """A_M without the forced zero motif's columns: its column space is V_M."""
    matrix = complexity.mosaic_matrix(mosaic, k, s, numel)
    return matrix[:, s:] if force_zero else matrix


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from([(7,), (5, 6), (3, 4, 5), (24,), (2, 9)]), block_size=st.integers(1, 5),
       num_motifs=st.integers(1, 10), force_zero=st.booleans(), seed=st.integers(0, 100))
def test_prop_3_6_refreshed_weights_lie_in_their_mosaics_subspace(shape: tuple[int, ...], block_size: int,
                                                                 num_motifs: int, force_zero: bool,
                                                                 seed: int) -> None:
    """Prop 3.6: a refreshed tensor lies in V_M for its mosaic M, whose dimension (the rank of A_M's free
    columns) is the number of distinct (motif, offset) pairs read, i.e. s * distinct free labels when s | n."""
    config = momos.MoMosConfig(block_size=block_size, num_motifs=num_motifs, force_zero=force_zero, seed=seed,
                               targets="all")
    assume(config.num_motifs_for(num_blocks(math.prod(shape), block_size)) > force_zero)  # else left dense
    model = momos.prepare(Holder(shape, seed), config)
    momos.refresh(model)
    (_, param, weight), = prepared_tensors(model)
    k, numel = param.bank.num_motifs, weight.numel()
    basis = free_matrix(param.mosaic, k, block_size, numel, force_zero)
    dimension = complexity.subspace_dimension(param.mosaic, block_size, numel, force_zero)
    assert torch.linalg.matrix_rank(basis) == dimension
    stacked = torch.cat([basis, weight.detach().reshape(-1, 1).double()], dim=1)
    assert torch.linalg.matrix_rank(stacked) == dimension
    if numel % block_size == 0:
        labels = set(param.mosaic.tolist()) - ({0} if force_zero else set())
        assert dimension == block_size * len(labels)


def subspace_key(mosaic: torch.Tensor, k: int, s: int, numel: int, force_zero: bool) -> bytes:
    """The orthogonal projector onto V_M, rounded: equal keys <=> equal subspaces."""
    a = free_matrix(mosaic, k, s, numel, force_zero).numpy()
    projector = a @ np.linalg.pinv(a) if a.size else np.zeros((numel, numel))
    return (np.round(projector, 6) + 0.0).tobytes()  # + 0.0 turns -0.0 into 0.0


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 4), s=st.integers(1, 2), padded=st.booleans(), force_zero=st.booleans())
def test_prop_3_7_components_are_partitions_counted_by_stirling_numbers(m: int, k: int, s: int, padded: bool,
                                                                        force_zero: bool) -> None:
    """Prop 3.7 / Def 3.8, by enumerating all k**m mosaics: two mosaics span the same subspace iff they
    induce the same partition (canonical_mosaic), and the number of distinct subspaces is
    sum_{j=1..k} S(m, j), or sum_{j=1..k} S(m+1, j) with a forced zero motif."""
    numel = m * s - (1 if padded and s > 1 else 0)
    by_partition: dict[tuple[int, ...], bytes] = {}
    subspaces = set()
    for labels in itertools.product(range(k), repeat=m):
        mosaic = torch.tensor(labels)
        key = subspace_key(mosaic, k, s, numel, force_zero)
        subspaces.add(key)
        assert by_partition.setdefault(complexity.canonical_mosaic(mosaic, force_zero), key) == key
    assert len(set(by_partition.values())) == len(by_partition) == len(subspaces)  # a bijection
    assert len(subspaces) == complexity.num_components(m, k, force_zero)
    items = m + 1 if force_zero else m
    assert complexity.num_components(m, k, force_zero) == sum(complexity.stirling2(items, j) for j in range(1, k + 1))


@given(n=st.integers(0, 30), j=st.integers(0, 12))
def test_stirling_numbers_match_the_explicit_formula(n: int, j: int) -> None:
    explicit = sum((-1) ** i * math.comb(j, i) * (j - i) ** n for i in range(j + 1)) // math.factorial(j)
    assert complexity.stirling2(n, j) == explicit


@settings(max_examples=200, deadline=None)
@given(m=st.integers(1, 80), k=st.integers(1, 10), force_zero=st.booleans())
def test_cor_3_9_component_count_grows_exponentially(m: int, k: int, force_zero: bool) -> None:
    """Cor 3.9: for k >= 2 the count at least doubles (and at most multiplies by k) with each extra block,
    so it is at least 2**(m-1); for one motif it stays 1."""
    now, after = complexity.num_components(m, k, force_zero), complexity.num_components(m + 1, k, force_zero)
    if k == 1:
        assert now == after == 1
        return
    assert 2 * now <= after <= k * now
    assert now >= 2 ** (m - 1)


def test_header_bits_do_not_grow_with_the_tensor_size() -> None:
    small = momos.convert(momos.prepare(Holder((8, 8), 0), momos.MoMosConfig(num_motifs=4)))
    large = momos.convert(momos.prepare(Holder((80, 80), 0), momos.MoMosConfig(num_motifs=4)))
    assert complexity.description_length(small).header_bits == complexity.description_length(large).header_bits
    assert header_bits(1, [2]) == 64 * (3 + 2 + 2) + 8
