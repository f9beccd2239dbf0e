"""tools.memory_estimate: the live-bytes counter against hand-counted allocations, attention counted
as a fused kernel, and the estimate of a TokenFlow step against the recorded tensors' own sizes."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tools.memory_estimate import FusedAttention, LiveBytes, estimate, main, markdown
from unet.model import UNetConfig

MIB = 2**20


def test_live_bytes_counts_storages_once_and_forgets_freed_ones():
    before = torch.empty(1000, device="meta")  # made before counting: not counted
    with LiveBytes() as live:
        a = torch.empty(256, 1024, device="meta", dtype=torch.float16)  # 0.5 MiB
        view = a[:10].t()  # a view: same storage
        b = torch.empty(MIB, device="meta", dtype=torch.uint8)  # 1 MiB
        assert live.now == 1.5 * MIB
        c = before + 1  # a new 4000-byte tensor
        assert live.now == 1.5 * MIB + 4000
        del a  # the view keeps the storage alive
        assert live.now == 1.5 * MIB + 4000
        del view, c
        assert live.now == MIB
        live.start_phase("second")
        d = torch.empty(MIB // 2, device="meta", dtype=torch.uint8)
        del b, d
    assert live.now == 0 and live.peak == 1.5 * MIB + 4000
    assert live.phase_peaks == {"second": 1.5 * MIB}


def test_attention_is_counted_without_a_score_matrix():
    q = torch.empty(2, 5, 4096, 64, device="meta", dtype=torch.float16)
    with LiveBytes() as math_path:
        F.scaled_dot_product_attention(q, q, q)
    with FusedAttention(), LiveBytes() as fused:
        out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape and out.dtype == q.dtype
    output, lse = q.numel() * 2, 2 * 5 * 4096 * 4
    assert fused.peak == output + lse
    assert math_path.peak >= 2 * 5 * 4096 * 4096 * 2  # the [B, h, N, N] scores a fused kernel never holds


@pytest.fixture(scope="module")
def small():
    # 64 px frames keep the full-size UNet's meta run quick; 24 frames -> 3 keyframes
    return {n: estimate(n, size=64, keyframe_interval=8, batch_size=4) for n in (24, 48)}


def test_recorded_tokens_are_three_copies_of_every_self_attention_input(small):
    cfg = UNetConfig.sd21_base()
    # self-attention layers per level: 2 down + 3 up, + 1 in the middle block; 64 px -> 8x8 latents
    tokens_channels = 0
    for level, ch in enumerate(cfg.block_out_channels):
        if cfg.attention_levels[level]:
            tokens_channels += 5 * (8 >> level) ** 2 * ch
    tokens_channels += (8 >> 3) ** 2 * cfg.block_out_channels[-1]
    for n, est in small.items():
        keyframes = n // 8
        assert est.keyframes == keyframes
        # source inputs + two edited branches' outputs, float16
        assert est.recorded_gib * 2**30 == 3 * keyframes * tokens_channels * 2


def test_step_memory_grows_with_keyframes_not_with_frames_per_batch(small):
    a, b = small[24], small[48]
    assert a.weights_gib == b.weights_gib and 2.3 < a.weights_gib < 2.5  # 1.29 G parameters in float16
    assert b.latents_gib == 2 * a.latents_gib
    # the propagation batch is the same 4 frames: only what the step keeps (recorded tokens, latents) differs
    grown = (b.propagation_peak_gib - a.propagation_peak_gib) - (b.recorded_gib - a.recorded_gib)
    assert abs(grown) * 2**30 <= 3 * 48 * 4 * 8 * 8 * 2  # at most a few latent-sized tensors
    assert b.keyframe_pass_peak_gib > a.keyframe_pass_peak_gib
    assert b.total_gib > b.weights_gib + b.recorded_gib


def test_cli_prints_the_table_and_rejects_bad_sizes(tmp_path, capsys):
    out = tmp_path / "mem.md"
    assert main(["--frames", "16", "--size", "64", "--markdown", str(out)]) == 0
    printed = capsys.readouterr()
    assert "| 16 | 2 | " in out.read_text() and out.read_text() in printed.out
    assert f"wrote {out}" in printed.err
    with pytest.raises(SystemExit):
        main(["--frames", "16", "--size", "100"])
    assert "size a multiple of 64, got 16 and 100" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--frames", "0"])


def test_vae_stages_are_counted_and_bounded_by_the_vae_batch_not_the_frames(small):
    """The VAE's batches (inversion.batch_size frames per forward) peak at full resolution: the
    decoder's last level holds an upsampled 256-channel map and 128-channel activations of every
    frame of the batch; frames beyond the batch add nothing."""
    eight, also_eight = small[24], small[48]  # both at the default batch of 8 frames
    four = estimate(24, size=64, keyframe_interval=8, batch_size=4, inversion_batch_size=4)
    assert eight.vae_batch_size == 8 and four.vae_batch_size == 4
    assert eight.vae_decode_peak_gib == also_eight.vae_decode_peak_gib
    assert eight.vae_encode_peak_gib == also_eight.vae_encode_peak_gib
    assert 1.9 < eight.vae_decode_peak_gib / four.vae_decode_peak_gib < 2.1
    assert 1.9 < eight.vae_encode_peak_gib / four.vae_encode_peak_gib < 2.1
    full_res = 64 * 64 * 2  # bytes per channel of one float16 frame at 64 px
    assert eight.vae_decode_peak_gib * 2**30 >= 8 * (256 + 128) * full_res
    assert eight.vae_encode_peak_gib * 2**30 >= 8 * (3 + 128 + 128) * full_res  # image copy, conv_in, first resnet
    largest = max(eight.keyframe_pass_peak_gib, eight.propagation_peak_gib, eight.inversion_peak_gib,
                  eight.vae_encode_peak_gib, eight.vae_decode_peak_gib)
    assert eight.total_gib == pytest.approx(eight.weights_gib + eight.latents_gib + largest)
    # the loop's latents are the float32 DDIM state: current, original x_t, clean
    assert eight.latents_gib * 2**30 == 3 * 24 * 4 * 8 * 8 * 4


def test_every_real_model_preset_can_be_estimated():
    """--model takes every preset with weights (tokenflow/models/presets.py): SD-1.5's estimate differs (its 8 wide heads
    and 768-wide text), SD-2.0-base's equals SD-2.1-base's (the same architecture)."""
    from tools.memory_estimate import MODELS

    assert {"sd15", "sd20_base", "sd21_base", "sd21"} <= set(MODELS)
    sd15, sd20, sd21 = (MODELS[m] for m in ("sd15", "sd20_base", "sd21_base"))
    assert sd20 == sd21 and sd15[0]().cross_attention_dim == 768 and sd15[2]().width == 768
    from tools.memory_estimate import estimate

    a, b = estimate(8, size=256, model="sd15"), estimate(8, size=256, model="sd21_base")
    assert 0 < a.total_gib and a.weights_gib < b.weights_gib  # SD-1.5: 859.5M UNet + 123M text vs 865.9M + 340M


def test_readme_and_docs_quote_the_tools_figure_for_a_40_frame_edit():
    """One figure for the device memory of the default 40-frame edit, the tool's, wherever it is quoted."""
    repo = Path(__file__).resolve().parents[1]
    total = estimate(40, 512, "float16", "tokenflow", 8, 8, 8, 16384).total_gib
    table = (repo / "docs" / "memory.md").read_text()
    assert re.search(rf"^\| 40 \| 5 \| .* \| {total:.2f} \|$", table, re.M), "docs/memory.md's table is not the tool's"
    quoted = {}
    for page in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        if page.name != "memory.md":  # its table and batch-size variants are checked above
            for figure in re.findall(r"40 frames[^.;]*?(\d+(?:\.\d+)?) GiB", page.read_text()):
                quoted.setdefault(figure, []).append(page.name)
    assert "README.md" in quoted.get(f"{total:.1f}", []) and set(quoted) == {f"{total:.1f}"}, quoted


def test_controlnet_adds_its_weights_and_each_pass_its_forward(small):
    from tokenflow.models.controlnet_loading import build_random_controlnet

    plain = small[24]
    with_cn = estimate(24, size=64, keyframe_interval=8, batch_size=4, controlnet=True)
    net = build_random_controlnet(UNetConfig.sd21_base(), device="meta")
    cn_bytes = sum(p.numel() for p in net.parameters()) * 2  # float16
    assert (with_cn.weights_gib - plain.weights_gib) * 2**30 == cn_bytes
    assert 0.6 < cn_bytes / 2**30 < 0.7  # ~361 M parameters
    assert with_cn.latents_gib == plain.latents_gib  # the control images stay in host memory
    assert with_cn.recorded_gib == plain.recorded_gib
    assert with_cn.keyframe_pass_peak_gib > plain.keyframe_pass_peak_gib
    assert with_cn.propagation_peak_gib > plain.propagation_peak_gib
    assert "with ControlNet" in markdown([with_cn], 24, 1.5)
