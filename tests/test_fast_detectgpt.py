"""Fast-DetectGPT: the analytic criterion equals an independent float64 reading of the paper on
logits of the real vocabulary sizes and on real (tiny, random) causal LMs, chunked texts pool to
the same formula, the authors' probability constants, limits, and the loader on the Hugging Face
cache layout the authors' models come in."""

from __future__ import annotations

import math

import pytest
import torch

from api.detector.errors import DetectorError, WeightsError
from api.detector.fast_detectgpt import (
    CALIBRATIONS,
    TextDetectorConfig,
    chunk_spans,
    criterion,
    criterion_sums,
    load_detector,
    machine_probability,
)
from api.detector.interface import InputTooLong, InputTooShort
from api.detector.tiny_lm import byte_tokenizer

HUMAN = "The committee met on Tuesday to review the budget and, after a long talk about roads, postponed the vote."
OTHER = "Short, but still long enough for the byte-level tokenizer: forty-odd bytes here."


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # transformers must never reach the hub in these tests


def reference_criterion(sampling_logits: torch.Tensor, scoring_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The paper's analytic criterion in float64, one text (T, V) at a time: cut the vocabularies to
    the shared size, log p from the scoring model, q from the sampling model, then
    (sum_t log p(x_t) - sum_t E_q[log p]) / sqrt(sum_t Var_q[log p])."""
    v = min(sampling_logits.shape[-1], scoring_logits.shape[-1])
    log_p = torch.log_softmax(scoring_logits[:, :v].double(), dim=-1)
    q = torch.softmax(sampling_logits[:, :v].double(), dim=-1)
    observed = log_p[torch.arange(labels.shape[0]), labels].sum()
    expected = (q * log_p).sum(-1)
    variance = (q * (log_p - expected[:, None]) ** 2).sum(-1)  # E[(l - mu)^2]: the same quantity, other form
    return float((observed - expected.sum()) / variance.sum().sqrt())


# ------------------------------------------------------------------ the criterion itself
def test_criterion_on_logits_of_the_real_vocabulary_sizes():
    g = torch.Generator().manual_seed(0)
    steps = 48
    sampling = 3 * torch.randn(1, steps, 50_400, generator=g)  # GPT-J's head is 50,400 wide
    scoring = 3 * torch.randn(1, steps, 50_257, generator=g)  # GPT-Neo's 50,257
    labels = torch.randint(0, 50_257, (1, steps), generator=g)
    ours = criterion(*(float(s[0]) for s in criterion_sums(sampling, scoring, labels)))
    assert ours == pytest.approx(reference_criterion(sampling[0], scoring[0], labels[0]), abs=1e-5)
    # Softmax over GPT-J's full 50,400 before the cut is a different number (trap 4).
    q_full = torch.softmax(sampling[0].double(), -1)[:, :50_257]
    log_p = torch.log_softmax(scoring[0].double(), -1)
    mu = (q_full * log_p).sum(-1)
    var = (q_full * log_p ** 2).sum(-1) - mu ** 2
    wrong = float((log_p[torch.arange(steps), labels[0]].sum() - mu.sum()) / var.sum().sqrt())
    assert abs(wrong - ours) > 1e-3
    # Swapping the roles changes the criterion (trap 2).
    swapped = criterion(*(float(s[0]) for s in criterion_sums(scoring, sampling[..., :50_257], labels)))
    assert abs(swapped - ours) > 1e-3


def test_masked_positions_count_for_nothing():
    g = torch.Generator().manual_seed(1)
    sampling, scoring = torch.randn(2, 10, 30, generator=g), torch.randn(2, 10, 30, generator=g)
    labels = torch.randint(0, 30, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    ll, mu, var = criterion_sums(sampling, scoring, labels, mask)
    short = criterion(float(ll[1]), float(mu[1]), float(var[1]))
    assert short == pytest.approx(reference_criterion(sampling[1, :6], scoring[1, :6], labels[1, :6]), abs=1e-5)


def test_the_authors_probability_mapping():
    pair = CALIBRATIONS["gpt-j-6B_gpt-neo-2.7B"]
    assert machine_probability(0.0, pair) == pytest.approx(0.20, abs=0.01)
    assert machine_probability(2.0, pair) == pytest.approx(0.73, abs=0.01)
    assert machine_probability(-3.0, pair) == pytest.approx(0.82, abs=0.01)  # not monotone: the wide Gaussian
    assert machine_probability(1.9299, pair) == pytest.approx(0.70, abs=0.01)  # HEAD's value, not the README's 82 %


def test_chunks_overlap_by_one_token_so_each_token_is_scored_once():
    assert chunk_spans(10, 16) == [(0, 10)]
    spans = chunk_spans(100, 16)
    scored = [t for start, end in spans for t in range(start + 1, end)]
    assert scored == list(range(1, 100))
    assert all(end - start <= 16 for start, end in spans)


# ------------------------------------------------------------------ the detector on real (tiny) LMs
def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, :-1]


def test_detector_equals_the_reading_on_a_random_model_pair():
    detector = load_detector(TextDetectorConfig(scoring_model="random:0", sampling_model="random:1", device="cpu",
                                                min_tokens=16))
    assert detector.trained is False
    assert detector.model_version == "fast-detectgpt/random:1_random:0/analytic/fp32"
    scores = detector.predict([HUMAN, OTHER])  # one right-padded batch
    for text, score in zip([HUMAN, OTHER], scores, strict=True):
        ids = byte_tokenizer()(text)["input_ids"]
        assert ids == list(text.encode())  # one token per byte, no BOS
        expected = reference_criterion(_logits(detector.sampling, ids), _logits(detector.scoring, ids),
                                       torch.tensor(ids[1:]))
        assert score.score == pytest.approx(expected, abs=1e-5)
        assert score.detail["tokens"] == len(ids) and score.detail["scored_tokens"] == len(ids) - 1
        calibration = CALIBRATIONS["gpt-j-6B_gpt-neo-2.7B"]  # a random pair borrows the default pair's constants
        assert score.fake_probability == pytest.approx(machine_probability(expected, calibration))
    alone = detector.predict([OTHER])[0]
    assert alone.score == pytest.approx(scores[1].score, abs=1e-5)  # padding beside a longer text changes nothing


def test_same_seed_is_one_model_in_both_roles():
    detector = load_detector(TextDetectorConfig(scoring_model="random:5", sampling_model="random:5", device="cpu",
                                                min_tokens=16))
    assert detector.sampling is None
    ids = list(HUMAN.encode())
    logits = _logits(detector.scoring, ids)
    assert detector.predict([HUMAN])[0].score == pytest.approx(
        reference_criterion(logits, logits, torch.tensor(ids[1:])), abs=1e-5)


def test_long_texts_are_chunked_and_pooled():
    detector = load_detector(TextDetectorConfig(scoring_model="random:0", sampling_model="random:1", device="cpu",
                                                min_tokens=16, chunk_tokens=40))
    text = HUMAN * 3  # ~330 bytes: nine chunks of 40 tokens
    ids = list(text.encode())
    score = detector.predict([text])[0]
    chunks = score.detail["chunks"]
    assert len(chunks) == len(chunk_spans(len(ids), 40)) > 1
    sums = [0.0, 0.0, 0.0]
    for chunk in chunks:
        piece = ids[chunk["start_token"]:chunk["end_token"]]
        log_p = torch.log_softmax(_logits(detector.scoring, piece)[:, :257].double(), -1)
        q = torch.softmax(_logits(detector.sampling, piece)[:, :257].double(), -1)
        mu = (q * log_p).sum(-1)
        sums[0] += float(log_p[torch.arange(len(piece) - 1), torch.tensor(piece[1:])].sum())
        sums[1] += float(mu.sum())
        sums[2] += float(((q * (log_p - mu[:, None]) ** 2).sum(-1)).sum())
        assert chunk["criterion"] == pytest.approx(reference_criterion(
            _logits(detector.sampling, piece), _logits(detector.scoring, piece), torch.tensor(piece[1:])), abs=1e-5)
    assert score.score == pytest.approx((sums[0] - sums[1]) / math.sqrt(sums[2]), abs=1e-5)
    assert sum(c["scored_tokens"] for c in chunks) == len(ids) - 1


def test_length_limits_name_the_minimum_and_the_maximum():
    detector = load_detector(TextDetectorConfig(scoring_model="random:0", sampling_model="random:1", device="cpu",
                                                min_tokens=32, max_tokens=200, max_chars=300))
    with pytest.raises(InputTooShort) as short:
        detector.predict(["too short"])
    assert "needs at least 32 tokens" in short.value.message and short.value.got == 9
    with pytest.raises(InputTooLong) as chars:
        detector.predict(["x" * 301])
    assert chars.value.unit == "characters" and chars.value.limit == 300
    with pytest.raises(InputTooLong) as tokens:
        detector.predict(["é" * 150])  # 150 characters, 300 byte tokens
    assert tokens.value.unit == "tokens" and "limit of 200" in tokens.value.message


# ------------------------------------------------------------------ the authors' models, as the hub lays them out
def _hub_snapshot(cache, repo_id: str, revision: str, model, tokenizer) -> None:
    base = cache / "huggingface" / f"models--{repo_id.replace('/', '--')}"
    commit = ("a" if "neo" in repo_id else "b") * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / revision).write_text(commit)
    snapshot = base / "snapshots" / commit
    model.save_pretrained(snapshot)  # config.json + model.safetensors
    tokenizer.save_pretrained(snapshot)


def _authors_pair(cache, sampling_vocab: int = 264):
    from transformers import GPTJConfig, GPTJForCausalLM, GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(11)
    neo = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=257, max_position_embeddings=128, hidden_size=32, num_layers=2,
                                         num_heads=2, attention_types=[[["global", "local"], 1]], window_size=16,
                                         intermediate_size=64, bos_token_id=256, eos_token_id=256)).eval()
    gptj = GPTJForCausalLM(GPTJConfig(vocab_size=sampling_vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                      rotary_dim=8, bos_token_id=256, eos_token_id=256)).eval()
    tokenizer = byte_tokenizer(model_max_length=128)
    _hub_snapshot(cache, "EleutherAI/gpt-neo-2.7B", "main", neo, tokenizer)
    _hub_snapshot(cache, "EleutherAI/gpt-j-6B", "float16", gptj, tokenizer)
    return neo, gptj


def test_the_default_pair_loads_from_the_hugging_face_cache(tmp_path):
    neo, gptj = _authors_pair(tmp_path)
    detector = load_detector(TextDetectorConfig(cache_dir=str(tmp_path), device="cpu", min_tokens=16))
    assert detector.trained is True
    assert detector.calibration_key == "gpt-j-6B_gpt-neo-2.7B"
    assert detector.model_version == \
        "fast-detectgpt/EleutherAI/gpt-j-6B@float16_EleutherAI/gpt-neo-2.7B/analytic/fp32"
    assert detector.chunk_tokens == 128  # the models' context
    assert type(detector.scoring).__name__ == "GPTNeoForCausalLM"
    assert type(detector.sampling).__name__ == "GPTJForCausalLM"
    ids = list(OTHER.encode())
    expected = reference_criterion(_logits(gptj, ids), _logits(neo, ids), torch.tensor(ids[1:]))
    assert detector.predict([OTHER])[0].score == pytest.approx(expected, abs=1e-5)


def test_missing_models_and_unknown_pairs_are_refused_by_name(tmp_path):
    with pytest.raises(WeightsError) as caught:
        load_detector(TextDetectorConfig(cache_dir=str(tmp_path), device="cpu"))
    assert "Hugging Face model 'EleutherAI/gpt-neo-2.7B'" in str(caught.value)
    assert "TEXT_SCORING_MODEL" in str(caught.value) and str(tmp_path) in str(caught.value)
    _authors_pair(tmp_path)
    folder = next((tmp_path / "huggingface" / "models--EleutherAI--gpt-neo-2.7B" / "snapshots").iterdir())
    with pytest.raises(DetectorError, match="no criterion-to-probability constants"):
        load_detector(TextDetectorConfig(scoring_model=str(folder), sampling_model=str(folder), device="cpu"))
    same = load_detector(TextDetectorConfig(scoring_model=str(folder), sampling_model=str(folder), device="cpu",
                                            calibration="gpt-neo-2.7B_gpt-neo-2.7B", min_tokens=16))
    assert same.sampling is None and same.model_version.startswith("fast-detectgpt/local:")
    with pytest.raises(DetectorError, match="both be random"):
        load_detector(TextDetectorConfig(scoring_model="random:0", cache_dir=str(tmp_path), device="cpu"))
