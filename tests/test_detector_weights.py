"""Checkpoint formats, refusals, HF-cache resolution and model versions (tiny config, CPU)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle

import open_clip
import pytest
import torch
from torch import nn

from api.detector import weights
from api.detector.config import DetectorConfig
from api.detector.errors import DetectorError, WeightsError
from api.detector.factory import build_model
from tests.test_detector_model import images, make_head_state, make_visual_state, save_tiny_checkpoints, tiny_config

HF_REPO_DIR = "models--timm--vit_large_patch14_clip_224.openai"
# torch.jit.trace/script (used to make OpenAI-style archives) are deprecated; the archives people have are not.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning",
                                        "ignore:Detected pickle protocol:UserWarning")


def scores(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(images(3, seed=5))


@pytest.fixture
def tiny(tmp_path):
    """Checkpoints the test made, and the scores of the model built from their plain form."""
    visual, head, clip_file, head_file = save_tiny_checkpoints(tmp_path)
    reference = scores(build_model(tiny_config(tmp_path, clip_file, head_file)))
    return visual, head, clip_file, head_file, reference


# ---------------------------------------------------------------- accepted head formats
@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "prefixed", "prefixed+state_dict"])
def test_head_formats(tmp_path, tiny, layout):
    _, head, clip_file, _, reference = tiny
    prefixed = {f"attention_head.{k}": v for k, v in head.items()}
    obj = {"plain": head, "state_dict": {"state_dict": head, "epoch": torch.tensor(3)}, "model": {"model": head},
           "prefixed": prefixed, "prefixed+state_dict": {"state_dict": prefixed}}[layout]
    path = tmp_path / f"head-{layout}.pth"
    torch.save(obj, path)
    model = build_model(tiny_config(tmp_path, clip_file, path))
    assert torch.equal(scores(model), reference)
    assert model.trained is True


# ---------------------------------------------------------------- accepted backbone formats
class Clipish(nn.Module):
    """What OpenAI's ViT-L-14.pt is: a scripted CLIP exposing `visual` (plus text parts)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        self.token_embedding = nn.Embedding(10, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x) * self.logit_scale


def _open_clip_tiny_with(visual_state):
    clip = open_clip.create_model("d3-tiny")
    clip.visual.load_state_dict(visual_state)
    return clip


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_archive(tmp_path, tiny, how):
    visual_state, _, _, head_file, reference = tiny
    clip = _open_clip_tiny_with(visual_state)
    module = Clipish(clip.visual).eval()
    if how == "trace":
        scripted = torch.jit.trace(module, torch.randn(1, 3, 224, 224), check_trace=False)
    else:
        scripted = torch.jit.script(module)
    path = tmp_path / "ViT-L-14.pt"
    scripted.save(str(path))
    assert weights.is_torchscript_archive(path)
    model = build_model(tiny_config(tmp_path, path, head_file))
    assert torch.equal(scores(model), reference)


def test_open_clip_full_state_dict_with_text_keys(tmp_path, tiny):
    visual_state, _, _, head_file, reference = tiny
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(_open_clip_tiny_with(visual_state).state_dict(), path)  # every text-tower key included
    assert any(not k.startswith("visual.") for k in torch.load(path, weights_only=True))
    assert torch.equal(scores(build_model(tiny_config(tmp_path, path, head_file))), reference)


@pytest.mark.parametrize("layout", ["bare-visual", "state_dict-wrapped", "module-prefixed", "safetensors"])
def test_other_backbone_layouts(tmp_path, tiny, layout):
    visual_state, _, _, head_file, reference = tiny
    full = {f"visual.{k}": v for k, v in visual_state.items()}
    path = tmp_path / ("clip.safetensors" if layout == "safetensors" else "clip.pt")
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full.items()}, str(path))
    else:
        obj = {"bare-visual": visual_state, "state_dict-wrapped": {"state_dict": full},
               "module-prefixed": {f"module.{k}": v for k, v in full.items()}}[layout]
        torch.save(obj, path)
    assert torch.equal(scores(build_model(tiny_config(tmp_path, path, head_file))), reference)


# ---------------------------------------------------------------- refusals
def test_missing_file_says_where_and_how_to_fetch(tmp_path, tiny):
    _, _, clip_file, _, _ = tiny
    missing = tmp_path / "nowhere" / "classifier.pth"
    with pytest.raises(WeightsError) as err:
        build_model(tiny_config(tmp_path, clip_file, missing))
    message = str(err.value)
    assert str(missing) in message and "d3 fetch-weights" in message and "D3_HEAD_WEIGHTS" in message


def test_default_head_is_looked_for_in_the_cache(tmp_path, tiny):
    _, _, clip_file, _, _ = tiny
    config = tiny_config(tmp_path, clip_file, "")
    with pytest.raises(WeightsError, match="d3 fetch-weights") as err:
        build_model(config)
    assert str(config.resolved_cache_dir / "classifier.pth") in str(err.value)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", os.urandom(2048), "truncated"],
                         ids=["empty", "text", "random-bytes", "truncated"])
def test_corrupt_files_are_refused(tmp_path, tiny, content):
    _, head, clip_file, _, _ = tiny
    path = tmp_path / "bad.pth"
    if content == "truncated":
        buffer = io.BytesIO()
        torch.save(head, buffer)
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(WeightsError) as err:
        build_model(tiny_config(tmp_path, clip_file, path))
    assert str(path) in str(err.value) and ("corrupt" in str(err.value) or "refused" in str(err.value))


def test_corrupt_torchscript_backbone(tmp_path, tiny):
    visual_state, _, _, head_file, _ = tiny
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.trace(Clipish(_open_clip_tiny_with(visual_state).visual).eval(), torch.randn(1, 3, 224, 224),
                    check_trace=False).save(
        str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4000])
    with pytest.raises(WeightsError, match="corrupt") as err:
        build_model(tiny_config(tmp_path, path, head_file))
    assert str(path) in str(err.value)


class RunsCode:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tiny, writer):
    _, head, clip_file, _, _ = tiny
    marker = tmp_path / "pwned"
    payload = {**head, "fc.bias": RunsCode(str(marker))}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(WeightsError) as err:
        build_model(tiny_config(tmp_path, clip_file, path))
    assert not marker.exists()
    message = str(err.value)
    assert str(path) in message and "refused" in message and "system" in message


def test_wrong_keys_are_named(tmp_path, tiny):
    _, head, clip_file, _, _ = tiny
    bad = dict(head)
    bad.pop("key.bias")
    bad["attn.extra"] = torch.zeros(3)
    path = tmp_path / "head.pth"
    torch.save(bad, path)
    with pytest.raises(WeightsError) as err:
        build_model(tiny_config(tmp_path, clip_file, path))
    message = str(err.value)
    assert str(path) in message and "missing keys: key.bias" in message and "unexpected keys: attn.extra" in message


def test_wrong_shapes_are_named(tmp_path, tiny):
    _, _, clip_file, _, _ = tiny
    path = tmp_path / "head-1024.pth"
    torch.save(make_head_state(0, dim=1024), path)  # the real head on the tiny backbone
    with pytest.raises(WeightsError) as err:
        build_model(tiny_config(tmp_path, clip_file, path))
    assert "wrong shapes" in str(err.value) and "fc.weight (1, 2048) (expected (1, 128))" in str(err.value)


def test_backbone_with_missing_visual_keys(tmp_path, tiny):
    visual_state, _, _, head_file, _ = tiny
    partial = {f"visual.{k}": v for k, v in visual_state.items() if "resblocks.1." not in k}
    path = tmp_path / "clip.pt"
    torch.save(partial, path)
    with pytest.raises(WeightsError, match=r"missing keys: transformer\.resblocks\.1\."):
        build_model(tiny_config(tmp_path, path, head_file))


def test_non_tensor_entries_and_non_dicts_are_refused(tmp_path, tiny):
    _, head, clip_file, _, _ = tiny
    for name, obj in {"list.pth": [torch.zeros(1)], "mixed.pth": {**head, "note": "hello"}}.items():
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(WeightsError) as err:
            build_model(tiny_config(tmp_path, clip_file, path))
        assert str(path) in str(err.value)


def test_error_hierarchy():
    assert issubclass(WeightsError, DetectorError)


# ---------------------------------------------------------------- the `openai` tag from the HF cache
def _lay_out_hf_cache(cache_root, repo_dir, filename, payload: bytes, revision="0123456789abcdef"):
    repo = cache_root / repo_dir
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(payload)
    return snapshot / filename


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    hub = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.cache/clip of the real user
    return hub


def test_openai_tag_resolves_from_the_user_hf_cache(tmp_path, offline_hf):
    expected = _lay_out_hf_cache(offline_hf, HF_REPO_DIR, "open_clip_model.safetensors", b"x")
    config = DetectorConfig(cache_dir=str(tmp_path / "d3"))
    ref = weights.resolve_backbone(config)
    assert ref.kind == "tag" and ref.path == expected and ref.present and ref.identity() == "openai"


def test_d3_cache_wins_and_bin_is_a_fallback(tmp_path, offline_hf):
    _lay_out_hf_cache(offline_hf, HF_REPO_DIR, "open_clip_model.safetensors", b"x")
    ours = _lay_out_hf_cache(tmp_path / "d3" / "huggingface", HF_REPO_DIR, "open_clip_pytorch_model.bin", b"y")
    assert weights.resolve_backbone(DetectorConfig(cache_dir=str(tmp_path / "d3"))).path == ours


def test_openai_tag_missing_says_where_it_looked(tmp_path, offline_hf):
    config = DetectorConfig(cache_dir=str(tmp_path / "d3"), head_weights="random:0")
    with pytest.raises(WeightsError) as err:
        build_model(config)  # the ViT-L tower is only built on the meta device before this fails
    message = str(err.value)
    assert "d3 fetch-weights" in message and HF_REPO_DIR in message
    assert str(tmp_path / "d3" / "huggingface") in message and str(offline_hf) in message


def test_openai_tag_loads_end_to_end_on_tiny(tmp_path, offline_hf, monkeypatch, tiny):
    visual_state, _, _, head_file, reference = tiny
    # Give d3-tiny an `openai`-style tag pointing at a fake hub repo, laid out in the HF cache.
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "d3-tiny",
                        {"openai": {"hf_hub": "test-org/d3-tiny.openai/", "quick_gelu": True}})
    from safetensors.torch import save as save_safetensors

    blob = save_safetensors({f"visual.{k}": v.contiguous() for k, v in visual_state.items()})
    _lay_out_hf_cache(offline_hf, "models--test-org--d3-tiny.openai", "open_clip_model.safetensors", blob)
    model = build_model(tiny_config(tmp_path, "openai", head_file))
    assert torch.equal(scores(model), reference)
    assert model.model_version.startswith("d3/d3-tiny/openai/head-sha256:")


def test_openai_weights_refused_on_exact_gelu_backbone(tmp_path, offline_hf):
    _lay_out_hf_cache(offline_hf, HF_REPO_DIR, "open_clip_model.safetensors", b"never read")
    config = DetectorConfig(backbone="ViT-L-14", clip_weights="openai", head_weights="random:0",
                            cache_dir=str(tmp_path / "d3"))
    with pytest.raises(WeightsError, match="QuickGELU") as err:
        build_model(config)
    assert "ViT-L-14-quickgelu" in str(err.value)


def test_unknown_tag_and_backbone(tmp_path):
    with pytest.raises(WeightsError, match="not an open_clip pretrained tag"):
        weights.resolve_backbone(DetectorConfig(clip_weights="no-such-tag", cache_dir=str(tmp_path)))
    with pytest.raises(DetectorError, match="unknown backbone"):
        build_model(DetectorConfig(backbone="ViT-Nope", clip_weights="random:0", head_weights="random:0"))


# ---------------------------------------------------------------- head from an https URL, downloaded once
class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_head_url_is_downloaded_once_into_the_cache(tmp_path, tiny, monkeypatch):
    _, head, clip_file, head_file, reference = tiny
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return _FakeResponse(head_file.read_bytes())

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights.urllib.request, "urlopen", fake_urlopen)
    url = "https://example.org/ckpt/classifier.pth"
    config = tiny_config(tmp_path, clip_file, url)
    first, second = build_model(config), build_model(config)
    assert calls == [url]
    cached = weights.head_download_path(config, url)
    assert cached.is_file() and str(config.resolved_cache_dir) in str(cached)
    assert torch.equal(scores(first), reference) and torch.equal(scores(second), reference)
    digest = hashlib.sha256(head_file.read_bytes()).hexdigest()[:12]
    assert f"head-sha256:{digest}" in first.model_version


def test_head_url_offline_and_http_refused(tmp_path, tiny, monkeypatch):
    _, _, clip_file, _, _ = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="offline"):
        build_model(tiny_config(tmp_path, clip_file, "https://example.org/classifier.pth"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WeightsError, match="plain http"):
        build_model(tiny_config(tmp_path, clip_file, "http://example.org/classifier.pth"))


# ---------------------------------------------------------------- versions and `trained`
def test_model_version_names_files_by_sha256(tmp_path, tiny):
    _, _, clip_file, head_file, _ = tiny
    model = build_model(tiny_config(tmp_path, clip_file, head_file))
    clip_sha = hashlib.sha256(clip_file.read_bytes()).hexdigest()[:12]
    head_sha = hashlib.sha256(head_file.read_bytes()).hexdigest()[:12]
    assert model.model_version == f"d3/d3-tiny/sha256:{clip_sha}/head-sha256:{head_sha}/seed0/fp32"
    assert model.trained is True


@pytest.mark.parametrize(("clip", "head"), [("random:3", "file"), ("file", "random:4"), ("random:3", "random:4")])
def test_random_parts_report_untrained(tmp_path, tiny, clip, head):
    _, _, clip_file, head_file, _ = tiny
    model = build_model(tiny_config(tmp_path, clip_file if clip == "file" else clip,
                                    head_file if head == "file" else head))
    assert model.trained is False
    for spec in (clip, head):
        if spec != "file":
            assert spec in model.model_version


def test_verify_weights_reports_each_part(tmp_path, tiny):
    _, _, clip_file, _, _ = tiny
    report = weights.verify_weights(tiny_config(tmp_path, clip_file, tmp_path / "absent.pth"))
    assert report["backbone"]["loadable"] is True and report["backbone"]["present"] is True
    assert report["head"]["loadable"] is False and report["head"]["present"] is False
    assert "d3 fetch-weights" in report["head"]["error"]


def test_visual_state_ignores_text_keys_and_proj():
    state = {f"visual.{k}": v for k, v in make_visual_state(0).items()}
    state["text_projection"] = torch.zeros(2, 2)
    out = weights.visual_state(state, weights.Path("x"))
    assert "proj" not in out and "text_projection" not in out and "conv1.weight" in out
