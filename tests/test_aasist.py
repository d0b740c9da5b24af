"""AASIST: the authors' released checkpoints give their scores; an independent plain-torch reading
of the published architecture agrees on random weights of the real shapes; the loader takes the
authors' checkpoint layout and refuses anything else by name."""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from api.detector import aasist
from api.detector.aasist import (
    ARCHITECTURES,
    WINDOW_SAMPLES,
    AasistConfig,
    build_aasist,
    fix_length,
    load_detector,
    mel_band_edges,
    window_starts,
)
from api.detector.errors import WeightsError
from api.detector.weights import WeightsRef

AUTHORS = Path(__file__).parent / "data" / "aasist"  # the authors' MIT-licensed checkpoints (see LICENSE there)


def tone(n: int = WINDOW_SAMPLES, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(n) / 16000)).astype(np.float32)


def file_ref(path: Path) -> WeightsRef:
    return WeightsRef("AASIST", "AASIST_WEIGHTS", str(path), "file", path=path, looked_in=(str(path),))


def logits(model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.from_numpy(np.atleast_2d(x)))[1]


# ------------------------------------------------------------------ the authors' own numbers
@pytest.mark.parametrize("name, expected, params", [
    ("AASIST", (4.8307, -5.1955), 297_866),
    ("AASIST-L", (8.3135, -7.2650), 85_306),
])
def test_released_checkpoints_give_the_authors_scores_on_a_tone(name, expected, params):
    model = build_aasist(ARCHITECTURES[name], file_ref(AUTHORS / f"{name}.pth"))
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == 229  # the authors' 229 entries, nothing for the sinc filters
    both = logits(model, np.stack([tone(), tone(amplitude=0.6)]))
    assert both[0].tolist() == pytest.approx(expected, abs=2e-4)
    if name == "AASIST":
        assert both[1, 1].item() == pytest.approx(-8.52, abs=0.01)  # amplitude matters: no normalisation
    # The score is the bona fide logit; a tone is called spoof: fake probability sigmoid(-score) ~ 1.
    detector = aasist.AasistDetector(model=model, model_version="x", trained=True, weights=())
    score = detector.predict([tone()])[0]  # a batch of one: the same as in the batch of two
    assert score.score == pytest.approx(both[0, 1].item(), abs=1e-5)
    assert score.fake_probability == pytest.approx(1 / (1 + math.exp(expected[1])), abs=1e-4)


def test_residual_bn1_is_loaded_but_never_applied(tmp_path):
    arch = ARCHITECTURES["aasist-tiny"]
    path = tmp_path / "tiny.pth"
    torch.save(randomized(aasist.AASIST(arch), seed=2), path)
    model = build_aasist(arch, file_ref(path))
    before = logits(model, tone())
    with torch.no_grad():
        for block in model.encoder[1:]:
            block[0].bn1.weight.mul_(-3.0).add_(1.0)
            block[0].bn1.running_mean.add_(5.0)
    assert torch.equal(logits(model, tone()), before)


# ------------------------------------------------------------------ an independent reading of the paper/spec
def reference_filters(n_filters: int, taps: int = 129, sr: int = 16000) -> torch.Tensor:
    """Spec §2: mel-spaced band edges, Hamming-windowed ideal band-pass, on the float32 tap grid."""
    f = 8000.0 * np.linspace(0.0, 1.0, 257)
    mel = 2595.0 * np.log10(1.0 + f / 700.0)
    edges = 700.0 * (10.0 ** (np.linspace(mel[0], mel[-1], n_filters + 1) / 2595.0) - 1.0)
    n = torch.arange(-(taps // 2), taps // 2 + 1, dtype=torch.float32)
    window = torch.from_numpy(np.hamming(taps).astype(np.float32))
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        band = torch.from_numpy((2 * high / sr) * np.sinc(np.asarray(2 * high * n / sr)).astype(np.float32)) \
            - torch.from_numpy((2 * low / sr) * np.sinc(np.asarray(2 * low * n / sr)).astype(np.float32))
        rows.append(window * band.float())
    return torch.stack(rows)


def _bn(x: torch.Tensor, s: dict, p: str) -> torch.Tensor:
    return F.batch_norm(x, s[p + ".running_mean"], s[p + ".running_var"], s[p + ".weight"], s[p + ".bias"],
                        False, 0.0, 1e-5)


def _lin(x: torch.Tensor, s: dict, p: str) -> torch.Tensor:
    return x @ s[p + ".weight"].T + s[p + ".bias"]


def _gat(x, s, p, tau):
    """GAT: s_ij = w . tanh(W_a(x_i * x_j) + b_a); A = softmax_j(s_ij / tau); Y = P1(A X) + P2(X); BN; SELU."""
    pair = torch.einsum("bid,bjd->bijd", x, x)
    att = torch.softmax((torch.tanh(_lin(pair, s, p + ".att_proj")) @ s[p + ".att_weight"])[..., 0] / tau, dim=2)
    y = _lin(torch.einsum("bij,bjd->bid", att, x), s, p + ".proj_with_att") + _lin(x, s, p + ".proj_without_att")
    b, n, d = y.shape
    return F.selu(_bn(y.reshape(b * n, d), s, p + ".bn").reshape(b, n, d))


def _hsgat(x1, x2, m, s, p, tau):
    n1 = x1.shape[1]
    x = torch.cat([_lin(x1, s, p + ".proj_type1"), _lin(x2, s, p + ".proj_type2")], dim=1)
    pre = torch.tanh(_lin(torch.einsum("bid,bjd->bijd", x, x), s, p + ".att_proj"))
    n = x.shape[1]
    same1 = torch.zeros(n, n, dtype=torch.bool)
    same1[:n1, :n1] = True
    same2 = torch.zeros(n, n, dtype=torch.bool)
    same2[n1:, n1:] = True
    w11, w22, w12 = ((pre @ s[p + f".att_weight{k}"])[..., 0] for k in ("11", "22", "12"))
    scores = torch.where(same1, w11, torch.where(same2, w22, w12))  # one w12 for both cross blocks
    att = torch.softmax(scores / tau, dim=2)
    a = torch.softmax((torch.tanh(_lin(x * m, s, p + ".att_projM")) @ s[p + ".att_weightM"])[..., 0] / tau, dim=1)
    m_new = _lin(torch.einsum("bj,bjd->bd", a, x)[:, None], s, p + ".proj_with_attM") \
        + _lin(m, s, p + ".proj_without_attM")
    y = _lin(torch.einsum("bij,bjd->bid", att, x), s, p + ".proj_with_att") + _lin(x, s, p + ".proj_without_att")
    b, _, d = y.shape
    y = F.selu(_bn(y.reshape(b * n, d), s, p + ".bn").reshape(b, n, d))
    return y[:, :n1], y[:, n1:], m_new


def _pool(h, s, p, k):
    g = torch.sigmoid(_lin(h, s, p + ".proj"))[..., 0]
    keep = max(int(h.shape[1] * k), 1)
    order = torch.argsort(g, dim=1, descending=True, stable=True)[:, :keep]
    return torch.stack([(h[b] * g[b, :, None])[order[b]] for b in range(h.shape[0])])


def _block(x, s, p, has_downsample):
    out = F.conv2d(x, s[p + ".conv1.weight"], s[p + ".conv1.bias"], padding=(1, 1))
    out = F.selu(_bn(out, s, p + ".bn2"))
    out = F.conv2d(out, s[p + ".conv2.weight"], s[p + ".conv2.bias"], padding=(0, 1))
    skip = F.conv2d(x, s[p + ".conv_downsample.weight"], s[p + ".conv_downsample.bias"], padding=(0, 1)) \
        if has_downsample else x
    return F.max_pool2d(out + skip, (1, 3))


def reference_logits(s: dict, x: torch.Tensor, arch) -> torch.Tensor:
    """Spec §2-§5 in plain torch from the state dict: (B, 64600) -> (B, 2)."""
    h = F.conv1d(x[:, None], reference_filters(arch.filts[0])[:, None])
    h = F.selu(_bn(F.max_pool2d(h.abs()[:, None], 3), s, "first_bn"))
    for i in range(6):
        h = _block(h, s, f"encoder.{i}.0", f"encoder.{i}.0.conv_downsample.weight" in s)
    spectral = h.abs().amax(dim=3).transpose(1, 2) + s["pos_S"]
    temporal = h.abs().amax(dim=2).transpose(1, 2)
    (p0, p1, p2), (t0, t1, t2) = arch.pool_ratios[:3], arch.temperatures[:3]
    spectral = _pool(_gat(spectral, s, "GAT_layer_S", t0), s, "pool_S", p0)
    temporal = _pool(_gat(temporal, s, "GAT_layer_T", t1), s, "pool_T", p1)
    branches = []
    for b in (1, 2):
        tb, sb, mb = _hsgat(temporal, spectral, s[f"master{b}"], s, f"HtrgGAT_layer_ST{b}1", t2)
        sb, tb = _pool(sb, s, f"pool_hS{b}", p2), _pool(tb, s, f"pool_hT{b}", p2)
        dt, ds, dm = _hsgat(tb, sb, mb, s, f"HtrgGAT_layer_ST{b}2", t2)
        branches.append((tb + dt, sb + ds, mb + dm))
    t = torch.maximum(branches[0][0], branches[1][0])
    sp = torch.maximum(branches[0][1], branches[1][1])
    m = torch.maximum(branches[0][2], branches[1][2])
    hidden = torch.cat([t.abs().amax(1), t.mean(1), sp.abs().amax(1), sp.mean(1), m[:, 0]], dim=1)
    return _lin(hidden, s, "out_layer")


def randomized(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint layout drawn from a seeded generator (BN statistics too)."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value.clone()
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=g)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = 0.1 * torch.randn(value.shape, generator=g)
        elif key.endswith("bn.weight") or ".bn" in key or key.startswith("first_bn"):
            state[key] = 1.0 + 0.1 * torch.randn(value.shape, generator=g)
        else:
            fan_in = value[0].numel() if value.dim() > 1 else value.numel()
            state[key] = torch.randn(value.shape, generator=g) / math.sqrt(max(fan_in, 1))
    return state


@pytest.mark.parametrize("name", ["AASIST", "aasist-tiny"])
def test_the_model_equals_an_independent_reading_of_the_architecture(name, tmp_path):
    arch = ARCHITECTURES[name]
    state = randomized(aasist.AASIST(arch), seed=7)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)  # the authors' layout: a plain state_dict
    model = build_aasist(arch, file_ref(path))
    rng = np.random.default_rng(0)
    x = np.stack([tone(), (0.1 * rng.standard_normal(WINDOW_SAMPLES)).astype(np.float32)])
    ours = logits(model, x)
    with torch.inference_mode():
        theirs = reference_logits(state, torch.from_numpy(x), arch)
    assert ours.shape == (2, 2)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)  # the two inputs are told apart


def test_sinc_filterbank_is_the_published_one():
    edges = mel_band_edges(70)
    assert len(edges) == 71
    assert edges[:4] == pytest.approx([0.0, 25.66, 52.26, 79.83], abs=0.01)
    assert edges[-2:] == pytest.approx([7692.37, 8000.0], abs=0.01)
    model = aasist.AASIST(ARCHITECTURES["AASIST"])
    bank = model.conv_time.band_pass[:, 0]
    assert bank.shape == (70, 129)  # first_conv 128 bumped to 129 taps
    assert torch.allclose(bank, reference_filters(70), atol=2e-7, rtol=0)
    assert not any("band_pass" in key for key in model.state_dict())


# ------------------------------------------------------------------ input shaping
def test_fix_length_keeps_the_first_window_and_tiles_short_clips():
    long = np.arange(70_000, dtype=np.float32)
    assert np.array_equal(fix_length(long), long[:WINDOW_SAMPLES])
    short = np.arange(1, 30_001, dtype=np.float32)
    tiled = fix_length(short)
    assert tiled.shape == (WINDOW_SAMPLES,)
    assert np.array_equal(tiled[:30_000], short) and np.array_equal(tiled[30_000:60_000], short)
    assert np.array_equal(tiled[60_000:], short[:4_600])
    with pytest.raises(ValueError):
        fix_length(np.zeros(0, np.float32))


def test_windows_cover_the_recording_with_real_audio():
    assert window_starts(10_000, hop=32_000) == [0]
    assert window_starts(WINDOW_SAMPLES, hop=32_000) == [0]
    starts = window_starts(200_000, hop=64_600)
    assert starts == [0, 64_600, 129_200, 200_000 - WINDOW_SAMPLES]
    assert window_starts(64_600 * 3, hop=64_600) == [0, 64_600, 129_200]
    assert window_starts(100_000, hop=16_000) == [0, 16_000, 32_000, 100_000 - WINDOW_SAMPLES]


# ------------------------------------------------------------------ loading and refusing
def test_random_weights_are_seeded_and_untrained():
    one = load_detector(AasistConfig(model="aasist-tiny", weights="random:3", device="cpu"))
    two = load_detector(AasistConfig(model="aasist-tiny", weights="random:3", device="cpu"))
    other = load_detector(AasistConfig(model="aasist-tiny", weights="random:4", device="cpu"))
    x = [tone(), tone(20_000, freq=1000.0)]
    a, b, c = (d.predict(x) for d in (one, two, other))
    assert [s.score for s in a] == [s.score for s in b]
    assert [s.score for s in a] != [s.score for s in c]
    assert one.trained is False and one.model_version == "aasist/aasist-tiny/random:3/fp32"
    assert all(0.0 <= s.fake_probability <= 1.0 for s in a)


def test_dataparallel_prefix_is_accepted(tmp_path):
    arch = ARCHITECTURES["aasist-tiny"]
    state = randomized(aasist.AASIST(arch), seed=1)
    path = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model = build_aasist(arch, file_ref(path))
    assert torch.equal(model.state_dict()["out_layer.weight"], state["out_layer.weight"])


def test_wrong_checkpoints_are_refused_by_name(tmp_path):
    arch = ARCHITECTURES["aasist-tiny"]
    state = randomized(aasist.AASIST(arch), seed=1)
    broken = dict(state)
    del broken["pos_S"]
    broken["extra.weight"] = torch.zeros(1)
    broken["out_layer.weight"] = torch.zeros(2, 7)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(WeightsError) as caught:
        build_aasist(arch, file_ref(path))
    text = str(caught.value)
    assert "missing keys: pos_S" in text and "unexpected keys: extra.weight" in text
    assert "out_layer.weight (2, 7) (expected (2, 40))" in text
    # The real AASIST checkpoint does not fit the tiny architecture (and says so).
    with pytest.raises(WeightsError, match="do not fit the model"):
        build_aasist(arch, file_ref(AUTHORS / "AASIST.pth"))


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"pos_S": _Exploit()}, f)
    with pytest.raises(WeightsError, match="refused|corrupt"):
        build_aasist(ARCHITECTURES["aasist-tiny"], file_ref(path))


def test_missing_and_offline_weights_say_where_and_how(tmp_path, monkeypatch):
    config = AasistConfig(model="AASIST", weights="", cache_dir=str(tmp_path), device="cpu")
    with pytest.raises(WeightsError) as caught:
        load_detector(config)
    expected = tmp_path / "aasist" / "AASIST.pth"
    assert str(expected) in str(caught.value) and "AASIST_WEIGHTS" in str(caught.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = aasist.AUTHORS_WEIGHTS_URL["AASIST-L"]
    with pytest.raises(WeightsError, match="offline"):
        load_detector(AasistConfig(model="AASIST-L", weights=url, cache_dir=str(tmp_path), device="cpu"))
    # Once the file is where a URL setting caches it, no network is needed.
    target = tmp_path / "aasist" / "AASIST-L.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((AUTHORS / "AASIST-L.pth").read_bytes())
    detector = load_detector(AasistConfig(model="AASIST-L", weights=url, cache_dir=str(tmp_path), device="cpu"))
    assert detector.trained and detector.model_version.startswith("aasist/AASIST-L/sha256:814331d0")
