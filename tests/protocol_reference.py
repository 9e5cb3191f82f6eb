"""insightface's verification protocol, transcribed in float64 loops from its description (for the tests).

crop + mirror embeddings summed, L2-normalised; squared L2 distance; "same" when the distance is
strictly below the threshold; thresholds k * 0.01 for k = 0..399 as numpy's arange makes them; 10
contiguous folds (the first n % 10 one pair longer); per fold, the FIRST threshold with the best
accuracy on the other nine, applied to the fold; VAL@FAR: the threshold where the other folds' FAR
(thresholds on the 0.001 grid) reaches the target, interpolated linearly between the last grid point
whose FAR is <= the target and the next one (0.0 when FAR never reaches the target).
"""
from __future__ import annotations

import numpy as np

GRID = np.arange(0, 4, 0.01)
VAL_GRID = np.arange(0, 4, 0.001)


def embeddings(feats, flip_halves=True):
    out = []
    for row in np.asarray(feats, dtype=np.float64):
        v = row[: row.size // 2] + row[row.size // 2:] if flip_halves else row.copy()
        n = np.sqrt(sum(float(x) * float(x) for x in v))
        out.append(v / n if n > 0 else v)
    return np.array(out)


def contiguous(n, k=10):
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return np.repeat(np.arange(k), sizes)


def distances(e1, e2):
    return np.array([float(np.sum((a - b) ** 2)) for a, b in zip(e1, e2)])


def _accuracy(t, dist, same):
    """(#same with d < t + #different with d >= t) / n, the pairs compared one by one."""
    return int(np.count_nonzero((dist < t) == same)) / len(dist)


def kfold(dist, same, folds):
    """(fold accuracies, fold thresholds) by one loop per threshold."""
    accs, thrs = [], []
    for k in sorted(set(folds.tolist())):
        test, train = folds == k, folds != k
        best, best_t = -1.0, None
        for t in GRID:
            a = _accuracy(t, dist[train], same[train])
            if a > best:  # strictly better: the first best is kept
                best, best_t = a, t
        accs.append(_accuracy(best_t, dist[test], same[test]))
        thrs.append(float(best_t))
    return accs, thrs


def val_at_far(dist, same, folds, target=1e-3):
    """(fold VALs, fold FARs, fold thresholds)."""
    vals, fars, thrs = [], [], []
    for k in sorted(set(folds.tolist())):
        test, train = folds == k, folds != k
        neg = dist[train & ~same]
        curve = [int(np.count_nonzero(neg < t)) / len(neg) for t in VAL_GRID]
        if max(curve) >= target:
            i = max(j for j, f in enumerate(curve) if f <= target)
            if i == len(curve) - 1:
                thr = VAL_GRID[-1]
            else:
                lo, hi = curve[i], curve[i + 1]
                thr = VAL_GRID[i] + (target - lo) / (hi - lo) * (VAL_GRID[i + 1] - VAL_GRID[i])
        else:
            thr = 0.0
        s, d = dist[test & same], dist[test & ~same]
        vals.append(int(np.count_nonzero(s < thr)) / len(s))
        fars.append(int(np.count_nonzero(d < thr)) / len(d))
        thrs.append(float(thr))
    return vals, fars, thrs


def realistic_pairs(n_pairs=600, dim=32, seed=0, noise=0.9, offset=1.5):
    """Pair features ``[f(crop), f(mirror)]`` with realistic structure: an identity centre plus noise plus
    a shared offset (all faces share a mean direction, as real embeddings do); the mirror is the crop
    plus a little noise. Half the pairs (alternating in blocks) are of one identity."""
    rng = np.random.default_rng(seed)
    shared = offset * rng.normal(size=dim)
    f1, f2, same = [], [], []
    for i in range(n_pairs):
        s = (i // 3) % 2 == 0
        c1 = rng.normal(size=dim)
        c2 = c1 if s else rng.normal(size=dim)
        for c, out in ((c1, f1), (c2, f2)):
            crop = c + shared + noise * rng.normal(size=dim)
            mirror = crop + 0.2 * rng.normal(size=dim)
            out.append(np.r_[crop, mirror] * rng.uniform(0.5, 2.0))
        same.append(s)
    return np.array(f1, np.float32), np.array(f2, np.float32), np.array(same)
