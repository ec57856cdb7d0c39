"""Models: the project's own `tiny` preset (nothing is downloaded) and loading any HF causal LM with heads.

The `tiny` preset is a small Qwen2-architecture model over a character-level tokenizer built with
`tokenizers`: every printable ASCII character and newline is one token. It is saved like any HF model, so
TRL, accelerate and `AutoModelForCausalLM` treat it as they would a hub checkpoint.
"""

from __future__ import annotations

import os

import string

import torch

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from .checkpoints import attach_or_load_heads, load_tokenizer
from .lora import ADAPTER_CONFIG, adapter_base, is_adapter_dir

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

    tokenizer = tokenizer or char_tokenizer()
    cfg = dict(TINY_CONFIG, **overrides)
    config = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **cfg)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


DTYPES = ("auto", "bfloat16", "float16", "float32")


def _drop_quantization(model) -> None:
    """A GGUF checkpoint is de-quantized to float weights by transformers' GGUF reader, but the model still says
    it is quantized (`GgufConfig`), and trainers refuse to train a quantized model: forget that it was."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


# Model types whose remote code is a stock transformers class plus MTP layers that mtprl attaches itself
# (`mtprl.model.native`): loaded as that class without trust_remote_code.
STOCK_CLASS_OF = {"mimo": (Qwen2Config, "Qwen2ForCausalLM")}


def _stock_class(name_or_path, trust_remote_code, gguf_file) -> dict:
    """from_pretrained kwargs that load e.g. a MiMo checkpoint (model_type "mimo", remote code) as the Qwen2 model
    it is; its `model.mtp_layers.*` tensors become mtprl's heads. Empty for everything else."""
    if trust_remote_code or gguf_file:
        return {}
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path)
    except (OSError, ValueError):
        return {}  # from_pretrained reports it
    stock = STOCK_CLASS_OF.get(config_dict.get("model_type"))
    if stock is None:
        return {}
    config_cls, _ = stock
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures", "auto_map")}
    return {"config": config_cls(**fields)}


def looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id: absolute, relative ('./', '../', '~'), more than one '/', or its first
    component is a directory here (`runs/x` next to `runs/`). A hub id is 'name' or 'org/name'."""
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
        return True
    return "/" in name_or_path and os.path.isdir(name_or_path.split("/", 1)[0])


def check_local_path(name_or_path: str) -> None:
    """A path that looks local and is not a directory fails at once, instead of after the hub's retries."""
    if looks_local(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise OSError(f"model_name_or_path {name_or_path!r}: no such directory (it looks like a local path, so the "
                      "hub was not asked; a hub id is 'org/name'; offline, HF_HUB_OFFLINE=1 skips the hub for ids)")


def load_base_model(name_or_path: str, *, dtype: str = "auto", attn_implementation: str | None = None,
                    trust_remote_code: bool = False, gguf_file: str | None = None):
    """(model, tokenizer) through `from_pretrained`: a hub id or a local directory, optionally a GGUF file in it.
    On failure the error is transformers' own plus one line naming the model."""
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_local_path(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            attn_implementation=attn_implementation, **_stock_class(name_or_path, trust_remote_code, gguf_file),
            **kwargs)
        tokenizer = (AutoTokenizer.from_pretrained(name_or_path, **kwargs) if gguf_file
                     else load_tokenizer(name_or_path, trust_remote_code=trust_remote_code))
    except (OSError, ValueError, ImportError) as e:
        where = f"{name_or_path}/{gguf_file}" if gguf_file else name_or_path
        if not os.path.exists(os.path.expanduser(name_or_path)):  # 'org/name' form, but meant as a path?
            raise OSError(f"{e}\nmtprl: could not load model {where!r}: the path {name_or_path!r} does not exist "
                          f"here (in {os.getcwd()}), and as a hub id it could not be fetched (no network access "
                          "or hub cache)") from e
        raise OSError(f"{e}\nmtprl: could not load model {where!r} (a local path must be a model directory)") from e
    if gguf_file:  # transformers' GGUF reader has already de-quantized to float weights
        _drop_quantization(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_adapted(path: str, **load_kwargs):
    """(merged model with the run's trained heads, tokenizer) from a LoRA run directory: the base model the adapter
    names, the adapter merged into it (`merge_and_unload`), the heads from `path`. Here, not in lora.py, so that
    lora.py (configuration and adapter files) does not import the loaders that import it."""
    from peft import PeftModel

    from .checkpoints import has_mtp_checkpoint, load_mtp_heads, load_tokenizer

    base_path = adapter_base(path)
    if looks_local(base_path) and not os.path.exists(os.path.expanduser(base_path)):
        raise FileNotFoundError(f"{os.path.join(path, ADAPTER_CONFIG)}: its base model {base_path!r} does not exist "
                                "(a relative path resolves from the directory the command runs in)")
    base, _ = load_base_model(base_path, **load_kwargs)
    merged = PeftModel.from_pretrained(base, path).merge_and_unload()
    if has_mtp_checkpoint(path):
        load_mtp_heads(merged, path)
    return merged, load_tokenizer(path)


def load_model(name_or_path: str, num_heads: int | None = None, init: str = "copy_last_layer", seed: int = 0,
               **load_kwargs):
    """(model with MTP heads, tokenizer) from `tiny` (fresh), an mtprl checkpoint (its trained heads), or any
    causal LM `from_pretrained` accepts (hub id or directory; fresh heads attached). `load_kwargs` go to
    `load_base_model` (dtype, attn_implementation, trust_remote_code, gguf_file). `num_heads=None` takes the
    checkpoint's count (1 if fresh); a number that differs from the checkpoint's is an error."""
    if name_or_path == "tiny":
        tokenizer = char_tokenizer()
        model = tiny_model(tokenizer, seed=seed)
    elif os.path.isdir(name_or_path) and is_adapter_dir(name_or_path):  # a LoRA run: merged, with its heads
        model, tokenizer = load_adapted(name_or_path, **load_kwargs)
    else:
        model, tokenizer = load_base_model(name_or_path, **load_kwargs)
    attach_or_load_heads(model, num_heads, init=init, source=None if name_or_path == "tiny" else name_or_path)
    return model, tokenizer
