"""Mask generators: pure, seeded functions returning boolean masks (True = masked).

Every generator takes an explicit ``numpy.random.Generator`` so the data loader can draw masks
in its worker processes from ``make_rng(seed, step, sample_index)``: the same run always sees
the same masks, whatever the number of workers, and a resumed run continues exactly.

data2vec 2.0 needs the *same number of visible tokens in every row* (the student drops the
masked tokens and batches the rest), so every generator here returns an exact count per row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def make_rng(*keys: int) -> np.random.Generator:
    """A generator determined only by ``keys`` (e.g. ``(seed, step, sample_index)``)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def num_visible(length: int, mask_ratio: float) -> int:
    """Visible tokens per row for a mask ratio: ``int(L * (1 - ratio))`` as in MAE/fairseq."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    return int(length * (1.0 - mask_ratio))


def _select_exactly(keep: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Adjust each row of ``keep`` (N, L) bool to exactly ``count`` True entries.

    Rows with too many True entries keep a uniformly random subset of them; rows with too few
    keep all of them plus uniformly random others. One vectorized rule does both: score every
    position with ``u - keep`` (u ~ U[0, 1)), so already-kept positions always sort first, and
    take the ``count`` lowest scores.
    """
    scores = rng.random(keep.shape) - keep
    order = np.argsort(scores, axis=1, kind="stable")[:, :count]
    out = np.zeros_like(keep)
    np.put_along_axis(out, order, True, axis=1)
    return out


def inverse_block_mask(
    height: int,
    width: int,
    num_rows: int,
    mask_ratio: float,
    rng: np.random.Generator,
    block: int = 3,
    adjust: float = 0.07,
) -> np.ndarray:
    """Inverse block masking of data2vec 2.0 (Baevski et al. 2022, §3 "Inverse block masking").

    Instead of choosing blocks to *mask*, choose ``block x block`` squares to *keep* around
    random centers (about ``(1 - ratio + adjust) * L / block²`` of them, so that overlaps still
    leave enough visible patches), adjust every row to exactly ``int(L * (1 - ratio))`` visible
    patches, and mask the rest. Squares are cut at the grid border.

    Args:
        height, width: patch grid, ``L = height * width``.
        num_rows: how many independent masks (e.g. the clones of one sample).
        mask_ratio: fraction to mask (0.8 for ViT-B).
        rng: source of randomness.
        block: side of the kept squares (3 in the released recipe).
        adjust: extra keep probability compensating for overlapping squares (0.07).

    Returns:
        ``(num_rows, L)`` bool, True = masked, row-major over the grid; every row has exactly
        ``L - int(L * (1 - mask_ratio))`` True entries.
    """
    return inverse_block_mask_nd((height, width), num_rows, mask_ratio, rng, block, adjust)


def inverse_block_mask_nd(
    grid: tuple[int, ...],
    num_rows: int,
    mask_ratio: float,
    rng: np.random.Generator,
    block: int = 3,
    adjust: float = 0.07,
) -> np.ndarray:
    """Inverse block masking on an N-d patch grid (generalizes :func:`inverse_block_mask`).

    Keeps hypercubes of side ``block`` around about ``(1 - ratio + adjust) * L / block**n``
    random centers (cut at the grid border), adjusts every row to exactly
    ``int(L * (1 - ratio))`` visible patches and masks the rest. ``n = 2`` is the image mask
    (:func:`inverse_block_mask`); for ``n = 1`` it keeps spans, for ``n = 3`` cubes.

    Args:
        grid: patches per axis ``(g1, ..., gn)``, ``L = g1 * ... * gn``.
        num_rows: how many independent masks (e.g. the clones of one sample).
        mask_ratio: fraction to mask.
        rng: source of randomness.
        block: side of the kept hypercubes.
        adjust: extra keep probability compensating for overlapping blocks.

    Returns:
        ``(num_rows, L)`` bool, True = masked, row-major over the grid (first axis slowest).
    """
    length = int(np.prod(grid))
    n_keep = num_visible(length, mask_ratio)
    n_centers = int(length * (1.0 - mask_ratio + adjust) / block ** len(grid))
    keep = np.zeros((num_rows, *grid), dtype=bool)
    if n_centers > 0:
        centers = rng.integers(0, length, size=(num_rows, n_centers))
        coords = np.unravel_index(centers, grid)  # n arrays of (N, n_centers)
        row_idx = np.repeat(np.arange(num_rows), n_centers)
        lo = -(block // 2)
        for offset in itertools.product(range(lo, lo + block), repeat=len(grid)):
            moved = [(c + d).ravel() for c, d in zip(coords, offset)]
            inside = np.ones(row_idx.shape, dtype=bool)
            for m, size in zip(moved, grid):
                inside &= (m >= 0) & (m < size)
            keep[(row_idx[inside], *(m[inside] for m in moved))] = True
    keep = _select_exactly(keep.reshape(num_rows, length), n_keep, rng)
    return ~keep


def block_mask_1d(
    length: int,
    num_rows: int,
    mask_ratio: float,
    rng: np.random.Generator,
    span: int = 5,
    adjust: float = 0.05,
) -> np.ndarray:
    """1-D block masking of data2vec 2.0 for audio (Baevski et al. 2022, §3; fairseq
    ``compute_block_mask_1d``).

    Masks spans of ``span`` frames around random centers (about ``(ratio + adjust) * L / span``
    of them, the extra compensating for overlaps), cut at the sequence ends, then adjusts every
    row to exactly ``int(L * ratio)`` masked frames.

    Returns:
        ``(num_rows, length)`` bool, True = masked.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    n_mask = int(length * mask_ratio)
    n_centers = int(length * (mask_ratio + adjust) / span)
    masked = np.zeros((num_rows, length), dtype=bool)
    if n_centers > 0:
        centers = rng.integers(0, length, size=(num_rows, n_centers))
        row_idx = np.repeat(np.arange(num_rows), n_centers)
        lo = -(span // 2)
        for d in range(lo, lo + span):
            pos = (centers + d).ravel()
            inside = (pos >= 0) & (pos < length)
            masked[row_idx[inside], pos[inside]] = True
    return _select_exactly(masked, n_mask, rng)


def span_mask(
    length: int,
    num_rows: int,
    start_prob: float,
    rng: np.random.Generator,
    span: int = 10,
    min_spans: int = 1,
) -> np.ndarray:
    """wav2vec 2.0 / data2vec 1.0 span masking (fairseq ``compute_mask_indices``, "static").

    Each row draws ``int(start_prob * L / span + u)`` (u ~ U[0, 1), at least ``min_spans``)
    distinct start frames and masks ``span`` frames from each; spans may overlap, so about
    ``1 - exp(-start_prob)`` of the frames end up masked (~48 % for 0.65).

    Returns:
        ``(num_rows, length)`` bool, True = masked.
    """
    masked = np.zeros((num_rows, length), dtype=bool)
    if length <= 1:
        return masked
    for r in range(num_rows):
        n = max(min_spans, int(start_prob * length / span + rng.random()))
        width = span
        if length - width <= n:  # very short input: fewer start positions than spans
            width = max(length - n - 1, 1)
        starts = rng.choice(
            max(length - width, 1), size=min(n, max(length - width, 1)), replace=False
        )
        for s in starts:
            masked[r, s : s + span] = True
    return masked


def random_mask(
    length: int, num_rows: int, mask_ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Uniformly random token masking with exactly ``L - int(L * (1 - ratio))`` masked per row.

    Returns:
        ``(num_rows, length)`` bool, True = masked.
    """
    keep = _select_exactly(
        np.zeros((num_rows, length), dtype=bool), num_visible(length, mask_ratio), rng
    )
    return ~keep


def beit_block_mask(
    height: int,
    width: int,
    num_rows: int,
    mask_ratio: float,
    rng: np.random.Generator,
    min_block: int = 16,
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> np.ndarray:
    """BEiT block-wise masking (Bao et al. 2022, Algorithm 1), as data2vec 1.0 vision uses it.

    Each row masks rectangles until ``round(ratio · h·w)`` patches are masked: a rectangle's
    area is uniform in ``[min_block, still missing]``, its aspect ratio log-uniform in
    ``[min_aspect, 1/min_aspect]``, its position uniform. A rectangle is accepted only if it
    masks at least one new patch and no more than are still missing, so a row never exceeds
    the target; after ``attempts`` rejected draws in a row the row stops short (rare: only when
    the few missing patches cannot be covered by any admissible rectangle).

    Returns:
        ``(num_rows, h·w)`` bool, True = masked; the masked count may differ between rows.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    target = round(mask_ratio * height * width)
    log_aspect = (np.log(min_aspect), -np.log(min_aspect))
    out = np.zeros((num_rows, height, width), dtype=bool)
    for grid in out:
        count = 0
        while count < target:
            added = _place_rectangle(grid, target - count, min_block, log_aspect, rng, attempts)
            if added == 0:
                break
            count += added
    return out.reshape(num_rows, height * width)


def _place_rectangle(
    grid: np.ndarray,
    budget: int,
    min_block: int,
    log_aspect: tuple[float, float],
    rng: np.random.Generator,
    attempts: int,
) -> int:
    """Mask one admissible rectangle of ``grid`` (in place); return the patches newly masked."""
    height, width = grid.shape
    for _ in range(attempts):
        area = rng.uniform(min(min_block, budget), budget)
        aspect = float(np.exp(rng.uniform(*log_aspect)))
        h = round(float(np.sqrt(area * aspect)))
        w = round(float(np.sqrt(area / aspect)))
        if not (0 < h < height and 0 < w < width):
            continue
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        window = grid[top : top + h, left : left + w]
        new = int(h * w - window.sum())
        if 0 < new <= budget:
            window[...] = True
            return new
    return 0


@dataclass(frozen=True)
class MaskInfo:
    """A batch of masks in the forms the model needs.

    Attributes:
        mask: ``(N, T)`` bool, True = masked.
        ids_keep: ``(N, V)`` int64, the visible positions of each row in ascending order.
        ids_masked: ``(N, T - V)`` int64, the masked positions of each row in ascending order.
    """

    mask: Tensor
    ids_keep: Tensor
    ids_masked: Tensor

    @classmethod
    def from_mask(cls, mask: Tensor, device: torch.device | str | None = None) -> MaskInfo:
        """Build from a ``(N, T)`` bool mask whose rows all keep the same number of tokens.

        The rows are checked and counted where ``mask`` is, then it is moved to ``device``
        (default: where it is). A mask on the CPU (the data loader's) is thus checked without
        waiting for a GPU; the sort that lists the positions runs on ``device``.
        """
        if mask.ndim != 2 or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a 2-D bool tensor, got {tuple(mask.shape)} {mask.dtype}"
            )
        visible = (~mask).sum(dim=1)
        if visible.numel() and bool((visible != visible[0]).any()):
            raise ValueError(
                "every mask row must keep the same number of tokens (data2vec 2.0 batches the "
                f"visible tokens); got counts {sorted(set(visible.tolist()))}"
            )
        n_keep = int(visible[0]) if visible.numel() else 0
        if device is not None:
            mask = mask.to(device, non_blocking=True)
        # A stable sort of the 0/1 mask lists visible positions first, then the masked ones,
        # each in ascending order.
        order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
        return cls(mask=mask, ids_keep=order[:, :n_keep], ids_masked=order[:, n_keep:])

    def masked_rows(self) -> Tensor:
        """``(N * (T - V),)`` int64: the masked positions as indices into the ``N * T`` rows
        of a flattened ``(N, T, ...)`` tensor, row-major, the order of ``x[mask]``.

        Unlike ``x[mask]``, indexing with these does not wait for the device to count the
        mask (the count is known on the host).
        """
        N, T = self.mask.shape
        starts = torch.arange(N, device=self.ids_masked.device).mul_(T).unsqueeze(1)
        return (starts + self.ids_masked).reshape(-1)

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]


def true_rows(mask: Tensor) -> Tensor:
    """``mask``'s True positions as flat row-major indices into its ``mask.numel()`` elements
    (the rows of a flattened ``(N, T, ...)`` tensor for a ``(N, T)`` mask). Finding them waits
    for the device; :meth:`MaskInfo.masked_rows` does not, where every row has the same count."""
    return mask.reshape(-1).nonzero().squeeze(1)


def select_positions(x: Tensor, positions: Tensor | None) -> Tensor:
    """The rows of ``x: (N, T, ...)`` at ``positions``: ``(num_selected, ...)``, row-major.

    ``positions`` is a ``(N, T)`` bool mask, or the same positions as flat indices into the
    ``N * T`` rows (:meth:`MaskInfo.masked_rows`), which select without waiting for the device
    to count the mask; None selects everything, unflattened.
    """
    if positions is None:
        return x
    if positions.dtype == torch.bool:
        return x[positions]
    return _DistinctRows.apply(x.flatten(0, 1), positions)


class _DistinctRows(torch.autograd.Function):
    """``x[rows]`` for distinct ``rows`` (as a mask's positions are), ``x: (R, ...)``.

    Autograd's backward of indexing adds the gradient into zeros with ``index_put_(...,
    accumulate=True)``, which must allow for repeated rows: on the CPU 2.3x the time of
    copying it in (image-v2-base batch 8, the decoder's ``(25088, 768)`` rows: 157 ms forward
    + backward against 70 ms). Distinct rows make a copy exact: the same values.
    """

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.shape = x.shape
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_copy_(0, rows, grad), None
