"""Static shapes: canvas sets, epoch plans, padding statistics (numpy only).

XLA compiles one program per input shape, so every batch is padded to one *canvas* (H, W) from a small
fixed set, and each batch holds images assigned to the same canvas (similar size and aspect ratio).

Canvas set (`design_canvases`): always the two catch-alls (max_short x max_long) and (max_long x
max_short), which hold any output image; plus up to `num_canvases - 2` canvases chosen greedily to
minimise the padded area over a sample of output sizes (a simulated epoch of the random transform).
Everything is a deterministic function of the dataset's image sizes and the config, so every process
and every resumed run derives the same set.

Epoch plan (`train_epoch_plan`): a seeded permutation of the examples; each example's transform is
drawn (its output size is then known), it goes to the smallest canvas holding it; walking the
permutation, a batch is cut whenever a canvas collects `batch_size` examples. Leftovers (fewer than a
batch per canvas) are, with leftover='merge', packed into batches on a larger canvas that holds them, per
orientation (landscape, portrait: a batch mixing both would need a max_long x max_long canvas); the last
partial batch of each orientation is completed with repeats of other examples of that orientation drawn at
random (`Plan.repeated`; at most 2 * (batch_size - 1) per epoch), so every example is trained on in every
epoch, also when an orientation has fewer examples than a batch. With 'drop', leftovers are dropped.
The batch order is then shuffled. A plan is a pure function of (seed, epoch), so resuming at
(epoch, batch) needs no replay.

Padding waste = padded patch tokens / canvas patch tokens, where an image of (h, w) covers
ceil(h/p) * ceil(w/p) patches of the canvas (train and eval sizes are multiples of p, so this is the
image's own grid; a partly filled patch, which the model masks, is counted as used).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from yolos_jax.data import transforms as T


# Bumped whenever the same (seed, epoch, data, config) gives other plans, so that a run saved under the old
# rule refuses to resume under the new one (`TrainIterator.fingerprint`). 2: 'merge' completes partial batches.
PLAN_VERSION = 2


def ceil_to(x, m: int):
    return -(-np.asarray(x, np.int64) // m) * m


def catch_all_canvases(max_short: int, max_long: int, multiple: int) -> list[tuple[int, int]]:
    s, l = int(ceil_to(max_short, multiple)), int(ceil_to(max_long, multiple))
    return [(s, l)] if s == l else [(s, l), (l, s)]


def assign_canvases(hw: np.ndarray, canvases: np.ndarray) -> np.ndarray:
    """Index of the smallest-area canvas holding each (h, w); -1 if none does. hw: [N, 2]; canvases: [K, 2]."""
    hw = np.asarray(hw, np.int64).reshape(-1, 2)
    c = np.asarray(canvases, np.int64).reshape(-1, 2)
    fits = (hw[:, None, 0] <= c[None, :, 0]) & (hw[:, None, 1] <= c[None, :, 1])
    area = np.where(fits, (c[:, 0] * c[:, 1])[None, :], np.iinfo(np.int64).max)
    idx = np.argmin(area, axis=1)
    return np.where(fits.any(axis=1), idx, -1)


def design_canvases(
    sample_hw: np.ndarray,
    base_canvases: Sequence[tuple[int, int]],
    num_canvases: int,
    multiple: int = 16,
) -> list[tuple[int, int]]:
    """Chooses up to `num_canvases` canvases (multiples of `multiple`) for images of sizes `sample_hw`.

    sample_hw: [N, 2] output sizes (a representative sample). base_canvases: always included; they
    must hold every possible image (train: `catch_all_canvases`; eval: the bounding box of the known
    sizes). Greedy: repeatedly add the candidate canvas (a sample height x a sample width, rounded up
    to the multiple) that most reduces the total padded area of the sample, then re-choose each added
    canvas given the others (two rounds of local search). Returns canvases sorted by (H, W).
    """
    canv = [tuple(int(v) for v in c) for c in base_canvases]
    if num_canvases < len(canv):
        raise ValueError(f"num_canvases={num_canvases} is below the {len(canv)} base canvas(es) needed to hold "
                         "every image (for training: the portrait and landscape catch-alls)")
    hw = ceil_to(np.asarray(sample_hw, np.int64).reshape(-1, 2), multiple)
    if len(hw) == 0:
        return sorted(canv)
    uniq, counts = np.unique(hw, axis=0, return_counts=True)
    area = (uniq[:, 0] * uniq[:, 1]).astype(np.float64)
    counts = counts.astype(np.float64)
    counts32 = counts.astype(np.float32)
    uniq_h, uniq_w = uniq[:, 0], uniq[:, 1]

    def cost_per_point(cs: np.ndarray) -> np.ndarray:
        fits = (uniq[:, None, 0] <= cs[None, :, 0]) & (uniq[:, None, 1] <= cs[None, :, 1])
        a = np.where(fits, (cs[:, 0] * cs[:, 1]).astype(np.float64)[None, :], np.inf)
        return a.min(axis=1) - area

    hs, ws = np.unique(uniq[:, 0]), np.unique(uniq[:, 1])
    cand = np.stack(np.meshgrid(hs, ws, indexing="ij"), -1).reshape(-1, 2)

    def total(cs: list) -> float:
        return float((cost_per_point(np.asarray(cs)) * counts).sum())

    def best_addition(base: list) -> tuple[float, Optional[tuple[int, int]]]:
        """The candidate whose addition to `base` most reduces the padded area: (gain, canvas).
        A point moves to a candidate that holds it iff that is smaller than its current canvas, so
        gain(c) = sum_p count_p * max(0, current_area_p - area_c) * [p fits c]."""
        cur_area = (cost_per_point(np.asarray(base)) + area).astype(np.float32)
        best_gain, best = 0.0, None
        for start in range(0, len(cand), 1024):
            cs = cand[start:start + 1024]
            val = cur_area[:, None] - (cs[:, 0] * cs[:, 1]).astype(np.float32)[None, :]
            np.maximum(val, 0.0, out=val)
            val *= uniq_h[:, None] <= cs[None, :, 0]
            val *= uniq_w[:, None] <= cs[None, :, 1]
            gain = counts32 @ val
            k = int(np.argmax(gain))
            if gain[k] > best_gain:
                best_gain, best = float(gain[k]), tuple(int(v) for v in cs[k])
        return best_gain, best

    fixed = len(canv)
    while len(canv) < num_canvases:  # greedy growth
        gain, best = best_addition(canv)
        if best is None:
            break
        canv.append(best)
    for _ in range(2):  # local search: re-choose each added canvas given all the others
        improved = False
        for i in range(fixed, len(canv)):
            others = canv[:i] + canv[i + 1:]
            gain, best = best_addition(others)
            if best is not None and best != canv[i] and total(others + [best]) < total(canv) - 1e-6:
                canv[i] = best
                improved = True
        if not improved:
            break
    return sorted(set(canv))


def padding_stats(hw: np.ndarray, canvas_hw: np.ndarray, patch_size: int = 16) -> dict[str, float]:
    """Token and pixel padding waste of images hw [N, 2] placed on canvases canvas_hw [N, 2]."""
    hw = np.asarray(hw, np.int64).reshape(-1, 2)
    c = np.asarray(canvas_hw, np.int64).reshape(-1, 2)
    real_tok = (ceil_to(hw[:, 0], patch_size) * ceil_to(hw[:, 1], patch_size)).sum() / patch_size**2
    canv_tok = (c[:, 0] * c[:, 1]).sum() / patch_size**2
    real_px = (hw[:, 0] * hw[:, 1]).sum()
    canv_px = (c[:, 0] * c[:, 1]).sum()
    return {
        "token_waste": float(1 - real_tok / max(canv_tok, 1)),
        "pixel_waste": float(1 - real_px / max(canv_px, 1)),
        "num_shapes": int(len(np.unique(c, axis=0))) if len(c) else 0,
    }


@dataclasses.dataclass
class Plan:
    """The batches of one epoch (train) or one pass (eval), for the whole (global) batch.

    example: [nb, B] int64 index into the split; valid: [nb, B] bool (False: filler, duplicates a real
    example of the batch); geom: [nb, B, 9] int64 transform geometry; canvas: [nb, 2] int64 (H, W).
    dropped: examples of the epoch left out (train, leftovers).
    """

    example: np.ndarray
    valid: np.ndarray
    geom: np.ndarray
    canvas: np.ndarray
    dropped: int = 0
    repeated: int = 0

    def __len__(self) -> int:
        return len(self.example)

    def stats(self, patch_size: int = 16) -> dict[str, float]:
        v = self.valid.reshape(-1)
        hw = T.output_hw(self.geom.reshape(-1, 9))[v]
        c = np.repeat(self.canvas, self.valid.shape[1], axis=0)[v]
        s = padding_stats(hw, c, patch_size)
        s["num_shapes"] = int(len(np.unique(self.canvas, axis=0))) if len(self) else 0
        s["batches"] = len(self)
        s["dropped"] = self.dropped
        s["repeated"] = self.repeated
        s["examples"] = int(v.sum())
        return s


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """The generator of one epoch: independent of every other (seed, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), 0x9E3779B9, stream]))


def train_epoch_plan(
    seed: int,
    epoch: int,
    heights: np.ndarray,
    widths: np.ndarray,
    tcfg: T.TrainTransformConfig,
    canvases: Sequence[tuple[int, int]],
    batch_size: int,
    leftover: str = "merge",
    shuffle: bool = True,
) -> Plan:
    """The plan of train epoch `epoch` (see module docstring). heights/widths: [N] original sizes."""
    n = len(heights)
    rng = epoch_rng(seed, epoch)
    perm = rng.permutation(n) if shuffle else np.arange(n)
    geom = T.sample_train_geometry(rng, np.asarray(heights)[perm], np.asarray(widths)[perm], tcfg)
    canv = np.asarray(canvases, np.int64)
    cid = assign_canvases(T.output_hw(geom), canv)
    if (cid < 0).any():
        bad = T.output_hw(geom)[cid < 0][0]
        raise ValueError(f"an output image of size {tuple(bad)} fits no canvas in {canvases}; input.canvases must "
                         "include canvases as large as the largest output (or leave input.canvases empty for auto)")
    batches: list[tuple[np.ndarray, int]] = []  # (positions into perm, canvas id)
    pending: dict[int, list[int]] = {}
    for pos, c in enumerate(cid):
        lst = pending.setdefault(int(c), [])
        lst.append(pos)
        if len(lst) == batch_size:
            batches.append((np.asarray(lst), int(c)))
            pending[int(c)] = []
    left = [p for c in sorted(pending) for p in pending[c]]
    dropped = repeated = 0
    if leftover == "merge" and left:
        fill_rng = epoch_rng(seed, epoch, stream=1)  # its own stream: the permutation and transforms above keep theirs
        batches_m, repeated = _merge_leftovers(np.asarray(left), T.output_hw(geom), canv, batch_size, fill_rng)
        batches.extend(batches_m)
    elif leftover == "drop":
        dropped = len(left)
    elif leftover != "merge":
        raise ValueError(f"input.leftover must be 'merge' or 'drop', got {leftover!r}")
    order = rng.permutation(len(batches)) if shuffle else np.arange(len(batches))
    nb = len(batches)
    ex = np.zeros((nb, batch_size), np.int64)
    g = np.zeros((nb, batch_size, 9), np.int64)
    cv = np.zeros((nb, 2), np.int64)
    for k, j in enumerate(order):
        pos, c = batches[j]
        ex[k] = perm[pos]
        g[k] = geom[pos]
        cv[k] = canv[c]
    return Plan(ex, np.ones((nb, batch_size), bool), g, cv, dropped, repeated)


def _merge_leftovers(pos: np.ndarray, hw_all: np.ndarray, canv: np.ndarray, batch_size: int,
                     rng: np.random.Generator) -> tuple[list[tuple[np.ndarray, int]], int]:
    """Packs leftover examples (positions `pos`) into full batches on canvases that hold the whole batch, per
    orientation; completes each partial batch with random repeats of examples of that orientation (any
    position of the epoch) that fit its canvas. Returns (batches, number of repeats).

    With the designed canvases (which include both catch-alls) a chunk of one orientation always fits one
    canvas, so only each orientation's last chunk is partial. With explicit `input.canvases` a chunk may fit
    none; it is then split by the canvas of each of its examples, and those groups completed in the same way."""
    landscape_all = hw_all[:, 1] >= hw_all[:, 0]
    out: list[tuple[np.ndarray, int]] = []
    repeated = 0

    def complete(members: np.ndarray, c: int, landscape: bool) -> None:
        nonlocal repeated
        missing = batch_size - len(members)
        if missing:
            fits = (landscape_all == landscape) & (hw_all <= canv[c]).all(axis=1)
            fits[members] = False
            others = np.flatnonzero(fits)
            if len(others) >= missing:
                fill = rng.choice(others, missing, replace=False)
            else:  # fewer such examples than a batch: repeat what there is
                fill = rng.choice(np.concatenate([others, members]), missing, replace=True)
            members = np.concatenate([members, fill])
            repeated += missing
        out.append((members, c))

    for landscape in (True, False):
        sel = landscape_all[pos] == landscape
        p, h = pos[sel], hw_all[pos[sel]]
        order = np.argsort(h[:, 0] * h[:, 1], kind="stable")  # small with small: less waste
        p, h = p[order], h[order]
        for s in range(0, len(p), batch_size):
            members, sizes = p[s:s + batch_size], h[s:s + batch_size]
            c = int(assign_canvases(sizes.max(axis=0)[None], canv)[0])
            if c >= 0:
                complete(members, c, landscape)
                continue
            own = assign_canvases(sizes, canv)  # each example fits a canvas (checked by the caller)
            for c_own in np.unique(own):
                complete(members[own == c_own], int(c_own), landscape)
    return out, repeated


def eval_plan(
    geom: np.ndarray,
    canvases: Sequence[tuple[int, int]],
    batch_size: int,
) -> Plan:
    """Batches covering every example exactly once, in index order within each canvas group; the last
    batch of a group is filled with copies of its first example marked valid=False."""
    canv = np.asarray(canvases, np.int64)
    cid = assign_canvases(T.output_hw(geom), canv)
    if (cid < 0).any():
        bad = T.output_hw(geom)[cid < 0][0]
        raise ValueError(f"an eval image of size {tuple(bad)} fits no canvas in {canvases}")
    exs, vals, cvs = [], [], []
    for c in range(len(canv)):
        idx = np.nonzero(cid == c)[0]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            v = np.zeros(batch_size, bool)
            v[: len(chunk)] = True
            exs.append(np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])]))
            vals.append(v)
            cvs.append(canv[c])
    nb = len(exs)
    ex = np.asarray(exs, np.int64).reshape(nb, batch_size)
    return Plan(ex, np.asarray(vals, bool).reshape(nb, batch_size), np.asarray(geom)[ex].reshape(nb, batch_size, 9),
                np.asarray(cvs, np.int64).reshape(nb, 2))


def simulate_train_sizes(heights: np.ndarray, widths: np.ndarray, tcfg: T.TrainTransformConfig,
                         min_samples: int = 20000, seed: int = 1234) -> np.ndarray:
    """Output sizes [S, 2] of simulated train epochs (at least min_samples), with a fixed seed: the
    sample the canvas set is designed on (independent of the training seed, so all runs share it)."""
    h = np.asarray(heights, np.int64)
    w = np.asarray(widths, np.int64)
    if len(h) == 0:
        return np.zeros((0, 2), np.int64)
    reps = max(1, -(-min_samples // len(h)))
    rng = np.random.default_rng(seed)
    g = T.sample_train_geometry(rng, np.tile(h, reps), np.tile(w, reps), tcfg)
    return T.output_hw(g)
