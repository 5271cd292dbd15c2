"""GNCE neighbourhood loss (the original ``compute_gradient_map_weight2``, docs/method.md §4.5).

For the four directions d (up, down, left, right; unit step delta_d) and each class c with window
n_c > 0:

    rho_d(x)   = cos(stopgrad(F(x)), F(x + delta_d))                  features always 1 pixel away
    w_c,d(x)   = 1 / (1 + |S_c(x + n_c delta_d) - S_c(x)|)            0 where x + n_c delta_d is outside
    L_c        = mean_{b,d,x} (1 - rho_d) w_c,d                         (B*4*H*W entries, borders included)
    L          = mean over the classes with n_c > 0

With a mask m [B, 1, H, W]: L_c = sum_{b,d,x} (1 - rho_d) w_c,d m / (sum m + 1), a sum over the four
directions (the original's commented-out variant). Only the centre feature is detached; the weights are
not, so the loss also sharpens the similarity map where neighbouring features differ. The derivative of
|.| at an exact tie is 0 (torch's convention), as in the original.

:func:`gnce_loss_reference` loops over classes and directions like the original; :func:`gnce_loss`
computes the cosine once per direction (it does not depend on the class) and the weights of all classes
and directions at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DIRECTIONS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # (dy, dx): up, down, left, right
COS_EPS = 1e-8


def _check(sim_max: torch.Tensor, features: torch.Tensor, windows: Sequence[int]) -> None:
    if sim_max.dim() != 4 or features.dim() != 4 or sim_max.shape[-2:] != features.shape[-2:] \
            or sim_max.shape[0] != features.shape[0]:
        raise ValueError(f"sim_max [B, C, H, W] and features [B, D, H, W] must share B, H, W; got "
                         f"{tuple(sim_max.shape)} and {tuple(features.shape)}")
    if len(windows) != sim_max.shape[1]:
        raise ValueError(f"need one window per class ({sim_max.shape[1]}), got {list(windows)}")
    if min(windows) < 0 or max(windows) == 0:
        raise ValueError(f"windows must be >= 0 with at least one > 0 (0 skips a class), got {list(windows)}")


def _mask(mask: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    b, _, h, w = ref.shape
    return mask.reshape(b, 1, h, w).to(ref.dtype)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """y[..., i, j] = x[..., i + dy, j + dx], zero outside: x [B, C, H, W] -> same shape."""
    h, w = x.shape[-2:]
    py, px = abs(dy), abs(dx)
    padded = F.pad(x, (px, px, py, py))
    return padded[..., py + dy: py + dy + h, px + dx: px + dx + w]


def gnce_loss_reference(sim_max: torch.Tensor, features: torch.Tensor, windows: Sequence[int],
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain GNCE, one class and one direction at a time: sim_max [B, C, H, W] (the max-over-K prototype
    logits), features [B, D, H, W], windows n_c per class, mask [B, 1, H, W] or None -> 0-dim loss."""
    _check(sim_max, features, windows)
    h, w = sim_max.shape[-2:]
    centre = features.detach()
    m = None if mask is None else _mask(mask, sim_max)
    per_class = []
    for c, n in enumerate(windows):
        if n == 0:
            continue
        s = sim_max[:, c: c + 1]
        terms = []
        for dy, dx in DIRECTIONS:
            rho = F.cosine_similarity(centre, _shift(features, dy, dx), dim=1, eps=COS_EPS)[:, None]
            weight = 1 / (1 + (_shift(s, n * dy, n * dx) - s).abs())
            inside = torch.zeros_like(s)
            inside[..., max(0, -n * dy): max(0, h - n * dy), max(0, -n * dx): max(0, w - n * dx)] = 1
            terms.append((1 - rho) * weight * inside)
        t = torch.cat(terms, 1)  # [B, 4, H, W]
        per_class.append(t.mean() if m is None else (t * m).sum() / (m.sum() + 1))
    return torch.stack(per_class).sum() / len(per_class)


def gnce_loss(sim_max: torch.Tensor, features: torch.Tensor, windows: Sequence[int],
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """GNCE (vectorised): sim_max [B, C, H, W], features [B, D, H, W], windows n_c per class (0 skips a
    class), mask [B, 1, H, W] or None -> 0-dim loss. Same value as :func:`gnce_loss_reference`."""
    _check(sim_max, features, windows)
    b, _, h, w = sim_max.shape
    active = [c for c, n in enumerate(windows) if n > 0]
    s = sim_max[:, active]  # [B, A, H, W]
    n = torch.tensor([windows[c] for c in active], device=s.device)  # [A]
    centre = features.detach()
    rows = torch.arange(h, device=s.device)
    cols = torch.arange(w, device=s.device)

    # 1 - rho per direction, on the pixels whose neighbour is inside; border pixels have weight 0 for
    # every active class (n_c >= 1), so the value put there never counts.
    vert = (1 - F.cosine_similarity(centre[:, :, 1:], features[:, :, :-1], dim=1, eps=COS_EPS),
            1 - F.cosine_similarity(centre[:, :, :-1], features[:, :, 1:], dim=1, eps=COS_EPS))
    horz = (1 - F.cosine_similarity(centre[..., 1:], features[..., :-1], dim=1, eps=COS_EPS),
            1 - F.cosine_similarity(centre[..., :-1], features[..., 1:], dim=1, eps=COS_EPS))
    one_minus_rho = torch.stack([F.pad(vert[0], (0, 0, 1, 0)), F.pad(vert[1], (0, 0, 0, 1)),
                                 F.pad(horz[0], (1, 0)), F.pad(horz[1], (0, 1))], 1)  # [B, 4, H, W]

    weights = []
    for (dy, dx), idx_1d, size in zip(DIRECTIONS, (rows, rows, cols, cols), (h, h, w, w)):
        step = dy + dx  # -1 or +1 along the direction's axis
        nb = idx_1d[None, :] + step * n[:, None]  # [A, L]: neighbour index per class
        inside = ((nb >= 0) & (nb < size)).to(s.dtype)
        nb = nb.clamp(0, size - 1)
        if dy:
            index = nb[None, :, :, None].expand(b, -1, -1, w)
            s_nb, inside = s.gather(2, index), inside[None, :, :, None]
        else:
            index = nb[None, :, None, :].expand(b, -1, h, -1)
            s_nb, inside = s.gather(3, index), inside[None, :, None, :]
        weights.append(inside / (1 + (s_nb - s).abs()))
    # rho does not depend on the class, and every active class is normalised alike, so averaging the
    # weights over the classes first gives the mean of the per-class losses.
    w_mean = torch.stack(weights, 2).mean(1)  # [B, 4, H, W]
    t = one_minus_rho * w_mean
    if mask is None:
        return t.mean()
    m = _mask(mask, sim_max)
    return (t * m).sum() / (m.sum() + 1)
