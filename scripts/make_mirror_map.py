"""Derive the left<->right landmark pairing of MediaPipe FaceMesh (478 points) from the mesh itself.

Writes ``service/engine/mirror_map.json``, which ``service.engine.normalize`` loads. Run it again
only when MediaPipe's mesh changes (the output is deterministic, so a re-run is a no-op diff)::

    .venv/bin/python scripts/make_mirror_map.py [--image single_face.jpg] [--check]

Method (DESIGN.md, "Sides and coordinates"):

1. The 468 mesh vertices: the mirror map is the involutive automorphism of the tessellation graph
   ``FACEMESH_TESSELATION`` that fixes the midline. It is grown from seed pairs (61<->291, 33<->263,
   ...) and fixed midline points (0, 1, 4, ...): a vertex v whose mapped neighbours u all agree on a
   single unmapped common neighbour of their images u' (of v's degree) gets that vertex as its image.
   This reaches 444 of 468 vertices with no conflict. The tessellation is NOT exactly symmetric:
   three quads near the left eye/nose have their diagonal drawn the other way than on the right
   side, so 6 of its 1322 edges have no mirror edge and 12 vertices have a degree differing from
   their partner's. The last 24 vertices are therefore matched by a relaxed vote (the unmapped
   candidate adjacent to the images of the most mapped neighbours, largest margin first) and every
   non-preserved edge is then checked to be exactly such a flipped quad diagonal.
2. The 10 iris points: 468<->473 (centres); the two 4-point rings are paired by geometry on one real
   frontal face (ring offsets from the iris centre, reflected across the eye line's normal), which
   for 4 points 90 degrees apart is unambiguous; the ring edges must then map onto ring edges.
3. Sanity check on that real face: reflecting it across its best symmetry plane (3-D, fitted to the
   pairing) must bring each point close to its partner; the mean error is printed.

No real face's nearest neighbours decide any mesh pair: on a smiling face they get pairs wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "service" / "engine" / "mirror_map.json"
IMAGE_CANDIDATES = (
    ROOT / "tests" / "data" / "faces" / "single_face.jpg",
    Path("/work/shared/data/faces/single_face.jpg"),
)

N_MESH = 468
N_ALL = 478
SEED_PAIRS = ((61, 291), (33, 263), (133, 362), (159, 386), (145, 374), (70, 300), (105, 334))
MIDLINE = (0, 1, 4, 10, 13, 14, 17, 152)
IRIS_CENTRES = (473, 468)  # (subject's left, subject's right)
EXPECTED_FLIPPED_QUADS = 3


def _edges(connections: Iterable[tuple[int, int]]) -> set[frozenset[int]]:
    return {frozenset(e) for e in connections}


def _adjacency(edges: set[frozenset[int]], n: int) -> list[set[int]]:
    adj: list[set[int]] = [set() for _ in range(n)]
    for e in edges:
        a, b = tuple(e)
        adj[a].add(b)
        adj[b].add(a)
    return adj


def mesh_automorphism(adj: list[set[int]]) -> list[int]:
    """Grow the mirror involution of the 468-vertex mesh from the seeds (see module docstring)."""
    n = len(adj)
    m: dict[int, int] = {}
    for a, b in SEED_PAIRS:
        m[a], m[b] = b, a
    for v in MIDLINE:
        m[v] = v

    def strict() -> None:
        # Unique-candidate propagation: sound wherever the mesh is locally symmetric.
        changed = True
        while changed:
            changed = False
            for v in range(n):
                if v in m:
                    continue
                mapped = [u for u in sorted(adj[v]) if u in m]
                if not mapped:
                    continue
                cand = set.intersection(*(adj[m[u]] for u in mapped))
                cand = {x for x in cand if x not in m and len(adj[x]) == len(adj[v])}
                if len(cand) == 1:
                    x = cand.pop()
                    m[v], m[x] = x, v
                    changed = True

    strict()
    while len(m) < n:
        # Relaxed vote where the mesh is locally asymmetric (flipped quad diagonals): take the
        # (vertex, candidate) with the largest winning margin; self-maps are excluded because the
        # midline is complete after the strict phase (asserted below).
        best: tuple[tuple[int, int, int], int, int] | None = None
        for v in range(n):
            if v in m:
                continue
            votes: dict[int, int] = {}
            for u in adj[v]:
                if u in m:
                    for x in adj[m[u]]:
                        if x not in m and x != v:
                            votes[x] = votes.get(x, 0) + 1
            if not votes:
                continue
            ranked = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))
            margin = ranked[0][1] - (ranked[1][1] if len(ranked) > 1 else 0)
            key = (margin, ranked[0][1], -v)
            if best is None or key > best[0]:
                best = (key, v, ranked[0][0])
        if best is None:
            raise RuntimeError("mirror propagation stalled: the mesh is disconnected from the seeds")
        (margin, _, _), v, x = best
        if margin < 1:
            raise RuntimeError(f"ambiguous mirror vote at vertex {v}")
        m[v], m[x] = x, v
        strict()
    return [m[i] for i in range(n)]


def face_landmarks(image_path: Path) -> np.ndarray:
    """(478, 3) pixel landmarks of the one face in ``image_path`` (x px, y px, z px-scaled-by-width)."""
    import cv2
    import mediapipe as mp

    bgr = cv2.imread(str(image_path))
    if bgr is None:
        raise FileNotFoundError(image_path)
    h, w = bgr.shape[:2]
    with mp.solutions.face_mesh.FaceMesh(
        static_image_mode=True, refine_landmarks=True, max_num_faces=1
    ) as fm:
        res = fm.process(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if not res.multi_face_landmarks:
        raise RuntimeError(f"no face found in {image_path}")
    lm = res.multi_face_landmarks[0].landmark
    return np.array([[p.x * w, p.y * h, p.z * w] for p in lm], dtype=np.float64)


def iris_pairs(lm: np.ndarray, left_ring: list[int], right_ring: list[int]) -> dict[int, int]:
    """Pair the two 4-point iris rings by their offsets from the iris centre, reflected."""
    left_c, right_c = IRIS_CENTRES
    eye_axis = lm[left_c, :2] - lm[right_c, :2]
    eye_axis /= np.linalg.norm(eye_axis)
    normal = np.array([-eye_axis[1], eye_axis[0]])
    pairs: dict[int, int] = {}
    for r in right_ring:
        off = lm[r, :2] - lm[right_c, :2]
        # Reflect across the line through the centre perpendicular to the eye axis.
        refl = -(off @ eye_axis) * eye_axis + (off @ normal) * normal
        dist = {q: float(np.linalg.norm(lm[q, :2] - lm[left_c, :2] - refl)) for q in left_ring}
        ranked = sorted(dist, key=lambda q: dist[q])
        # 4 points 90 degrees apart: the best match must win by a wide margin.
        assert dist[ranked[0]] < 0.5 * dist[ranked[1]], (r, dist)
        pairs[r] = ranked[0]
    assert sorted(pairs.values()) == sorted(left_ring), pairs
    return pairs


def ordered_cycle(edges: Iterable[tuple[int, int]], start: int, second: int) -> list[int]:
    """Walk a closed edge cycle from ``start`` through ``second`` back to ``start``."""
    adj = _adjacency(_edges(edges), N_ALL)
    order = [start, second]
    while True:
        nxt = [u for u in adj[order[-1]] if u != order[-2]]
        assert len(nxt) == 1, ("not a simple cycle at", order[-1])
        if nxt[0] == start:
            return order
        order.append(nxt[0])


def symmetry_residual(lm: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """Per-point distance |S(p_i) - p_mirror(i)| after the best-fit 3-D reflection S.

    For a reflection across the plane n.x = c, p_i - p_m(i) is parallel to n and the midpoints lie
    on the plane: n is the principal direction of the pair differences, c the mean midpoint offset.
    """
    d = lm - lm[mirror]
    _, _, vt = np.linalg.svd(d, full_matrices=False)
    n = vt[0]
    c = float(np.mean((lm + lm[mirror]) @ n) / 2.0)
    refl = lm - 2.0 * ((lm @ n) - c)[:, None] * n
    return np.asarray(np.linalg.norm(refl - lm[mirror], axis=1))


def build(image_path: Path) -> tuple[dict[str, object], dict[str, float]]:
    from mediapipe.python.solutions import face_mesh_connections as fmc

    tess = _edges(fmc.FACEMESH_TESSELATION)
    adj = _adjacency(tess, N_MESH)
    mesh = mesh_automorphism(adj)

    lm = face_landmarks(image_path)
    left_ring = sorted({v for e in fmc.FACEMESH_LEFT_IRIS for v in e})
    right_ring = sorted({v for e in fmc.FACEMESH_RIGHT_IRIS for v in e})
    mirror = mesh + [0] * (N_ALL - N_MESH)
    mirror[IRIS_CENTRES[0]], mirror[IRIS_CENTRES[1]] = IRIS_CENTRES[1], IRIS_CENTRES[0]
    for r, q in iris_pairs(lm, left_ring, right_ring).items():
        mirror[r], mirror[q] = q, r
    mir = np.array(mirror)

    # --- checks (the same ones tests/unit/test_normalize.py runs on the committed table) ---
    assert all(mir[mir[i]] == i for i in range(N_ALL)), "not an involution"
    assert all(mir[v] == v for v in MIDLINE)
    for a, b in (*SEED_PAIRS, IRIS_CENTRES):
        assert mir[a] == b and mir[b] == a, (a, b)
    broken = sorted(tuple(sorted(e)) for e in tess if frozenset(int(mir[v]) for v in e) not in tess)
    flipped = flipped_diagonals(tess, mir, broken)
    assert len(flipped) == EXPECTED_FLIPPED_QUADS, flipped
    for lname, rname in (
        ("LEFT_EYE", "RIGHT_EYE"),
        ("LEFT_EYEBROW", "RIGHT_EYEBROW"),
        ("LEFT_IRIS", "RIGHT_IRIS"),
    ):
        le, re_ = _edges(getattr(fmc, f"FACEMESH_{lname}")), _edges(getattr(fmc, f"FACEMESH_{rname}"))
        assert {frozenset(int(mir[v]) for v in e) for e in le} == re_, lname
    for name in ("LIPS", "FACE_OVAL", "NOSE"):
        vs = {v for e in getattr(fmc, f"FACEMESH_{name}") for v in e}
        assert {int(mir[v]) for v in vs} == vs, name

    # --- the subject's halves: the component of 263 once the midline is removed ---
    midline = [i for i in range(N_MESH) if mir[i] == i]
    left_half = {263}
    stack = [263]
    while stack:
        v = stack.pop()
        for u in adj[v]:
            if mir[u] != u and u not in left_half:
                left_half.add(u)
                stack.append(u)
    left = sorted(left_half | {IRIS_CENTRES[0], *left_ring})
    assert not set(left) & {int(mir[v]) for v in left}, "halves overlap"
    assert len(left) * 2 + len(midline) == N_ALL

    def vset(conn: Iterable[tuple[int, int]]) -> list[int]:
        return sorted({v for e in conn for v in e})

    # Eye contours start at the lateral canthus and run along the upper lid first; the right one is
    # the mirror image of the left one, point for point.
    left_upper_next = int(mir[246])  # 246 follows 33 on the right upper lid
    left_contour = ordered_cycle(fmc.FACEMESH_LEFT_EYE, 263, left_upper_next)
    right_contour = [int(mir[v]) for v in left_contour]
    assert ordered_cycle(fmc.FACEMESH_RIGHT_EYE, 33, 246) == right_contour
    # The upper lid (159, 386) comes before the medial canthus (133, 362); image y grows downward.
    assert right_contour.index(159) < right_contour.index(133) < right_contour.index(145)
    assert lm[386, 1] < lm[374, 1] and lm[159, 1] < lm[145, 1]

    res = symmetry_residual(lm, mir)
    eye_l = lm[left_contour, :2].mean(axis=0)
    eye_r = lm[right_contour, :2].mean(axis=0)
    d_px = float(np.linalg.norm(eye_l - eye_r))
    stats = {
        "mean_px": float(res.mean()),
        "max_px": float(res.max()),
        "argmax": float(res.argmax()),
        "D_px": d_px,
        "mean_D": float(res.mean()) / d_px,
    }

    import mediapipe

    table: dict[str, object] = {
        "source": (
            "scripts/make_mirror_map.py: involutive automorphism of FACEMESH_TESSELATION grown from seed "
            "pairs and fixed midline points (3 quads have flipped diagonals: see tessellation_asymmetries); "
            "iris rings paired by geometry on one frontal face; checked: involution, seeds, edges, "
            "eye/brow/iris sets, lips/oval/nose self-symmetric"
        ),
        "mediapipe": mediapipe.__version__,
        "mirror": [int(v) for v in mir],
        "tessellation_asymmetries": [[list(a), list(b)] for a, b in flipped],
        "regions": {
            "left_eye": vset(fmc.FACEMESH_LEFT_EYE),
            "right_eye": vset(fmc.FACEMESH_RIGHT_EYE),
            "left_eye_contour": left_contour,
            "right_eye_contour": right_contour,
            "left_brow": vset(fmc.FACEMESH_LEFT_EYEBROW),
            "right_brow": vset(fmc.FACEMESH_RIGHT_EYEBROW),
            "left_iris": vset(fmc.FACEMESH_LEFT_IRIS),
            "right_iris": vset(fmc.FACEMESH_RIGHT_IRIS),
            "lips": vset(fmc.FACEMESH_LIPS),
            "face_oval": vset(fmc.FACEMESH_FACE_OVAL),
            "midline": midline,
            "left_half": left,
        },
    }
    return table, stats


def flipped_diagonals(
    tess: set[frozenset[int]], mir: np.ndarray, broken: list[tuple[int, ...]]
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Check every non-preserved edge is a quad diagonal drawn the other way on the mirror side.

    Returns pairs (edge, mirror-side edge): ``edge``'s image is the other diagonal of a 4-cycle
    whose sides all map to edges, and ``mirror-side edge`` is that quad's diagonal on the other side.
    """
    out: list[tuple[tuple[int, int], tuple[int, int]]] = []
    left = set(broken)
    while left:
        a, b = min(left)
        left.discard((a, b))
        a2, b2 = int(mir[a]), int(mir[b])
        nbrs = [c for c in range(N_MESH) if frozenset((a2, c)) in tess and frozenset((b2, c)) in tess]
        assert len(nbrs) == 2, ("not a quad diagonal", a, b, nbrs)
        other = (min(nbrs), max(nbrs))
        assert frozenset(other) in tess and other in left, ("mirror diagonal missing", a, b, other)
        left.discard(other)
        out.append(((a, b), other))
    return out


def dumps(table: dict[str, object]) -> str:
    """JSON with one list per line, so diffs stay readable and the bytes are reproducible."""
    lines = ["{"]
    items = list(table.items())
    for k, (key, val) in enumerate(items):
        comma = "," if k < len(items) - 1 else ""
        if isinstance(val, dict):
            lines.append(f"  {json.dumps(key)}: {{")
            sub = list(val.items())
            for j, (k2, v2) in enumerate(sub):
                c2 = "," if j < len(sub) - 1 else ""
                lines.append(f"    {json.dumps(k2)}: {json.dumps(v2)}{c2}")
            lines.append(f"  }}{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(val)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--image", type=Path, default=None, help="frontal face photo (default: single_face.jpg)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="fail if the committed table differs; write nothing")
    args = ap.parse_args(argv)
    image = args.image or next((p for p in IMAGE_CANDIDATES if p.exists()), None)
    if image is None:
        ap.error("no single_face.jpg found; pass --image")
    table, stats = build(image)
    text = dumps(table)
    print(
        f"reflection residual on {image.name}: mean {stats['mean_px']:.2f} px = {stats['mean_D']:.3f} D "
        f"(D = {stats['D_px']:.1f} px), max {stats['max_px']:.2f} px at {int(stats['argmax'])}"
    )
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print("mirror map up to date" if same else f"{args.out} differs from a fresh derivation")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
