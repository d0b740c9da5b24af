"""Speech and text detector throughput: audio seconds scored per second (AASIST) and texts per
second (Fast-DetectGPT), with the real architectures on seeded random weights (the cost does not
depend on the weights, so no checkpoint or model download is needed), and the audio decoder's time
per request (WAVs written here, decoded in its child process). Prints a markdown report.

    python bench/audio_text_throughput.py                          # this CPU: short runs
    python bench/audio_text_throughput.py --device cuda --text-pair paper --audio-batches 1,8,32 \
        --texts 32 --text-batch 8                                  # the GPU figures (owed)

Text pairs (real configs of the authors' models, built from code, random weights):
  paper   sampling GPT-J-6B, scoring GPT-Neo-2.7B (the default pair; ~35 GB in fp32, 17 GB fp16)
  neo2.7  GPT-Neo-2.7B in both roles (white-box; one forward; 11 GB fp32, 5.4 GB bf16)
  neo125  GPT-Neo-125M in both roles (the same architecture, small enough for a shared CPU)
Texts are random byte strings of --text-tokens tokens (a byte-level tokenizer: one token a byte;
the model cost depends only on the token count).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from api.detector.aasist import ARCHITECTURES, WINDOW_SAMPLES, AasistDetector, build_aasist  # noqa: E402
from api.detector.factory import resolve_device  # noqa: E402
from api.detector.fast_detectgpt import FastDetectGPTDetector  # noqa: E402
from api.detector.tiny_lm import byte_tokenizer  # noqa: E402
from api.detector.weights import WeightsRef  # noqa: E402

WINDOW_S = WINDOW_SAMPLES / 16000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_audio(name: str, device: torch.device, batches: list[int], iters: int) -> list[tuple]:
    ref = WeightsRef("AASIST", "AASIST_WEIGHTS", "random:0", "random", seed=0)
    model = build_aasist(ARCHITECTURES[name], ref).to(device)
    rows = []
    for batch in batches:
        detector = AasistDetector(model=model, model_version="bench", trained=False, weights=(ref,), device=device,
                                  max_batch_size=batch)
        rng = np.random.default_rng(batch)
        windows = [(0.1 * rng.standard_normal(WINDOW_SAMPLES)).astype(np.float32) for _ in range(batch)]
        detector.predict(windows[:1])  # warm-up
        sync(device)
        times = []
        for _ in range(iters):
            started = time.perf_counter()
            detector.predict(windows)
            sync(device)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        rows.append((name, batch, seconds * 1000, batch * WINDOW_S / seconds))
    return rows


def bench_decode(seconds: list[int], calls: int) -> list[tuple]:
    """decode_audio of 16 kHz 16-bit mono WAVs, as a request decodes them (child process, warm spare)."""
    import tempfile
    import wave

    from api.utils.audio_decode import decode_audio

    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for length in seconds:
            path = Path(folder) / f"{length}s.wav"
            with wave.open(str(path), "wb") as out:
                out.setnchannels(1)
                out.setsampwidth(2)
                out.setframerate(16000)
                out.writeframes((rng.standard_normal(16000 * length) * 3000).astype(np.int16).tobytes())
            times = []
            for _ in range(calls + 1):  # the first call starts the pool's first child: not counted
                started = time.perf_counter()
                decode_audio(path, "wav", timeout_s=60, memory_mb=2048, max_seconds=3600)
                times.append(time.perf_counter() - started)
                time.sleep(0.6)  # requests apart, as a service sees them: the spare is warm again
            rows.append((length, statistics.median(times[1:]), min(times[1:]), max(times[1:])))
    return rows


def _neo(size: str, dtype: torch.dtype):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    dims = {"2.7B": (2560, 32, 20), "125M": (768, 12, 12)}[size]
    config = GPTNeoConfig(vocab_size=50_257, max_position_embeddings=2048, hidden_size=dims[0], num_layers=dims[1],
                          num_heads=dims[2], attention_types=[[["global", "local"], dims[1] // 2]], window_size=256)
    torch.manual_seed(0)
    return GPTNeoForCausalLM(config).to(dtype).eval().requires_grad_(False)


def _gptj(dtype: torch.dtype):
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(1)
    config = GPTJConfig(vocab_size=50_400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64)
    return GPTJForCausalLM(config).to(dtype).eval().requires_grad_(False)


def bench_text(pair: str, device: torch.device, dtype: torch.dtype, texts: int, tokens: int, batch: int) -> tuple:
    started = time.perf_counter()
    if pair == "paper":
        scoring, sampling = _neo("2.7B", dtype), _gptj(dtype)
    else:
        scoring, sampling = _neo("2.7B" if pair == "neo2.7" else "125M", dtype), None
    build_s = time.perf_counter() - started
    detector = FastDetectGPTDetector(
        scoring=scoring.to(device), sampling=sampling.to(device) if sampling is not None else None,
        tokenizer=byte_tokenizer(model_max_length=2048), calibration_key="gpt-j-6B_gpt-neo-2.7B",
        model_version="bench", trained=False, weights=(), device=device, min_tokens=2, max_tokens=100_000,
        max_chars=1_000_000, chunk_tokens=2048, max_batch_size=batch)
    rng = np.random.default_rng(0)
    corpus = ["".join(chr(c) for c in rng.integers(97, 123, tokens)) for _ in range(texts)]
    detector.predict(corpus[:1])  # warm-up
    sync(device)
    started = time.perf_counter()
    detector.predict(corpus)
    sync(device)
    seconds = time.perf_counter() - started
    return pair, str(dtype).removeprefix("torch."), tokens, batch, texts, build_s, seconds / texts * 1000, \
        texts / seconds, texts * tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--audio-models", default="AASIST,AASIST-L")
    parser.add_argument("--audio-batches", default="1,4")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--text-pair", default="neo125", choices=("paper", "neo2.7", "neo125", "none"))
    parser.add_argument("--text-precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=200)
    parser.add_argument("--text-batch", type=int, default=1)
    parser.add_argument("--decode-seconds", default="10,60", help="WAV lengths for the decoder's table ('' skips)")
    parser.add_argument("--decode-calls", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # as the service does for AASIST
    print(f"# Speech and text detector throughput\n\n{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", load average {os.getloadavg()[0]:.1f}\n")
    if args.decode_seconds:
        print("## Audio decoding (child process, per request)\n")
        print("| WAV seconds | median s | min s | max s |\n| --- | --- | --- | --- |")
        for row in bench_decode([int(s) for s in args.decode_seconds.split(",")], args.decode_calls):
            print(f"| {row[0]} | {row[1]:.3f} | {row[2]:.3f} | {row[3]:.3f} |")
        print()
    if args.audio_models:
        print("## AASIST (one window = 64,600 samples = 4.0375 s; default hop = one window)\n")
        print("| model | batch | ms per batch | audio seconds scored per second |\n| --- | --- | --- | --- |")
        for name in args.audio_models.split(","):
            for row in bench_audio(name, device, [int(b) for b in args.audio_batches.split(",")], args.iters):
                print(f"| {row[0]} | {row[1]} | {row[2]:.0f} | {row[3]:.2f} |")
        print()
    if args.text_pair != "none":
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.text_precision]
        row = bench_text(args.text_pair, device, dtype, args.texts, args.text_tokens, args.text_batch)
        print("## Fast-DetectGPT\n")
        print("| pair | dtype | tokens per text | batch | texts | model build s | ms per text | texts per second "
              "| tokens per second |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]} | {row[5]:.1f} | {row[6]:.0f} | {row[7]:.3f} "
              f"| {row[8]:.0f} |")


if __name__ == "__main__":
    main()
