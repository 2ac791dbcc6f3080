"""Switches for the exact shortcuts: each gives the plain computation's result (up to float rounding)
with less work, or (``onednn_matmul``) on faster kernels. All are on; tests turn each off to prove
it changes nothing, and ``bench/e2e.py --plain NAME`` to measure what it saves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields


@dataclass
class Shortcuts:
    #: the condition's cross-attention keys and values once per sampling run, not per step
    condition_cache: bool = True
    #: a condition row whose tokens are all equal (the unconditional one) makes the cross-attention
    #: output independent of the query: computed once, not per step and token
    uniform_condition: bool = True
    #: the layers before the first cross-attention see only the latent and the time: with guidance
    #: they run once per latent, not once per condition
    shared_prefix: bool = True
    #: sparse convolutions add each kernel cell's products by gather, add and indexed copy (a cell
    #: reaches each voxel once), and pooling sums each coarse voxel's children by a gather: neither
    #: through torch's serial CPU scatter-add
    scatter_free: bool = True
    #: the neighbour maps of subdivided voxels (the mesh decoder's 128^3 and 256^3 levels) looked up
    #: from their parents' maps, not searched for
    subdivided_neighbours: bool = True
    #: fp32 matrix products on the CPU through oneDNN rather than MKL: not less work but the same
    #: work on the AVX-512 units MKL leaves idle on AMD CPUs (``modules/matmul.py``)
    onednn_matmul: bool = True


SHORTCUTS = Shortcuts()
NAMES = tuple(f.name for f in fields(Shortcuts))


@contextmanager
def plain(*names: str) -> Iterator[None]:
    """Turn the named shortcuts (all when none are named) off inside the block."""
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown shortcut(s) {sorted(unknown)}; known: {', '.join(NAMES)}")
    saved = {name: getattr(SHORTCUTS, name) for name in NAMES}
    for name in names or NAMES:
        setattr(SHORTCUTS, name, False)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(SHORTCUTS, name, value)
