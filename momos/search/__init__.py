"""Nearest-motif search: every engine answers the same exact question (float64 D, lowest index on ties).

- `nearest` / `MotifSearch` (`assign`): one bank, any blocks; brute force in torch, faiss, or the KD-tree.
- `MosaicTracker` (`incremental`): blocks that move a little at a time (the STE forward), same answers.
- `MotifTree` (`kdtree`): the compiled KD-tree both use on CPU.

The compiled loops live in one private module, `_compiled`, that imports no other momos module: numba
checks only a cached function's own source file, so nothing they compile in may come from elsewhere.
"""

from momos.search.assign import ENGINES, MotifSearch, choose_engine, nearest
from momos.search.incremental import MosaicTracker, nearest_op
from momos.search.kdtree import MotifTree

__all__ = ["ENGINES", "MosaicTracker", "MotifSearch", "MotifTree", "choose_engine", "nearest", "nearest_op"]
