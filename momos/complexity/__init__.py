"""How complex are the weights: BDM equal to pybdm's, compressor proxies, and the MoMos bounds.

    from momos import complexity
    complexity.bdm(model)                             # paper protocol: sign bits of all trainable tensors
    complexity.bdm(tensor, symbols=2, ndim=1)         # ndim=2: 4x4 blocks of 2-D views; 4,5,6,9 symbols
    complexity.compressed_bits(model, codec="lzma")   # gzip / bz2 / lzma on the sign bits or float bytes
    complexity.description_length(packed_model)       # k*s*q + m*ceil(log2 k) per bank, and dense n*q
    complexity.ratio(trained, initial)                # the paper's Figure 2 quantity
    print(complexity.summary(model, initial=init, dense=dense))

On large models the global 1-D BDM saturates (every 12-bit block occurs) and its ratios tend to 1:
see `BlockCounts.saturated` and `summary`.
"""

from momos.complexity.bdm import (
    BlockCounts,
    MoMosDependencyError,
    bdm,
    block_counts,
    block_entropy,
    per_tensor_bdm,
    ratio,
)
from momos.complexity.bounds import (
    DescriptionLength,
    approximate_dense_ratio,
    canonical_mosaic,
    dense_ratio,
    description_bits,
    description_length,
    mosaic_matrix,
    num_components,
    stirling2,
    subspace_dimension,
)
from momos.complexity.compress import compressed_bits
from momos.complexity.payload import trainable_tensors
from momos.complexity.summary import ComplexitySummary, summary

__all__ = [
    "BlockCounts", "ComplexitySummary", "DescriptionLength", "MoMosDependencyError",
    "approximate_dense_ratio", "bdm", "block_counts", "block_entropy", "canonical_mosaic", "compressed_bits",
    "dense_ratio",
    "description_bits", "description_length", "mosaic_matrix", "num_components", "per_tensor_bdm", "ratio",
    "stirling2", "subspace_dimension", "summary", "trainable_tensors",
]
