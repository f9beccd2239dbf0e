"""Paper Fig. 2 / Fig. 3 tools on the tiny random model and synthetic tokens: PCA against an SVD,
the recorded step against the edit loop itself, the NN field on a known shift, the PNG layouts."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from tokenflow.config import load_config
from tokenflow.edit import EditSettings, LoopWatch, edit_video_latents
from tokenflow.media.sample_clip import make_sample_clip
from tokenflow.media import write_png_frames
from tools.feature_capture import (
    HIGHEST_RES_DECODER_LAYER, edited_tokens, original_tokens, prepare_source, token_grid,
)
from tools.feature_pca import fit_pca, pca_figure
from tokenflow.figures.layout import read_png, tile_grid, write_png
from tools.figures import main as figures_main
from tools.nn_field_figure import PANELS, field_colour, nn_field_figure, nn_field_panels, panel_row, warp_rgb


def tiny_config(tmp_path, video, *overrides):
    return load_config([
        "model=tiny", "size=64", "steps=4", "inversion.steps=8", "progress=false",
        f"inversion.cache_dir={tmp_path / 'cache'}", f"video={video}", *overrides,
    ])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_sample_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=5, size=64)


@pytest.fixture(scope="module")
def source(tmp_path_factory, clip):
    tmp = tmp_path_factory.mktemp("src")
    return prepare_source(tiny_config(tmp, clip))


# ------------------------------------------------------------------------------------------- PCA


def check_against_svd(tokens: torch.Tensor):
    pca = fit_pca(tokens, k=3)
    x = tokens.double() - tokens.double().mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    variances = s[:3] ** 2 / (x.shape[0] - 1)
    torch.testing.assert_close(pca.explained_variance, variances, rtol=1e-6, atol=1e-9)
    for i in range(3):  # the same directions, up to sign
        assert abs(float(pca.components[i] @ vh[i])) == pytest.approx(1.0, abs=1e-6)
    projected = pca.project(tokens)  # [M, 3]
    spread = projected.var(0)
    torch.testing.assert_close(spread, variances, rtol=1e-6, atol=1e-9)
    assert spread[0] >= spread[1] >= spread[2]
    assert pca.total_variance == pytest.approx(float(x.var(0).sum()), rel=1e-9)


def test_pca_of_the_originals_tokens_matches_svd(source):
    _, outputs = original_tokens(source, [0, 2, 4], 1, HIGHEST_RES_DECODER_LAYER)  # [3, 64, 64]
    assert outputs.shape == (3, 64, 64)
    check_against_svd(outputs.reshape(-1, outputs.shape[-1]))


def test_pca_on_anisotropic_data_and_bad_input():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    tokens = (torch.randn(500, 6, generator=g) * scales) @ rotation.T + 3.0
    check_against_svd(tokens)
    with pytest.raises(ValueError, match="need tokens"):
        fit_pca(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="k=5"):
        fit_pca(torch.zeros(10, 4), k=5)


def test_token_grid():
    assert token_grid(64, (8, 8)) == (8, 8)
    assert token_grid(16, (8, 8)) == (4, 4)
    assert token_grid(8 * 12, (8, 12)) == (8, 12)
    assert token_grid(2 * 3, (8, 12)) == (2, 3)
    with pytest.raises(ValueError, match="not a power-of-two"):
        token_grid(10, (8, 8))


# ------------------------------------------------------------------ the recorded step is the edit's


@pytest.mark.parametrize("mode,positions", [("tokenflow", [0, 1, 2, 3, 4]), ("per_frame", [1, 3])])
def test_replayed_step_continues_the_edit_exactly(source, mode, positions):
    """The recorded step lands on the edit loop's own next latents: the recorded tokens are those
    of the real edit, not of an approximation of it."""
    settings = replace(EditSettings.from_config(source.cfg), mode=mode, keyframe_interval=2)
    unet, schedule, ts = source.models.unet, source.models.config.schedule, source.timesteps
    step = 1

    class KeepSteps(LoopWatch):
        def __init__(self):
            super().__init__()
            self.latents = []  # after each step

        def step_done(self, s, t, latents):
            self.latents.append(latents.clone())

    kept = KeepSteps()
    edit_video_latents(unet, schedule, settings, source.prompts, source.source_latents, source.clean, ts, kept)
    now, after = kept.latents[step - 1], kept.latents[step]
    captured = edited_tokens(source, settings, positions, step, HIGHEST_RES_DECODER_LAYER)
    # per_frame runs only the chosen frames: a different batch changes float summation order (~1e-5)
    torch.testing.assert_close(captured.next_latents, after[positions], rtol=1e-4, atol=5e-5)
    assert not torch.allclose(now[positions], after[positions])
    assert captured.edited.shape == captured.source.shape == (len(positions), 64, 64)
    # the source branch is the original video: the same tokens the plain UNet gives
    _, original = original_tokens(source, positions, step, HIGHEST_RES_DECODER_LAYER)
    torch.testing.assert_close(captured.source, original, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(captured.edited, captured.source)  # the edit changes the features
    if mode == "tokenflow":
        assert len(captured.keyframes) == 3  # one per interval of 2 frames: [0,2) [2,4) [4,5)


def test_bad_step_and_layer_are_named(source):
    settings = EditSettings.from_config(source.cfg)
    with pytest.raises(ValueError, match="step 4 is outside the 4 denoising steps"):
        edited_tokens(source, settings, [0], 4, HIGHEST_RES_DECODER_LAYER)
    with pytest.raises(ValueError, match="not a self-attention of this UNet.*up_blocks.3.attentions.2"):
        original_tokens(source, [0], 0, "up_blocks.9.attn1")


def test_pca_figure_has_a_tile_per_variant_and_frame(tmp_path, clip):
    out = tmp_path / "fig2.png"
    fig = pca_figure(tiny_config(tmp_path, clip), out, frames=3, step=1, tile=64)
    assert fig.path == out.resolve() and out.is_file()
    assert fig.frames == [0, 2, 4] and fig.step == 1
    assert (fig.layout.rows, fig.layout.cols) == (4, 3)  # input, original, per-frame, TokenFlow x 3 frames
    assert fig.layout.tile_hw == (64, 64)  # the 8x8 token map, 8x nearest
    image = read_png(out)
    assert image.shape == fig.layout.shape
    assert sum(fig.explained_ratio) < 1 and fig.explained_ratio == sorted(fig.explained_ratio, reverse=True)
    for r in range(1, 4):  # feature rows: constant 8x8 pixel blocks (one token each)
        for c in range(3):
            tile = fig.layout.tile(image, r, c).astype(int)
            blocks = tile.reshape(8, 8, 8, 8, 3)
            assert (blocks == blocks[:, :1, :, :1]).all()
    original, per_frame = fig.layout.tile(image, 1, 0), fig.layout.tile(image, 2, 0)
    assert not np.array_equal(original, per_frame)

    bare = pca_figure(tiny_config(tmp_path, clip), tmp_path / "bare.png", frames=2, step=0, tile=64, with_input_row=False)
    assert (bare.layout.rows, bare.layout.cols) == (3, 2)


def test_tile_grid_rejects_ragged_or_mismatched_tiles():
    a = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="rectangle"):
        tile_grid([[a, a], [a]])
    with pytest.raises(ValueError, match=r"tile \(0, 1\)"):
        tile_grid([[a, np.zeros((5, 4, 3), np.uint8)]])
    with pytest.raises(ValueError, match="1 row_labels for 2 rows"):
        tile_grid([[a], [a]], row_labels=["x"])


def test_tile_grid_places_tiles_pixel_exact_and_draws_labels(tmp_path):
    """matplotlib renders the grid: every tile comes back bit for bit (no resampling), from the
    image and from the written PNG; the labels are ink in the margins; a long last label gets room."""
    rng = np.random.default_rng(3)
    tiles = [[rng.integers(0, 256, (37, 29, 3), dtype=np.uint8) for _ in range(3)] for _ in range(2)]
    image, layout = tile_grid(tiles, row_labels=["input", "per-frame edit"], col_labels=["frame 0", "frame 1", "frame 1234567"])
    assert image.shape == layout.shape and image.dtype == np.uint8
    back = read_png(write_png(tmp_path / "grid.png", image))
    assert np.array_equal(back, image)
    for r in range(2):
        for c in range(3):
            assert np.array_equal(layout.tile(back, r, c), tiles[r][c])
    top, left = layout.boxes[0][0]
    assert top > 0 and left > 0
    assert (image[:top, left:] < 128).any() and (image[top:, :left] < 128).any()  # column / row labels
    assert (image[top:, :left] == 255).mean() > 0.5  # white paper around them
    assert image.shape[1] > layout.boxes[0][2][1] + 29  # room for the long last label
    with pytest.raises(ValueError, match="written as .png"):
        write_png(tmp_path / "grid.jpg", image)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        write_png(tmp_path / "grid.png", image.astype(np.float32))


# -------------------------------------------------------------------------------------- NN field


def shifted_case(grid=(4, 6), block=8, channels=16, seed=0):
    """Source tokens/RGB, and a target that is the source moved right by one token column, with new
    content entering in column 0."""
    g = torch.Generator().manual_seed(seed)
    gh, gw = grid
    src_tokens = torch.randn(gh, gw, channels, generator=g)
    tgt_tokens = torch.cat([torch.randn(gh, 1, channels, generator=g), src_tokens[:, :-1]], dim=1)
    rng = np.random.default_rng(seed)
    src_rgb = rng.integers(0, 256, (gh * block, gw * block, 3), dtype=np.uint8)
    tgt_rgb = np.concatenate([rng.integers(0, 256, (gh * block, block, 3), dtype=np.uint8), src_rgb[:, :-block]], axis=1)
    return src_rgb, tgt_rgb, src_tokens.reshape(gh * gw, channels), tgt_tokens.reshape(gh * gw, channels)


def test_nn_field_recovers_a_one_token_shift():
    grid, block = (4, 6), 8
    src_rgb, tgt_rgb, src_tokens, tgt_tokens = shifted_case(grid, block)
    result = nn_field_panels(src_rgb, tgt_rgb, src_tokens, tgt_tokens, grid)
    field = result.field.reshape(grid)
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    expected = ys * 6 + (xs - 1)
    assert torch.equal(field[:, 1:], expected[:, 1:])  # every token that exists in the source is found
    warped = result.panels["RGB warp"]
    assert np.array_equal(warped[:, block:], tgt_rgb[:, block:])  # zero error away from the new column
    assert result.warp_error < result.identity_error
    assert result.recon_cosine > result.identity_cosine
    assert list(result.panels) == list(PANELS)
    assert all(p.shape == tgt_rgb.shape for p in result.panels.values())
    # the field as colour: red is the matched column, green the matched row
    colour = field_colour(result.field, grid)
    assert colour[2, 3, 0] == round(255 * 2 / 5) and colour[2, 3, 1] == round(255 * 2 / 3) and colour[2, 3, 2] == 0


def test_warp_rgb_identity_and_block_check():
    rgb = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    assert np.array_equal(warp_rgb(rgb, torch.arange(2 * 3), (2, 3)), rgb)
    with pytest.raises(ValueError, match="does not split"):
        warp_rgb(rgb, torch.arange(10), (2, 5))


def test_nn_field_png_has_five_panels(tmp_path):
    src_rgb, tgt_rgb, src_tokens, tgt_tokens = shifted_case()
    result = nn_field_panels(src_rgb, tgt_rgb, src_tokens, tgt_tokens, (4, 6))
    image, layout = panel_row(result.panels, min_side=64)
    assert (layout.rows, layout.cols) == (1, 5) and layout.tile_hw == (64, 96)  # 32x48 enlarged 2x
    assert np.array_equal(layout.tile(image, 0, 1)[::2, ::2], tgt_rgb)


def test_nn_field_figure_of_a_still_clip_is_the_identity(tmp_path):
    """Two identical frames (lossless PNGs) of a textured image: every token's nearest neighbour is
    itself, so the warp reproduces the target exactly, through the whole pipeline and the CLI."""
    frame = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    folder = tmp_path / "still"
    write_png_frames(folder, torch.stack([frame, frame, frame]))
    fig = nn_field_figure(tiny_config(tmp_path, folder), tmp_path / "fig3.png", source_frame=0, target_frame=2, step=2)
    assert torch.equal(fig.result.field, torch.arange(64))
    assert fig.result.warp_error == 0.0 and fig.result.recon_cosine == pytest.approx(1.0, abs=1e-5)
    assert (fig.layout.rows, fig.layout.cols) == (1, 5)
    assert read_png(fig.path).shape == fig.layout.shape
    with pytest.raises(ValueError, match="both 1"):
        nn_field_figure(tiny_config(tmp_path, folder), tmp_path / "x.png", source_frame=1, target_frame=1)
    with pytest.raises(ValueError, match=r"frames \[7\] are outside the clip's 3 selected frames"):
        nn_field_figure(tiny_config(tmp_path, folder), tmp_path / "x.png", source_frame=0, target_frame=7)


def test_figures_cli(tmp_path, clip, capsys):
    common = ["--model", "tiny", "--video", str(clip), "--size", "64", "--steps", "4", "inversion.steps=8",
              f"inversion.cache_dir={tmp_path / 'cache'}"]
    assert figures_main(["nnfield", *common, "--source-frame", "0", "--target-frame", "4", "--out", str(tmp_path / "nn.png")]) == 0
    out = capsys.readouterr().out
    assert "mean |RGB warp - target| =" in out and f"wrote {tmp_path / 'nn.png'}" in out
    assert figures_main(["pca", *common, "--prompt", "a watercolor painting", "--frames", "2",
                         "--out", str(tmp_path / "pca.png"), "--no-input-row"]) == 0
    assert f"wrote {tmp_path / 'pca.png'}" in capsys.readouterr().out
    assert read_png(tmp_path / "pca.png").shape[0] > 3 * 256
    assert figures_main(["pca", *common, "--prompt", "x", "--step", "9", "--out", str(tmp_path / "bad.png")]) == 2
    assert "step 9 is outside" in capsys.readouterr().err
    assert figures_main(["nnfield", *common, "no_such_key=1"]) == 2
    with pytest.raises(SystemExit) as e:
        figures_main(["pca", "--help"])
    assert e.value.code == 0
