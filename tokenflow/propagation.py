"""TokenFlow propagation: NN field (Eq. 5) and the weighted combination of keyframe tokens (Eq. 6-7).

Per frame i and self-attention layer, with i- / i+ its nearest past / future keyframe:

    gamma^{i±}[p] = argmin_q D(phi(x^i)[p], phi(x^{i±})[q])           (5)  D: cosine distance
    F(T_base, i, p) = w_i T(i+)[gamma^{i+}[p]] + (1 - w_i) T(i-)[gamma^{i-}[p]]   (6)
    w_i = sigmoid(d- / (d+ + d-)),  d± = |i - i±|                      (7)

phi(x^i) are the self-attention INPUT tokens of the ORIGINAL video's latents at the same step; T are
the EDITED keyframes' self-attention outputs. A keyframe is its own past and future keyframe, so it
passes through the same rule (the paper: "F also modifies the tokens of the sampled keyframes").
A frame before the first keyframe has no past keyframe and uses the future one alone (w = 1); a
frame after the last uses the past one alone (w = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHTINGS = ("sigmoid", "linear")


@dataclass
class Neighbours:
    """For each frame: the slot (position in the keyframe list) of its past and future keyframe,
    and w, the weight of the future keyframe's tokens (Eq. 6)."""

    past: Tensor  # [n] long, slot in keyframes
    future: Tensor  # [n] long
    w: Tensor  # [n] float


def keyframe_neighbours(frames: list[int] | Tensor, keyframes: list[int], weighting: str = "sigmoid") -> Neighbours:
    """Nearest past (<= i) and future (>= i) keyframe of every frame and the Eq. 7 weight."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"propagation weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not keyframes:
        raise ValueError("propagation needs at least one keyframe")
    if any(a >= b for a, b in zip(keyframes, keyframes[1:])):
        # the slots index the keyframe pass's batch, which is in this order: sorting here would
        # silently pair frames with the wrong keyframe's tokens
        raise ValueError(f"propagation: keyframes must be strictly ascending, got {list(keyframes)}")
    kf = torch.as_tensor(list(keyframes))
    frames = torch.as_tensor(frames)
    # searchsorted: index of the first keyframe >= i (future), and of the last keyframe <= i (past)
    future = torch.searchsorted(kf, frames, right=False)
    past = torch.searchsorted(kf, frames, right=True) - 1
    has_future, has_past = future < len(kf), past >= 0
    future, past = future.clamp(max=len(kf) - 1), past.clamp(min=0)
    d_plus = (kf[future] - frames).float()
    d_minus = (frames - kf[past]).float()
    total = d_plus + d_minus
    # at a keyframe both distances are 0 and both terms are the same keyframe: any w gives the same
    ratio = torch.where(total > 0, d_minus / total.clamp(min=1), torch.zeros_like(total))
    w = torch.sigmoid(ratio) if weighting == "sigmoid" else ratio  # Eq. 7 (or the linear variant)
    w = torch.where(~has_past, torch.ones_like(w), w)  # before the first keyframe: future only
    w = torch.where(~has_future, torch.zeros_like(w), w)  # after the last keyframe: past only
    past = torch.where(has_past, past, future)
    future = torch.where(has_future, future, past)
    return Neighbours(past=past, future=future, w=w)


def nn_field(frame_tokens: Tensor, keyframe_tokens: Tensor) -> Tensor:
    """Eq. 5: for each token p of each frame, the index q of its cosine nearest neighbour among
    the tokens of the paired keyframe.

    frame_tokens: [F, N, C]; keyframe_tokens: [F, M, C] (the keyframe paired with each frame)
    -> [F, N] long in [0, M).
    """
    a = F.normalize(frame_tokens.float(), dim=-1)
    b = F.normalize(keyframe_tokens.float(), dim=-1)
    # one frame at a time: the similarity matrix [N, M] is the largest object here (N = M = 4096
    # at 512 px: 64 MB in fp32), never [F, N, M]
    return torch.stack([(a[i] @ b[i].T).argmax(dim=-1) for i in range(a.shape[0])])


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens [..., F, M, C] gathered at index [F, N] along M -> [..., F, N, C]."""
    idx = index[..., None].expand(*tokens.shape[:-3], *index.shape, tokens.shape[-1])
    return torch.gather(tokens, -2, idx)


def propagate(
    keyframe_outputs: Tensor, keyframe_inputs: Tensor, frame_inputs: Tensor, neighbours: Neighbours,
) -> Tensor:
    """Eq. 6 for a batch of frames.

    keyframe_outputs: [B, K, M, C] edited self-attention outputs T_base of the K keyframes, for each
        of B edited branches (e.g. unconditional and conditional);
    keyframe_inputs: [K, M, C] the original video's self-attention inputs at the keyframes;
    frame_inputs: [F, N, C] the original video's self-attention inputs at the frames;
    neighbours: past/future slots and w for these F frames.
    -> [B, F, N, C]
    """
    gamma_minus = nn_field(frame_inputs, keyframe_inputs[neighbours.past])  # [F, N]
    gamma_plus = nn_field(frame_inputs, keyframe_inputs[neighbours.future])  # [F, N]
    t_minus = gather_tokens(keyframe_outputs[:, neighbours.past], gamma_minus)  # [B, F, N, C]
    t_plus = gather_tokens(keyframe_outputs[:, neighbours.future], gamma_plus)
    w = neighbours.w.to(t_plus)[None, :, None, None]  # [1, F, 1, 1], on the tokens' device (built on the CPU)
    return w * t_plus + (1 - w) * t_minus
