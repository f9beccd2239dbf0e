"""Full-size check: a diffusers folder of each preset's real configs with random weights (and, for an
SD-1.x preset, the same weights as one ldm file), loaded by `tokenflow.load_models`, compared with
diffusers' UNet and transformers' text encoder; and the peak memory of loading the UNet.

    python -m tools.maintainers.check_full_size [--model sd21_base sd15 ...] [--dir /tmp/random-sd] [--keep]
        [--parts models controlnet]

--model takes every preset of tokenflow.models.presets that has weights; the random-only tiny presets
have no full size to check.

Writes the folder with diffusers/transformers (random weights, ~3.5 GB in fp32 for the UNet), then in
fresh subprocesses: (1) loads the UNet alone with our loader and reports the peak RSS increase
against the size of the weights (our loader builds on the meta device and assigns tensors read in
the target dtype: at most one copy). With safetensors 0.8 (checked: the tensor's data pointer lies
in a private file mapping, /proc/self/maps), `safe_open(...).get_tensor` on the CPU returns a view
of a copy-on-write memory map of the file, not a copy: the float32 run's weights are file-backed
page cache (in all RSS, not in anonymous memory) as they are paged in; the float16 run casts each
float32 tensor as it is read, so its weights are new anonymous memory, one tensor converted at a
time. (2) loads everything with `load_models` and compares one UNet
forward at 64x64 latents with diffusers' and the text features of two prompts with transformers'
(max abs differences). SD-1.5's ldm file (v1-5-pruned-emaonly layout: cond_stage_model.transformer.*,
position_ids included) is written from the folder's tensors by the test-only writers in tests/
(tests/ldm_writer_*.py), and compared with diffusers' UNet read from the folder. Needs diffusers and
transformers (the test extras); the product never imports them.

ControlNet (`--parts controlnet`): a random full-size ControlNet of the preset's family written by
diffusers (`ControlNetModel` with the preset's UNet settings, its zero convolutions drawn non-zero so
every tensor matters) as a diffusers folder (DIR/NAME/controlnet) and, by the test-only writer
tests/ldm_writer_controlnet.py, as an original single file (control_model.* keys); each loaded by
`load_controlnet` and compared with diffusers' ControlNetModel at 64x64 latents (512x512 condition,
scale 0.8): the 13 residuals' max abs difference. Then the UNet given diffusers' residuals, against
diffusers' UNet given the same (down_block_additional_residuals / mid_block_additional_residual).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenflow.models.presets import PRESETS, with_weights

LOAD_UNET = r"""
import json, sys, threading, time, torch
from tokenflow.models.checkpoint import assign_strict, read_json, read_safetensors
from tokenflow.measure import proc_status_mb as status  # MiB, from /proc/self/status
from unet.model import UNet, UNetConfig

peak = {"anon": 0.0, "rss": 0.0}
def sample():  # a sampling thread: the peak of anonymous memory (what a copy costs) and of all RSS
    while not done:
        peak["anon"] = max(peak["anon"], status("RssAnon")); peak["rss"] = max(peak["rss"], status("VmRSS"))
        time.sleep(0.005)
root, dtype = sys.argv[1], getattr(torch, sys.argv[2])
base_anon, base_rss = status("RssAnon"), status("VmRSS")
done = False
t = threading.Thread(target=sample); t.start()
cfg = UNetConfig.from_diffusers_config(read_json(root + "/unet/config.json"))
f = root + "/unet/diffusion_pytorch_model.safetensors"
with torch.device("meta"):
    unet = UNet(cfg)
unet = assign_strict(unet, read_safetensors(f, dtype=dtype), source=f)
touched = sum(float(p.float().abs().sum()) for p in unet.parameters())  # every weight paged in
done = True; t.join()
weights = sum(p.numel() * p.element_size() for p in unet.parameters())
print(json.dumps({"weights_mb": weights / 2**20, "anon_peak_increase_mb": peak["anon"] - base_anon,
                  "rss_peak_increase_mb": peak["rss"] - base_rss, "params": sum(p.numel() for p in unet.parameters())}))
"""

COMPARE = r"""
import json, sys, torch
import tokenflow
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel
source, root = sys.argv[1], sys.argv[2]  # what load_models reads; the diffusers folder of the same weights
models = tokenflow.load_models(source)
kind, width = models.config.kind, models.unet.config.cross_attention_dim
torch.manual_seed(0)
x, ctx = torch.randn(1, 4, 64, 64), torch.randn(1, 77, width)
ids = models.tokenizer(["a marble sculpture of a wolf, 8k", "a woman running"])
with torch.no_grad():
    ours, ours_text = models.unet(x, 981, ctx), models.text_encoder(ids)
del models
ref = UNet2DConditionModel.from_pretrained(root, subfolder="unet").eval()
with torch.no_grad():
    want = ref(x, 981, ctx).sample
del ref
text = CLIPTextModel.from_pretrained(root, subfolder="text_encoder").eval()
with torch.no_grad():
    want_text = text(input_ids=ids).last_hidden_state
print(json.dumps({"kind": kind, "unet_max_abs_diff": (ours - want).abs().max().item(), "output_abs_mean": want.abs().mean().item(),
                  "text_max_abs_diff": (ours_text - want_text).abs().max().item()}))
"""


COMPARE_CONTROLNET = r"""
import json, sys, torch
from diffusers import ControlNetModel, UNet2DConditionModel
from tokenflow.models.checkpoint import assign_strict, read_json, read_safetensors
from tokenflow.models.controlnet_loading import load_controlnet
from unet.control import ControlResiduals
from unet.model import UNet, UNetConfig
source, folder, root = sys.argv[1:4]  # what load_controlnet reads; the same ControlNet as a diffusers folder; the SD folder
ucfg = UNetConfig.from_diffusers_config(read_json(root + "/unet/config.json"))
ours = load_controlnet(source, ucfg)
torch.manual_seed(0)
x, ctx, cond = torch.randn(1, 4, 64, 64), torch.randn(1, 77, ucfg.cross_attention_dim), torch.rand(1, 3, 512, 512)
with torch.no_grad():
    got = ours(x, 981, ctx, cond, 0.8)
del ours
ref = ControlNetModel.from_pretrained(folder).eval()
with torch.no_grad():
    down, mid = ref(x, 981, ctx, cond, conditioning_scale=0.8, return_dict=False)
del ref
diff = max([(a - b).abs().max().item() for a, b in zip(got.down, down)] + [(got.mid - mid).abs().max().item()])
out = {"residuals_max_abs_diff": diff, "residual_abs_mean": float(torch.stack([d.abs().mean() for d in down]).mean()),
       "count": len(got.down) + 1}
if sys.argv[4] == "unet":
    f = root + "/unet/diffusion_pytorch_model.safetensors"
    with torch.device("meta"):
        unet = UNet(ucfg)
    unet = assign_strict(unet, read_safetensors(f), source=f).eval()
    with torch.no_grad():
        ours_out, plain = unet(x, 981, ctx, residuals=ControlResiduals(list(down), mid)), unet(x, 981, ctx)
    del unet
    ref = UNet2DConditionModel.from_pretrained(root, subfolder="unet").eval()
    with torch.no_grad():
        want = ref(x, 981, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    out.update(unet_max_abs_diff=(ours_out - want).abs().max().item(), residual_effect=(want - plain).abs().max().item())
print(json.dumps(out))
"""


def write_random_controlnet(root: Path, preset) -> Path:
    """A random full-size ControlNet for `preset`'s UNet, as diffusers writes it: root/controlnet."""
    import torch
    from diffusers import ControlNetModel

    unet = preset.unet()
    torch.manual_seed(1)
    net = ControlNetModel(
        block_out_channels=unet.block_out_channels, layers_per_block=unet.layers_per_block,
        attention_head_dim=list(unet.heads), cross_attention_dim=unet.cross_attention_dim,
        use_linear_projection=unet.use_linear_projection, upcast_attention=unet.upcast_attention,
    )
    with torch.no_grad():  # a trained ControlNet's zero convs are not zero: draw them, so they are compared too
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.reset_parameters()
    net.save_pretrained(root / "controlnet")
    return root / "controlnet"


def write_controlnet_single_file(folder: Path, path: Path, preset) -> Path:
    """The folder's ControlNet as one original-layout file, by the test-only writer (tests/ldm_writer_controlnet.py)."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from ldm_writer_controlnet import diffusers_controlnet_to_ldm

    unet = preset.unet()
    state = diffusers_controlnet_to_ldm(load_file(folder / "diffusion_pytorch_model.safetensors"),
                                        len(unet.block_out_channels), unet.layers_per_block, unet.attention_levels)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def report_controlnet(model: str, root: Path, preset) -> bool:
    folder = root / "controlnet"
    if not (folder / "config.json").is_file():
        print(f"writing a random full-size {model} ControlNet to {folder} ...", flush=True)
        write_random_controlnet(root, preset)
    single = root / "controlnet-single" / f"control_random_{model}.safetensors"
    if not single.is_file():
        write_controlnet_single_file(folder, single, preset)
    ok = True
    for label, source, with_unet in (("diffusers folder", folder, "unet"), ("original single file", single, "-")):
        cmp = run(COMPARE_CONTROLNET, source, folder, root, with_unet)
        line = (f"{model} ControlNet {label}: load_controlnet vs diffusers ControlNetModel at 64x64 latents: "
                f"{cmp['count']} residuals, max abs diff {cmp['residuals_max_abs_diff']:.2e} "
                f"(residual mean |x| {cmp['residual_abs_mean']:.3f})")
        ok &= cmp["residuals_max_abs_diff"] <= 1e-4
        if "unet_max_abs_diff" in cmp:
            line += (f"; UNet with diffusers' residuals vs diffusers' UNet with them: {cmp['unet_max_abs_diff']:.2e} "
                     f"(the residuals move the output by up to {cmp['residual_effect']:.3f})")
            ok &= cmp["unet_max_abs_diff"] <= 1e-4
        print(line, flush=True)
    return ok


def write_random_sd2(root: Path, preset) -> Path:
    """An SD-2.x preset's published configs: SD-2.1-base's, with SD-2.1's 96-latent sample size,
    upcast attention and v-prediction where the preset has them."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = preset.unet()
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=unet.sample_size, upcast_attention=unet.upcast_attention,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=[5, 10, 20, 20],
        cross_attention_dim=1024, use_linear_projection=True, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).save_pretrained(root / "unet")
    write_random_vae(root)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, num_attention_heads=16, num_hidden_layers=23, intermediate_size=4096,
        hidden_act="gelu", max_position_embeddings=77, projection_dim=512,
    )).save_pretrained(root / "text_encoder")
    # the published stable-diffusion-2-1-base schedule (sd21.md), as its folder carries it
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=preset.prediction_type,
    ).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def write_random_vae(root: Path) -> None:
    """The VAE every SD-1.x/2.x folder carries (the same architecture and config), random, into root/vae."""
    from diffusers import AutoencoderKL

    AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
    ).save_pretrained(root / "vae")


def write_random_sd15(root: Path, preset=None) -> Path:
    """SD-1.5's published configs (sd15-and-released-code.md): 8 heads everywhere (attention_head_dim: 8),
    conv proj_in/proj_out (use_linear_projection absent, i.e. false), 768-wide OpenAI CLIP ViT-L/14 text
    tower with quick_gelu, and its PNDM scheduler config without prediction_type (epsilon)."""
    import torch
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).save_pretrained(root / "unet")
    write_random_vae(root)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072,
        hidden_act="quick_gelu", max_position_embeddings=77, projection_dim=768,
    )).save_pretrained(root / "text_encoder")
    PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    ).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def write_sd15_ldm_file(root: Path, path: Path) -> Path:
    """The folder's tensors as one SD-1.5 ldm file, by the test-only writers (tests/ldm_writer_*.py)."""
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from ldm_writer_text import transformers_text_to_ldm_sd1
    from ldm_writer_unet import diffusers_unet_to_ldm
    from ldm_writer_vae import diffusers_vae_to_ldm

    state = diffusers_unet_to_ldm(load_file(root / "unet" / "diffusion_pytorch_model.safetensors"), 4, 2, (True, True, True, False))
    vae = diffusers_vae_to_ldm(load_file(root / "vae" / "diffusion_pytorch_model.safetensors"))
    state.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    text = {(k if k.startswith("text_model.") else f"text_model.{k}"): v
            for k, v in load_file(root / "text_encoder" / "model.safetensors").items()}
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as v1-5-pruned-emaonly holds it
    state.update(transformers_text_to_ldm_sd1(text))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def report_compare(label: str, source: Path, root: Path) -> bool:
    cmp = run(COMPARE, source, root)
    print(f"{label}: load_models({source}) [kind {cmp['kind']}] vs diffusers UNet at 64x64 latents: max abs diff "
          f"{cmp['unet_max_abs_diff']:.2e} (output mean |x| {cmp['output_abs_mean']:.3f}); text vs transformers "
          f"CLIPTextModel: {cmp['text_max_abs_diff']:.2e}", flush=True)
    return cmp["unet_max_abs_diff"] <= 1e-4 and cmp["text_max_abs_diff"] <= 1e-4


def report_memory(root: Path) -> None:
    for dtype in ("float32", "float16"):
        load = run(LOAD_UNET, root, dtype)
        print(f"UNet {dtype}: {load['params']:,} parameters, weights {load['weights_mb']:.0f} MB; peak while loading "
              f"(every weight touched): anonymous memory +{load['anon_peak_increase_mb']:.0f} MB "
              f"({load['anon_peak_increase_mb'] / load['weights_mb']:.2f}x the weights), all RSS incl. the "
              f"memory-mapped file +{load['rss_peak_increase_mb']:.0f} MB", flush=True)


def run(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.maintainers.check_full_size", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", nargs="+", choices=with_weights(), default=["sd21_base", "sd15"],
                   help="which random full-size presets to write and check (default: sd21_base sd15; the tiny "
                        "presets are random-only, with no full size to check)")
    p.add_argument("--dir", type=Path, default=None,
                   help="where to write the random folders, DIR/NAME each, an SD-1.x one's ldm file under ldm/ (default: temp dirs)")
    p.add_argument("--keep", action="store_true", help="keep the folders afterwards")
    p.add_argument("--parts", nargs="+", choices=["models", "controlnet"], default=["models", "controlnet"],
                   help="what to check: the models (loading memory, UNet and text parity) and/or a ControlNet of "
                        "each preset's family (both layouts, and the UNet given its residuals); default both")
    args = p.parse_args(argv)
    ok = True
    for model in args.model:
        preset = PRESETS[model]
        given = args.dir / model if args.dir else None
        root = given or Path(tempfile.mkdtemp(prefix=f"{model}-random-"))
        try:
            if not (root / "unet" / "config.json").is_file():
                print(f"writing a random full-size {model} diffusers folder to {root} ...", flush=True)
                {"sd1": write_random_sd15, "sd2": write_random_sd2}[preset.kind](root, preset)
            if "models" in args.parts:
                report_memory(root)
                ok &= report_compare(f"{model} diffusers folder", root, root)
                if preset.kind == "sd1":
                    ldm = root / "ldm" / "v1-5-pruned-emaonly.safetensors"
                    if not ldm.is_file():
                        print(f"writing the same weights as one ldm file {ldm} ...", flush=True)
                        write_sd15_ldm_file(root, ldm)
                    ok &= report_compare(f"{model} ldm file", ldm, root)
            if "controlnet" in args.parts:
                ok &= report_controlnet(model, root, preset)
        finally:
            if not args.keep and given is None:
                shutil.rmtree(root, ignore_errors=True)
                print(f"removed {root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
