"""Tiny seeded random causal LMs and a byte-level tokenizer, built locally (no hub, no download).

For `random:<seed>` text-model settings: the whole Fast-DetectGPT path (tokenise, two models, the
criterion, chunking) runs in milliseconds on a CPU. The tokenizer is a GPT-2-style byte-level BPE
with no merges (one token per UTF-8 byte, no BOS added, `<|endoftext|>` as eos/pad), made with the
`tokenizers` library; the models are transformers' GPT-2 built from a config in code. The sampling
model's vocabulary is padded past the tokenizer's, as GPT-J's (50,400) is past GPT-Neo's (50,257),
so the vocabulary cut of the criterion is exercised too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported only when a tiny model is built
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 bytes + eos
TINY_CONTEXT = 128
SAMPLING_VOCAB_PADDING = 7


def byte_tokenizer(model_max_length: int = TINY_CONTEXT) -> PreTrainedTokenizerFast:
    """A PreTrainedTokenizerFast over UTF-8 bytes (GPT-2's byte-to-unicode alphabet, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()  # byte value -> printable stand-in character, as GPT-2's BPE
    vocab = {alphabet[b]: b for b in range(256)}
    vocab[EOS] = 256
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=model_max_length)


def tiny_gpt2(seed: int, vocab_size: int = BYTE_VOCAB, context: int = TINY_CONTEXT) -> GPT2LMHeadModel:
    """A 2-layer, 32-wide GPT-2 with seeded random weights, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=256, eos_token_id=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval().requires_grad_(False)
