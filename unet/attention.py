"""The one attention function of the UNet.

Every attention in the network (self- and cross-attention, plain or TokenFlow's extended attention)
goes through `attention`. Its inputs are explicit: projected queries, keys and values, the head
count, and `joint_frames`, the number of consecutive batch entries that attend *jointly*.

Extended attention (paper Eq. 3-4): with joint_frames=F, the batch [G*F, N, C] is read as G groups
of F frames, and every frame's queries attend to the keys and values of all F frames of its group.
Because all F frames of a group share the same key/value set, we can put their queries side by
side in ONE sequence of F*N queries: a reshape (a view, no copy). The authors' code instead repeats
the concatenated K/V once per frame, memory quadratic in keyframes; here it is linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, *,
    joint_frames: int = 1, upcast: bool = False, query_chunk: int | None = None,
) -> Tensor:
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v.

    q: [B, Nq, C]; k, v: [B, Nk, C] -> [B, Nq, C].
    joint_frames: F > 1 makes groups of F consecutive batch entries attend jointly (Eq. 3-4).
    upcast: compute in float32 (SD-2.1 768 v-model: fp16 scores overflow).
    query_chunk: process at most this many queries at a time, so the score matrix
        [heads, chunk, F*Nk] stays bounded when many frames attend jointly (CPU SDPA materialises it).
    """
    b, nq, c = q.shape
    nk = k.shape[1]
    if c % heads:
        raise ValueError(f"attention: {c} channels do not split into {heads} heads")
    if joint_frames < 1 or b % joint_frames:
        raise ValueError(f"attention: batch {b} is not a whole number of groups of {joint_frames} frames")
    g, f, d = b // joint_frames, joint_frames, c // heads

    # [G*F, N, C] -> [G, F*N, C]: consecutive frames of a group become one long sequence.
    # -> [G, heads, F*N, d] for SDPA.
    q = q.reshape(g, f * nq, heads, d).transpose(1, 2)
    k = k.reshape(g, f * nk, heads, d).transpose(1, 2)
    v = v.reshape(g, f * nk, heads, d).transpose(1, 2)
    dtype = q.dtype
    if upcast and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()

    if query_chunk is None or query_chunk >= f * nq:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = torch.cat(
            [F.scaled_dot_product_attention(q[:, :, s : s + query_chunk], k, v)
             for s in range(0, f * nq, query_chunk)],
            dim=2,
        )
    # [G, heads, F*N, d] -> [G, F*N, heads*d] -> [G*F, N, C]
    return out.to(dtype).transpose(1, 2).reshape(b, nq, c)
