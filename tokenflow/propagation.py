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

Two rules pick the two keyframes a frame blends and their weight (`tokenflow.propagation=`):

  paper (default), as printed above: i- / i+ the nearest keyframes at or before / at or after i,
      d± = |i - i±| their distances, w = sigmoid(d- / (d+ + d-)) on i+.
  released, as the authors' released code computes it: frames in consecutive groups of the keyframe
      interval L, group b = floor(i / L) holding keyframe k_b (one drawn per interval). A frame of
      group b > 0 blends k_b (weight w) and k_{b-1} (weight 1 - w), whichever side of the frame
      they lie on, with distances to the group CENTRES c_b = L b + floor(L / 2):
          d_cur = |i - c_b|,  d_prev = |i - c_{b-1}|,  w = sigmoid(d_prev / (d_cur + d_prev));
      a frame of group 0 takes k_0 alone. The released code floors the frame count to a multiple
      of L, so it never meets a shorter last group; here a shorter last group keeps its nominal
      centre L b + floor(L / 2) (as if it were full) and its own keyframe k_b.
  The released code also propagates the SOURCE branch through the same NN field and weights
  (its self-attention output is gathered from the source keyframes' outputs instead of attending);
  that half of the rule lives in controls.py (`Propagation.propagate_source`).

`Neighbours` stores, for both rules, the earlier (`past`) and the later (`future`) of the two
keyframes a frame blends, and w, the weight of the later one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHTINGS = ("sigmoid", "linear")
RULES = ("paper", "released")


@dataclass
class Neighbours:
    """For each frame: the slots (positions in the keyframe list) of the earlier (`past`) and the
    later (`future`) of the two keyframes it blends, and w, the weight of the later one (Eq. 6)."""

    past: Tensor  # [n] long, slot in keyframes
    future: Tensor  # [n] long
    w: Tensor  # [n] float

    def to(self, device) -> "Neighbours":
        """On the tokens' device, once per step: indexing device tokens with CPU indices would copy
        them host-to-device (and synchronise) in every self-attention layer of every batch."""
        return Neighbours(past=self.past.to(device), future=self.future.to(device), w=self.w.to(device))

    def subset(self, frames: list[int]) -> "Neighbours":
        """The rows of `frames`, in that order (one propagation batch)."""
        index = torch.as_tensor(frames, device=self.past.device)
        return Neighbours(past=self.past[index], future=self.future[index], w=self.w[index])


def keyframe_neighbours(
    frames: list[int] | Tensor, keyframes: list[int], weighting: str = "sigmoid", *,
    rule: str = "paper", interval: int | None = None,
) -> Neighbours:
    """The two keyframes every frame blends and the weight of the later one, by `rule`:
    "paper" (Eq. 7, `paper_neighbours`) or "released" (the released code, `released_neighbours`,
    which needs the keyframe `interval`)."""
    if rule not in RULES:
        raise ValueError(f"tokenflow.propagation must be one of {RULES}, got {rule!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"propagation weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not keyframes:
        raise ValueError("propagation needs at least one keyframe")
    if any(a >= b for a, b in zip(keyframes, keyframes[1:])):
        # the slots index the keyframe pass's batch, which is in this order: sorting here would
        # silently pair frames with the wrong keyframe's tokens
        raise ValueError(f"propagation: keyframes must be strictly ascending, got {list(keyframes)}")
    if rule == "paper":
        return paper_neighbours(torch.as_tensor(frames), torch.as_tensor(list(keyframes)), weighting)
    if interval is None or interval < 1:
        raise ValueError(f"the released propagation rule needs the keyframe interval (>= 1), got {interval!r}")
    return released_neighbours(torch.as_tensor(frames), list(keyframes), interval, weighting)


def _weight(ratio: Tensor, weighting: str) -> Tensor:
    """Eq. 7's squashing of a distance ratio in [0, 1]: sigmoid as printed, or the ratio itself."""
    return torch.sigmoid(ratio) if weighting == "sigmoid" else ratio


def paper_neighbours(frames: Tensor, kf: Tensor, weighting: str) -> Neighbours:
    """Eq. 6-7 as printed: nearest keyframe at or before (i-) and at or after (i+) each frame,
    w = sigmoid(d- / (d+ + d-)) on i+, d± = |i - i±|."""
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
    w = _weight(ratio, weighting)  # Eq. 7 (or the linear variant)
    w = torch.where(~has_past, torch.ones_like(w), w)  # before the first keyframe: future only
    w = torch.where(~has_future, torch.zeros_like(w), w)  # after the last keyframe: past only
    past = torch.where(has_past, past, future)
    future = torch.where(has_future, future, past)
    return Neighbours(past=past, future=future, w=w)


def released_neighbours(frames: Tensor, keyframes: list[int], interval: int, weighting: str) -> Neighbours:
    """The released code's rule: frame i of group b = floor(i / L) blends k_b (weight w) and
    k_{b-1}; w = sigmoid(d_prev / (d_cur + d_prev)) with distances to the group centres
    c_b = L b + floor(L / 2); group 0 takes k_0 alone (see the module docstring)."""
    groups = [k // interval for k in keyframes]
    if groups != list(range(len(keyframes))):
        raise ValueError(
            f"the released propagation rule needs one keyframe in each interval of {interval} frames "
            f"(slot b in frames [{interval}b, {interval}b+{interval})), got keyframes {keyframes} in intervals {groups}; "
            "use tokenflow.mode=tokenflow (random keyframes) or tokenflow.propagation=paper"
        )
    group = torch.div(frames, interval, rounding_mode="floor")  # [n] b
    if (group >= len(keyframes)).any():
        raise ValueError(f"released propagation: frame {int(frames.max())} lies past the last keyframe interval "
                         f"({len(keyframes)} keyframes of interval {interval})")
    centre_cur = (interval * group + interval // 2).float()  # c_b
    d_cur = (frames - centre_cur).abs()
    d_prev = (frames - (centre_cur - interval)).abs()  # c_{b-1} = c_b - L
    w = _weight(d_prev / (d_cur + d_prev), weighting)  # d_cur + d_prev >= L > 0
    first = group == 0
    w = torch.where(first, torch.ones_like(w), w)  # group 0: its own keyframe alone
    past = torch.where(first, group, group - 1)
    return Neighbours(past=past, future=group.clone(), w=w)


SIMILARITY_BYTES = 64 * 2**20  # bound on one chunk of similarity matrices [f, N, M] in nn_field


def nn_field(frame_tokens: Tensor, keyframe_tokens: Tensor) -> Tensor:
    """Eq. 5: for each token p of each frame, the index q of its cosine nearest neighbour among
    the tokens of the paired keyframe.

    frame_tokens: [F, N, C]; keyframe_tokens: [F, M, C] (the keyframe paired with each frame)
    -> [F, N] long in [0, M).

    The tokens are normalised in float32 and the similarities computed in the tokens' own dtype:
    float16/bfloat16 on a GPU runs on tensor cores (about 15x float32's rate), where this matmul
    would otherwise add a third to the editing time. Rounding can flip the argmax of a near tie
    (two keyframe tokens within the dtype's resolution of each other), never a clear winner.
    """
    dtype = frame_tokens.dtype
    a = F.normalize(frame_tokens.float(), dim=-1).to(dtype)
    b = F.normalize(keyframe_tokens.float(), dim=-1).to(dtype)
    f, n, m = a.shape[0], a.shape[1], b.shape[1]
    # batched matmuls over a few frames at a time: the similarities [f, N, M] are the largest
    # objects here (N = M = 4096 at 512 px: 32 MiB per frame in float16), never all F at once
    per_chunk = max(1, SIMILARITY_BYTES // max(1, n * m * a.element_size()))
    fields = [torch.bmm(a[s : s + per_chunk], b[s : s + per_chunk].transpose(1, 2)).argmax(dim=-1)
              for s in range(0, f, per_chunk)]
    return torch.cat(fields) if fields else torch.empty(0, n, dtype=torch.long, device=a.device)


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens [..., F, M, C] gathered at index [F, N] along M -> [..., F, N, C]."""
    idx = index[..., None].expand(*tokens.shape[:-3], *index.shape, tokens.shape[-1])
    return torch.gather(tokens, -2, idx)


@dataclass
class NNFields:
    """Eq. 5 for a batch of frames against their two keyframes."""

    past: Tensor  # [F, N] gamma^{i-}: token index in the earlier keyframe
    future: Tensor  # [F, N] gamma^{i+}: token index in the later keyframe


def nn_fields(keyframe_inputs: Tensor, frame_inputs: Tensor, neighbours: Neighbours) -> NNFields:
    """keyframe_inputs: [K, M, C] the original video's self-attention inputs at the keyframes;
    frame_inputs: [F, N, C] the same at the frames; neighbours: for these F frames."""
    return NNFields(
        past=nn_field(frame_inputs, keyframe_inputs[neighbours.past]),
        future=nn_field(frame_inputs, keyframe_inputs[neighbours.future]),
    )


def blend(keyframe_outputs: Tensor, fields: NNFields, neighbours: Neighbours) -> Tensor:
    """Eq. 6: w T(i+)[gamma^{i+}] + (1 - w) T(i-)[gamma^{i-}].

    keyframe_outputs: [B, K, M, C] self-attention outputs of the K keyframes for B branches -> [B, F, N, C]
    """
    t_minus = gather_tokens(keyframe_outputs[:, neighbours.past], fields.past)  # [B, F, N, C]
    t_plus = gather_tokens(keyframe_outputs[:, neighbours.future], fields.future)
    w = neighbours.w.to(t_plus)[None, :, None, None]  # [1, F, 1, 1]
    return w * t_plus + (1 - w) * t_minus


def propagate(
    keyframe_outputs: Tensor, keyframe_inputs: Tensor, frame_inputs: Tensor, neighbours: Neighbours,
) -> Tensor:
    """Eq. 5-6 for a batch of frames.

    keyframe_outputs: [B, K, M, C] edited self-attention outputs T_base of the K keyframes, for each
        of B branches (e.g. unconditional and conditional);
    keyframe_inputs: [K, M, C] the original video's self-attention inputs at the keyframes;
    frame_inputs: [F, N, C] the original video's self-attention inputs at the frames;
    neighbours: past/future slots and w for these F frames.
    -> [B, F, N, C]
    """
    return blend(keyframe_outputs, nn_fields(keyframe_inputs, frame_inputs, neighbours), neighbours)
