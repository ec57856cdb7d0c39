"""Models: the project's own `tiny` preset (nothing is downloaded) and loading any HF causal LM with heads.

The `tiny` preset is a small Qwen2-architecture model over a character-level tokenizer built with
`tokenizers`: every printable ASCII character and newline is one token. It is saved like any HF model, so
TRL, accelerate and `AutoModelForCausalLM` treat it as they would a hub checkpoint.
"""

from __future__ import annotations

import os
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from .checkpoints import attach_or_load_heads, load_tokenizer

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII + space + newline

# Sized so that SFT on chain-sum arithmetic takes a few minutes on 2 CPU cores (see configs/tiny_sft.yaml).
TINY_CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=True, initializer_range=0.02)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; `decode(encode(s)) == s` for printable ASCII."""
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK] + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left", model_max_length=TINY_CONFIG["max_position_embeddings"])


def tiny_model(tokenizer=None, seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """A freshly initialised `tiny` Qwen2 for `tokenizer` (the char tokenizer by default)."""
    import torch

    tokenizer = tokenizer or char_tokenizer()
    cfg = dict(TINY_CONFIG, **overrides)
    config = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **cfg)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_model(name_or_path: str, num_heads: int | None = None, init: str = "copy_last_layer", seed: int = 0):
    """(model with MTP heads, tokenizer) from `tiny` (fresh), an mtprl checkpoint (its trained heads), or any
    HF causal LM directory (fresh heads attached). `num_heads=None` takes the checkpoint's count (1 if fresh);
    a number that differs from the checkpoint's is an error."""
    if name_or_path == "tiny":
        tokenizer = char_tokenizer()
        model = tiny_model(tokenizer, seed=seed)
    else:
        if not os.path.exists(name_or_path):
            raise FileNotFoundError(f"model {name_or_path!r}: no such directory (use 'tiny' or a local checkpoint; "
                                    "nothing is downloaded from a hub here)")
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
        tokenizer = load_tokenizer(name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    attach_or_load_heads(model, num_heads, init=init, source=None if name_or_path == "tiny" else name_or_path)
    return model, tokenizer
