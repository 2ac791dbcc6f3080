"""Lookup tables for FlexiCubes (Dual Marching Cubes case tables), generated at import.

Conventions (they must agree with the mesh decoder's feature layout):

* Corner ``i`` of a cube sits at offset ``(i & 1, (i >> 1) & 1, (i >> 2) & 1)`` in (x, y, z).
* A cube's 12 edges are listed in :data:`EDGES` as (corner, corner) pairs.  Every grid edge is
  named with the same endpoint order by all cubes that share it (x and z edges run from the
  low to the high end, y edges from the high to the low end), so a pair of global vertex ids
  identifies an edge uniquely.
* The case id of a cube is ``sum(2**i for each corner i with sdf < 0)``.

Instead of shipping the 256-entry tables as literals they are derived from the rule they
encode, which keeps them short and auditable:

* Every connected patch of surface inside a cube becomes one dual vertex.  Its edge group is a
  connected component of the sign-changing edges, where two edges on a common face are linked
  when the iso-line on that face joins them.  On an ambiguous face (diagonal corners equal) the
  inside corners are kept apart, i.e. the edges are paired around each inside corner.
* Groups are listed by the smallest inside corner they touch (a single case, 231, lists them the
  other way round in the original tables; kept so vertex order matches the reference), and
  each group's edges are in increasing order (that order is also the summation order).
* Cases with 5 or 6 inside corners and exactly one ambiguous face may need to be inverted
  (case -> 255 - case) when the neighbouring cube across that face is such a case too
  (cases C16/C19 of the FlexiCubes supplementary material); :data:`AMBIGUOUS_DIR` holds the
  direction of that face.
"""

from __future__ import annotations

import torch

CORNERS: tuple[tuple[int, int, int], ...] = tuple((i & 1, (i >> 1) & 1, (i >> 2) & 1) for i in range(8))

EDGES: tuple[tuple[int, int], ...] = (
    (0, 1),
    (1, 5),
    (4, 5),
    (0, 4),
    (2, 3),
    (3, 7),
    (6, 7),
    (2, 6),
    (2, 0),
    (3, 1),
    (7, 5),
    (6, 4),
)

# Cases whose group order is not the "smallest inside corner first" order.
_REVERSED_GROUP_ORDER = frozenset({231})

MAX_GROUPS = 4  # at most 4 dual vertices per cube
MAX_GROUP_EDGES = 7  # at most 7 edges per dual vertex


def _faces() -> list[list[int]]:
    """The 6 cube faces as corner lists ordered so that (f[0], f[3]) and (f[1], f[2]) are diagonals."""
    faces = []
    for axis in range(3):
        for side in (0, 1):
            faces.append([i for i in range(8) if CORNERS[i][axis] == side])
    return faces


def _edge_groups(case: int) -> list[list[int]]:
    inside = [(case >> i) & 1 for i in range(8)]
    cut = [e for e, (a, b) in enumerate(EDGES) if inside[a] != inside[b]]
    parent = {e: e for e in cut}

    def root(e: int) -> int:
        while parent[e] != e:
            e = parent[e]
        return e

    def join(a: int, b: int) -> None:
        parent[root(a)] = root(b)

    for face in _faces():
        on_face = [e for e in cut if EDGES[e][0] in face and EDGES[e][1] in face]
        if len(on_face) == 2:
            join(*on_face)
        elif len(on_face) == 4:  # ambiguous face: separate the inside corners
            for corner in face:
                if inside[corner]:
                    join(*[e for e in on_face if corner in EDGES[e]])

    groups: dict[int, list[int]] = {}
    for e in cut:
        groups.setdefault(root(e), []).append(e)

    def first_inside_corner(group: list[int]) -> int:
        return min(c for e in group for c in EDGES[e] if inside[c])

    ordered = sorted((sorted(g) for g in groups.values()), key=first_inside_corner)
    if case in _REVERSED_GROUP_ORDER:
        ordered.reverse()
    return ordered


def _ambiguous_face_dir(case: int) -> tuple[int, int, int] | None:
    """Outward direction of the single ambiguous face of a 5/6-inside-corner case, else None."""
    inside = [(case >> i) & 1 for i in range(8)]
    if sum(inside) not in (5, 6):
        return None
    found = []
    for k, face in enumerate(_faces()):
        v = [inside[c] for c in face]
        if v[0] == v[3] and v[1] == v[2] and v[0] != v[1]:
            d = [0, 0, 0]
            d[k // 2] = 1 if k % 2 else -1
            found.append(tuple(d))
    return found[0] if len(found) == 1 else None


def _build() -> tuple[list, list, list, list]:
    dmc, num_vd, amb_flag, amb_dir = [], [], [], []
    for case in range(256):
        groups = _edge_groups(case)
        num_vd.append(len(groups))
        rows = [g + [-1] * (MAX_GROUP_EDGES - len(g)) for g in groups]
        rows += [[-1] * MAX_GROUP_EDGES] * (MAX_GROUPS - len(rows))
        dmc.append(rows)
        d = _ambiguous_face_dir(case)
        amb_flag.append(d is not None)
        amb_dir.append(list(d) if d is not None else [0, 0, 0])
    return dmc, num_vd, amb_flag, amb_dir


_DMC, _NUM_VD, _AMB_FLAG, _AMB_DIR = _build()

#: [256, 4, 7] int64: edge groups per case (-1 padded).
DMC_TABLE = torch.tensor(_DMC, dtype=torch.long)
#: [256] int64: number of dual vertices per case.
NUM_VD_TABLE = torch.tensor(_NUM_VD, dtype=torch.long)
#: [256] bool: case has a single ambiguous face that may need resolving against its neighbour.
AMBIGUOUS_FLAG = torch.tensor(_AMB_FLAG, dtype=torch.bool)
#: [256, 3] int64: direction to that neighbour (zero where the flag is off).
AMBIGUOUS_DIR = torch.tensor(_AMB_DIR, dtype=torch.long)
#: [8, 3] int64 corner offsets and [12] int64 edge endpoints.
CORNER_OFFSETS = torch.tensor(CORNERS, dtype=torch.long)
EDGE_A = torch.tensor([a for a, _ in EDGES], dtype=torch.long)
EDGE_B = torch.tensor([b for _, b in EDGES], dtype=torch.long)


def _edge_axis(e: int) -> int:
    a, b = EDGES[e]
    return next(k for k in range(3) if CORNERS[a][k] != CORNERS[b][k])


def _quad_position(e: int) -> int:
    """Rank (0..3) of a cube among the 4 cubes around one of its edges, in linear cube order.

    The 4 cubes differ along the two axes (u, w) other than the edge's; a cube holding the
    edge at local (u, w) = (1, 1) is the lowest one, at (0, 0) the highest.
    """
    u, w = [k for k in range(3) if k != _edge_axis(e)]
    corner = CORNERS[EDGES[e][0]]
    return 2 * (1 - corner[u]) + (1 - corner[w])


#: [12] int64: rank of each edge among the three edges leaving the same first endpoint when
#: ordered by their other endpoint's linear id (y edges run downwards: y < z < x).
EDGE_ORDER = torch.tensor([(2, 0, 1)[_edge_axis(e)] for e in range(12)], dtype=torch.long)
#: [12] int64: see :func:`_quad_position`.
QUAD_POSITION = torch.tensor([_quad_position(e) for e in range(12)], dtype=torch.long)

_device_cache: dict[tuple[str, str], torch.Tensor] = {}


def on_device(name: str, device: torch.device) -> torch.Tensor:
    """A table moved to ``device`` once and cached (tables are tiny, transfers are not free)."""
    key = (name, str(device))
    t = _device_cache.get(key)
    if t is None:
        t = globals()[name].to(device)
        _device_cache[key] = t
    return t
