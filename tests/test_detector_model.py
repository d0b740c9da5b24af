"""The D³ model against an independent, plain-torch implementation of the spec (tiny config, CPU fp32)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from api.detector.config import DetectorConfig
from api.detector.errors import DetectorError
from api.detector.factory import build_model, resolve_device, resolve_precision
from api.detector.model import (
    D3Head,
    build_visual,
    feature_dim,
    shuffle_patches,
    shuffle_permutation,
    uses_quick_gelu,
)
from api.detector.preprocess import CLIP_MEAN, CLIP_STD, gaussian_blur, jpeg_reencode, preprocess_image

WIDTH, LAYERS, HEADS, GRID, PATCH = 64, 2, 2, 16, 14  # d3-tiny's vision tower


# ---------------------------------------------------------------- the test's own state_dicts
def make_visual_state(seed: int) -> dict[str, torch.Tensor]:
    """OpenAI/open_clip layout of a tiny ViT image tower, written key by key (no open_clip involved)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.05, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    sd = {
        "class_embedding": rnd(WIDTH, std=0.5),
        "positional_embedding": rnd(GRID * GRID + 1, WIDTH, std=0.5),
        "proj": rnd(WIDTH, 32),
        "conv1.weight": rnd(WIDTH, 3, PATCH, PATCH, std=0.03),
        "ln_pre.weight": rnd(WIDTH, std=0.1, mean=1.0),
        "ln_pre.bias": rnd(WIDTH, std=0.1),
        "ln_post.weight": rnd(WIDTH, std=0.1, mean=1.0),
        "ln_post.bias": rnd(WIDTH, std=0.1),
    }
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": rnd(WIDTH, std=0.1, mean=1.0), p + "ln_1.bias": rnd(WIDTH, std=0.1),
            p + "attn.in_proj_weight": rnd(3 * WIDTH, WIDTH, std=0.3), p + "attn.in_proj_bias": rnd(3 * WIDTH),
            p + "attn.out_proj.weight": rnd(WIDTH, WIDTH, std=0.2), p + "attn.out_proj.bias": rnd(WIDTH),
            p + "ln_2.weight": rnd(WIDTH, std=0.1, mean=1.0), p + "ln_2.bias": rnd(WIDTH, std=0.1),
            p + "mlp.c_fc.weight": rnd(4 * WIDTH, WIDTH, std=0.3), p + "mlp.c_fc.bias": rnd(4 * WIDTH, std=0.3),
            p + "mlp.c_proj.weight": rnd(WIDTH, 4 * WIDTH, std=0.2), p + "mlp.c_proj.bias": rnd(WIDTH),
        })
    return sd


def make_head_state(seed: int, dim: int = WIDTH) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ("query", "key", "value"):
        sd[f"{name}.weight"] = torch.randn(dim, dim, generator=g) * 0.4
        sd[f"{name}.bias"] = torch.randn(dim, generator=g) * 0.1
    sd["fc.weight"] = torch.randn(1, 2 * dim, generator=g) * 0.06
    sd["fc.bias"] = torch.randn(1, generator=g) * 0.1
    return sd


def save_tiny_checkpoints(tmp_path, seed: int = 0):
    visual = make_visual_state(seed)
    head = make_head_state(seed + 100)
    clip_file, head_file = tmp_path / "clip.pt", tmp_path / "head.pth"
    # Text-tower keys ride along, as in a full open_clip/OpenAI state_dict; they must be ignored.
    full = {f"visual.{k}": v for k, v in visual.items()}
    full.update({"logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.randn(10, 8)})
    torch.save(full, clip_file)
    torch.save(head, head_file)
    return visual, head, clip_file, head_file


def tiny_config(tmp_path, clip, head, **kw) -> DetectorConfig:
    return DetectorConfig(backbone="d3-tiny", clip_weights=str(clip), head_weights=str(head), device="cpu",
                          precision="fp32", cache_dir=str(tmp_path / "cache"), **kw)


# ---------------------------------------------------------------- the independent reference
def ref_shuffle(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Patch shuffle by reshaping into a 16x16 grid of 14x14 patches and indexing (no fold/unfold)."""
    b = x.shape[0]
    grid = x.reshape(b, 3, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, GRID * GRID, 3, PATCH, PATCH)
    grid = grid[:, perm]  # position i takes the patch from position perm[i]
    return grid.reshape(b, GRID, GRID, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, 224, 224)


def ref_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def ref_visual(img: torch.Tensor, sd: dict[str, torch.Tensor], act=quick_gelu) -> torch.Tensor:
    """CLIP ViT image tower by hand: patch embedding, class token, ln_pre, blocks, ln_post on token 0."""
    b = img.shape[0]
    w = sd["conv1.weight"]
    patches = F.unfold(img, PATCH, stride=PATCH).transpose(1, 2)  # B x 256 x (3*14*14), row-major grid
    x = patches @ w.reshape(WIDTH, -1).T  # the conv1 patch embedding as a matmul
    x = torch.cat([sd["class_embedding"].expand(b, 1, WIDTH), x], dim=1) + sd["positional_embedding"]
    x = ref_layer_norm(x, sd["ln_pre.weight"], sd["ln_pre.bias"])
    hd = WIDTH // HEADS
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        h = ref_layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(WIDTH, dim=-1)
        q, k, v = (t.reshape(b, -1, HEADS, hd).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(b, -1, WIDTH)
        x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = ref_layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = act(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return ref_layer_norm(x[:, 0], sd["ln_post.weight"], sd["ln_post.bias"])  # no proj


def ref_d3(img, visual_sd, head_sd, seed=0, softmax_dim=1, act=quick_gelu) -> torch.Tensor:
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(seed))
    feats = torch.stack([ref_visual(ref_shuffle(img, perm), visual_sd, act), ref_visual(img, visual_sd, act)], 1)
    q = feats @ head_sd["query.weight"].T + head_sd["query.bias"]
    k = feats @ head_sd["key.weight"].T + head_sd["key.bias"]
    v = feats @ head_sd["value.weight"].T + head_sd["value.bias"]
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(feats.shape[-1]), dim=softmax_dim)
    out = (a @ v).reshape(img.shape[0], -1)  # token 0 (shuffled) first
    return torch.sigmoid(out @ head_sd["fc.weight"].T + head_sd["fc.bias"])[:, 0]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- tests
def test_model_matches_independent_reference(tmp_path):
    visual_sd, head_sd, clip_file, head_file = save_tiny_checkpoints(tmp_path)
    model = build_model(tiny_config(tmp_path, clip_file, head_file))
    x = images(5)
    with torch.inference_mode():
        ours = model(x)
    ref = ref_d3(x, visual_sd, head_sd)
    assert ours.shape == (5,)
    assert (ours - ref).abs().max().item() <= 1e-5
    # The comparison can fail: probabilities spread out, and the spec's details change them.
    assert ref.std().item() > 1e-2 and ref.min().item() > 0.01 and ref.max().item() < 0.99, ref
    assert (ref_d3(x, visual_sd, head_sd, softmax_dim=-1) - ref).abs().max().item() > 1e-3
    assert (ref_d3(x, visual_sd, head_sd, act=F.gelu) - ref).abs().max().item() > 1e-4
    assert (ref_d3(x, visual_sd, head_sd, seed=1) - ref).abs().max().item() > 1e-4


def test_shuffle_seed_changes_the_model(tmp_path):
    visual_sd, head_sd, clip_file, head_file = save_tiny_checkpoints(tmp_path)
    model = build_model(tiny_config(tmp_path, clip_file, head_file, shuffle_seed=7))
    x = images(3, seed=1)
    with torch.inference_mode():
        assert (model(x) - ref_d3(x, visual_sd, head_sd, seed=7)).abs().max().item() <= 1e-5
    assert model.model_version.endswith("/seed7/fp32")


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_permutation_is_seeded_randperm(seed):
    perm = shuffle_permutation(seed)
    assert torch.equal(perm, torch.randperm(256, generator=torch.Generator().manual_seed(seed)))
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(256))
    assert not torch.equal(perm, shuffle_permutation(seed + 1))


def test_shuffle_patches_is_the_spec_formula_and_a_patch_permutation():
    perm = shuffle_permutation(0)
    x = images(2)
    out = shuffle_patches(x, perm)
    spec = F.fold(F.unfold(x, 14, stride=14)[:, :, perm], (224, 224), 14, stride=14)
    assert torch.equal(out, spec)
    assert torch.equal(out, ref_shuffle(x, perm))
    # Patch i of the output is patch perm[i] of the input (row-major grid positions).
    i = 17
    src = int(perm[i])
    assert torch.equal(out[:, :, (i // 16) * 14:(i // 16) * 14 + 14, (i % 16) * 14:(i % 16) * 14 + 14],
                       x[:, :, (src // 16) * 14:(src // 16) * 14 + 14, (src % 16) * 14:(src % 16) * 14 + 14])
    assert torch.equal(shuffle_patches(x, torch.arange(256)), x)


def test_batch_invariance(tmp_path):
    _, _, clip_file, head_file = save_tiny_checkpoints(tmp_path)
    model = build_model(tiny_config(tmp_path, clip_file, head_file))
    x = images(8, seed=3)
    with torch.inference_mode():
        alone = model(x[5:6])
        together = model(x)
        reordered = model(x.flip(0))
    assert abs(alone.item() - together[5].item()) <= 1e-6
    assert (together - reordered.flip(0)).abs().max().item() <= 1e-6


def test_head_softmax_over_dim_1():
    head = D3Head(4)
    feats = torch.randn(3, 2, 4)
    q, k, v = head.query(feats), head.key(feats), head.value(feats)
    a = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=1)
    assert torch.allclose(a.sum(dim=1), torch.ones(3, 2))
    expected = head.fc((a @ v).reshape(3, 8)).squeeze(1)
    assert torch.allclose(head(feats), expected, atol=1e-6)


def test_vit_l_14_quickgelu_is_what_runs_and_plain_vit_l_14_is_not():
    # On the meta device: shapes and module types only, no ViT-L in memory.
    visual = build_visual("ViT-L-14-quickgelu", init_seed=None)
    assert uses_quick_gelu(visual) and feature_dim(visual) == 1024 and visual.proj is None
    assert len(visual.transformer.resblocks) == 24
    assert not uses_quick_gelu(build_visual("ViT-L-14", init_seed=None))
    head = D3Head(feature_dim(visual))
    assert head.query.weight.shape == (1024, 1024) and head.fc.weight.shape == (1, 2048)


def test_tiny_backbone_is_registered_and_fast(tmp_path):
    model = build_model(DetectorConfig(backbone="d3-tiny", clip_weights="random:1", head_weights="random:2",
                                       device="cpu", cache_dir=str(tmp_path)))
    assert uses_quick_gelu(model.visual) and feature_dim(model.visual) == WIDTH
    assert model.visual.grid_size == (16, 16)
    assert model.trained is False
    assert model.model_version == "d3/d3-tiny/random:1/head-random:2/seed0/fp32"
    with torch.inference_mode():
        p = model(images(2))
    assert ((p > 0) & (p < 1)).all()


def test_random_weights_are_seeded(tmp_path):
    def build(clip, head):
        return build_model(DetectorConfig(backbone="d3-tiny", clip_weights=clip, head_weights=head, device="cpu",
                                          cache_dir=str(tmp_path)))
    x = images(2)
    with torch.inference_mode():
        a, b, c = build("random:1", "random:2")(x), build("random:1", "random:2")(x), build("random:3", "random:2")(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_backbone_fp32_head(tmp_path, precision):
    _, _, clip_file, head_file = save_tiny_checkpoints(tmp_path)
    config = tiny_config(tmp_path, clip_file, head_file)
    half = build_model(DetectorConfig(**{**config.__dict__, "precision": precision}))
    full = build_model(config)
    assert half.visual.conv1.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert half.head.fc.weight.dtype == torch.float32
    assert half.model_version.endswith(f"/{precision}")
    x = images(2)
    with torch.inference_mode():
        assert (half(x) - full(x)).abs().max().item() < 0.05


def test_device_and_precision_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16"  # a device object touches no GPU
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(DetectorError):
        resolve_device("tpu")
    with pytest.raises(DetectorError):
        resolve_precision("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(DetectorError, match="CUDA is not available"):
            resolve_device("cuda:0")
        assert resolve_device("auto") == torch.device("cpu")


def test_importing_the_package_does_not_initialise_cuda():
    import api.detector.commands  # noqa: F401
    import api.detector.engine  # noqa: F401

    assert not torch.cuda.is_initialized()


# ---------------------------------------------------------------- preprocessing (spec §1)
REFERENCE_TRANSFORM = transforms.Compose([
    transforms.Resize((224, 224)),
    transforms.ToTensor(),
    transforms.Normalize(CLIP_MEAN, CLIP_STD),
])


def _pil_images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))
    yield "rgb-down", rgb
    yield "rgb-up", rgb.resize((97, 61))
    yield "rgba", Image.fromarray(rng.integers(0, 256, (200, 120, 4), dtype=np.uint8), "RGBA")
    yield "gray", rgb.convert("L")
    yield "palette", rgb.convert("P")
    yield "cmyk", rgb.convert("CMYK")
    yield "16-bit", Image.fromarray(rng.integers(0, 65535, (64, 80), dtype=np.uint16))


@pytest.mark.parametrize(("name", "img"), list(_pil_images()))
def test_preprocess_matches_torchvision(name, img):
    ours = preprocess_image(img)
    ref = REFERENCE_TRANSFORM(img.convert("RGB"))
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32 and ours.is_contiguous()
    assert torch.equal(ours, ref), f"{name}: largest difference {(ours - ref).abs().max().item()}"


def test_preprocess_is_bilinear_squash_not_open_clip_crop():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 300, 3), dtype=np.uint8))
    bicubic = transforms.Compose([transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                                  transforms.CenterCrop(224), transforms.ToTensor(),
                                  transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    assert (preprocess_image(img) - bicubic(img)).abs().max().item() > 0.1


def test_pixels_of_gives_back_exactly_the_pixels_the_images_came_from():
    from api.detector.preprocess import normalize_pixels, pixels_of

    # Every 8-bit value in every channel, at several places.
    values = np.arange(224 * 224, dtype=np.int64).reshape(224, 224) % 256
    pixels = np.stack([np.stack([(values + shift) % 256 for shift in (0, 85, 170)])]).astype(np.uint8)
    images = normalize_pixels(pixels)
    assert np.array_equal(pixels_of(images), pixels)
    one = preprocess_image(Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)))
    assert np.array_equal(normalize_pixels(pixels_of(one.numpy()[None])), one.numpy()[None])
    # Floats that no 8-bit pixels give: None, never pixels that are only close.
    assert pixels_of(images + np.float32(1e-3)) is None
    assert pixels_of(np.full((1, 3, 224, 224), 40.0, dtype=np.float32)) is None


def test_rgba_alpha_is_dropped_not_composited():
    img = Image.new("RGBA", (30, 30), (200, 10, 10, 0))  # fully transparent red stays red
    x = preprocess_image(img)
    expected = (200 / 255 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert abs(x[0, 5, 5].item() - expected) < 1e-5


def test_perturbations():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    blurred = np.asarray(gaussian_blur(img, 1.0))
    from scipy.ndimage import gaussian_filter

    expected = np.array(img)
    for c in range(3):
        gaussian_filter(expected[:, :, c], output=expected[:, :, c], sigma=1.0)
    assert np.array_equal(blurred, expected)
    assert np.asarray(img).std() > 2 * blurred.std()
    jpeg = np.asarray(jpeg_reencode(img, 30)).astype(int)
    assert jpeg.shape == (64, 64, 3) and np.abs(jpeg - np.asarray(img)).mean() > 5
