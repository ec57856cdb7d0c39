"""Native MTP checkpoints: tiny DeepSeek-V3, GLM-4.5 and MiMo-layout checkpoints whose MTP tensors this test
writes by hand in each family's own names; mtprl imports them, its heads compute what the family's formula
computes (written out here), one OCC step trains, export writes the family's layout, and re-import is
bit-identical."""

import copy
import json
import math
import os
import warnings

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM)

import mtprl
from mtprl.model.loading import char_tokenizer, load_model
from mtprl.model.native import export_native
from mtprl.training.trainer import MTPGRPOConfig, MTPGRPOTrainer

TOK = char_tokenizer()
V, H, L, DEPTHS = len(TOK), 32, 2, 2


def _deepseek():
    return DeepseekV3ForCausalLM, DeepseekV3Config(
        vocab_size=V, hidden_size=H, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=L,
        num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, first_k_dense_replace=1, num_nextn_predict_layers=DEPTHS, max_position_embeddings=128,
        attn_implementation="eager", pad_token_id=TOK.pad_token_id, bos_token_id=None, eos_token_id=TOK.eos_token_id)


def _glm():
    return Glm4MoeForCausalLM, Glm4MoeConfig(
        vocab_size=V, hidden_size=H, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_shared_experts=1, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, use_qk_norm=True,
        num_nextn_predict_layers=DEPTHS, max_position_embeddings=128, attn_implementation="eager",
        pad_token_id=TOK.pad_token_id, bos_token_id=None, eos_token_id=TOK.eos_token_id)


def _mimo():
    config = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=L,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="eager", pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id)
    config.num_nextn_predict_layers = DEPTHS  # MiMo's config.json field; the block is a Qwen2 layer
    return Qwen2ForCausalLM, config


def _qwen3_next():
    return Qwen3NextForCausalLM, Qwen3NextConfig(
        vocab_size=V, hidden_size=H, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, max_position_embeddings=128,
        attn_implementation="eager", pad_token_id=TOK.pad_token_id, bos_token_id=None, eos_token_id=TOK.eos_token_id,
        mtp_num_hidden_layers=1, router_aux_loss_coef=0.0)


# The family's checkpoint names for depth k's parts (independent of mtprl.model.native's table), and the order of the
# concatenation its MTP forward uses.
FAMILIES = {
    "deepseek_v3": dict(make=_deepseek, prefix=lambda k: f"model.layers.{L + k}.", enorm="enorm", hnorm="hnorm",
                        proj="eh_proj", out_norm="shared_head.norm", hidden_first=False),
    "glm4_moe": dict(make=_glm, prefix=lambda k: f"model.layers.{L + k}.", enorm="enorm", hnorm="hnorm",
                     proj="eh_proj", out_norm="shared_head.norm", hidden_first=False),
    "mimo": dict(make=_mimo, prefix=lambda k: f"model.mtp_layers.{k}.", enorm="token_layernorm",
                 hnorm="hidden_layernorm", proj="input_proj", out_norm="final_layernorm", hidden_first=True),
    # one depth; its norms scale by (1 + w), as every Qwen3-Next RMSNorm does
    "qwen3_next": dict(make=_qwen3_next, prefix=lambda k: "mtp.", block=lambda k: "mtp.layers.0.",
                       enorm="pre_fc_norm_embedding", hnorm="pre_fc_norm_hidden", proj="fc", out_norm="norm",
                       hidden_first=False, depths=1, one_plus=True),
}


def _depths(family):
    return FAMILIES[family].get("depths", DEPTHS)


def _block_prefix(family, k):
    spec = FAMILIES[family]
    return spec["block"](k) if "block" in spec else spec["prefix"](k)


def _block_class(model):
    return type(model.model.layers[-1])


def _block_config(config):
    """The family's MTP block config: transformers' get_mtp_config where the family declares num_mtp_layers (MoE
    blocks); Qwen3-Next's MTP block is a full-attention layer."""
    if getattr(config, "num_mtp_layers", None):
        return config.get_mtp_config()
    config = copy.deepcopy(config)
    if getattr(config, "layer_types", None):
        config.layer_types = ["full_attention"] * len(config.layer_types)
    return config


def _write_checkpoint(path, family):
    """The main model via save_pretrained, plus each depth's MTP tensors under the family's names: a fresh
    decoder block of the family's class (MoE experts stored one by one, as the released checkpoints do), the
    norms (not 1, so an order mix-up shows) and the projection."""
    spec = FAMILIES[family]
    cls, config = spec["make"]()
    torch.manual_seed(0)
    model = cls(config).eval()
    model.save_pretrained(path)
    TOK.save_pretrained(path)
    block_config = _block_config(config)
    tensors = {}
    g = torch.Generator().manual_seed(1)
    for k in range(_depths(family)):
        p, b = spec["prefix"](k), _block_prefix(family, k)
        block = _block_class(model)(block_config, k)
        for name, t in block.state_dict().items():  # fresh values: an un-initialised buffer may hold NaN
            noise = torch.randn(t.shape, generator=g)
            t = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise
            if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows then up rows per expert
                gate, up = t.chunk(2, dim=1)
                for e in range(t.shape[0]):
                    tensors[f"{b}mlp.experts.{e}.gate_proj.weight"] = gate[e].contiguous()
                    tensors[f"{b}mlp.experts.{e}.up_proj.weight"] = up[e].contiguous()
            elif name.endswith("mlp.experts.down_proj"):
                for e in range(t.shape[0]):
                    tensors[f"{b}mlp.experts.{e}.down_proj.weight"] = t[e].contiguous()
            else:
                tensors[b + name] = t.contiguous()
        for part in ("enorm", "hnorm", "out_norm"):
            tensors[f"{p}{spec[part]}.weight"] = 1.0 + 0.3 * torch.randn(H, generator=g)
        tensors[f"{p}{spec['proj']}.weight"] = 0.2 * torch.randn(H, 2 * H, generator=g)
        if family in ("deepseek_v3", "glm4_moe"):  # DeepSeek-layout checkpoints ship copies of the shared head and embedding
            tensors[f"{p}shared_head.head.weight"] = model.lm_head.weight.detach().clone()
            tensors[f"{p}embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    main = load_file(os.path.join(path, "model.safetensors"))
    save_file({**main, **tensors}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return tensors


def _rms(x, w, eps, one_plus=False):
    x = x.float()
    return (1.0 + w if one_plus else w) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _fused(tensors, p, name, num_experts):
    """The checkpoint's per-expert tensors fused as transformers' MoE layer holds them."""
    if name.endswith("experts.gate_up_proj"):
        return torch.stack([torch.cat([tensors[f"{p}mlp.experts.{e}.gate_proj.weight"],
                                       tensors[f"{p}mlp.experts.{e}.up_proj.weight"]]) for e in range(num_experts)])
    return torch.stack([tensors[f"{p}mlp.experts.{e}.down_proj.weight"] for e in range(num_experts)])


def _family_block(model, family, tensors, k):
    """Depth k's decoder block rebuilt from the checkpoint tensors by this test (not by mtprl)."""
    spec, config = FAMILIES[family], model.config
    block = _block_class(model)(_block_config(config), k).eval()
    p = _block_prefix(family, k)
    num_experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None)
    state = {name: (_fused(tensors, p, name, num_experts) if ".experts." in name and "shared" not in name
                    else tensors[p + name]) for name in block.state_dict()}
    block.load_state_dict(state)
    return block


def _family_logprobs(model, family, tensors, ids):
    """log p_k(x_{t+k+1}) for every depth k by the family's formula: h^0 = the trunk after its final norm (MiMo:
    before it, vLLM's `MiMoModel.forward`);
    x = proj(cat[enorm(Emb(x_{t+k})), hnorm(h^{k-1}_t)]) (MiMo: [hidden, emb], and Emb zero in the row of the
    first position, `mimo_mtp.py`); h^k = out_norm(Block(x)) at the positions of the embedded tokens, under a causal
    mask; logits = lm_head(h^k)."""
    spec, eps = FAMILIES[family], model.config.rms_norm_eps
    one_plus = spec.get("one_plus", False)
    with torch.no_grad():
        if family == "mimo":  # the decoder with its final norm taken out: the state before it
            norm, model.model.norm = model.model.norm, torch.nn.Identity()
            try:
                h = model.model(input_ids=ids).last_hidden_state
            finally:
                model.model.norm = norm
        else:
            h = model.model(input_ids=ids).last_hidden_state
        T, out = ids.shape[1], []
        for k in range(1, _depths(family) + 1):
            p = spec["prefix"](k - 1)
            emb = model.model.embed_tokens(ids[:, k:])
            if family == "mimo":
                emb[:, 0] = 0.0
            e = _rms(emb, tensors[f"{p}{spec['enorm']}.weight"], eps, one_plus)
            hh = _rms(h[:, : T - k], tensors[f"{p}{spec['hnorm']}.weight"], eps, one_plus)
            x = torch.cat([hh, e] if spec["hidden_first"] else [e, hh], dim=-1) @ tensors[f"{p}{spec['proj']}.weight"].T
            pos = torch.arange(k, T).unsqueeze(0)
            n = T - k
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            cos_sin = model.model.rotary_emb(x, pos)
            y = _family_block(model, family, tensors, k - 1)(x, attention_mask=mask, position_embeddings=cos_sin,
                                                              position_ids=pos)
            h = _rms(y, tensors[f"{p}{spec['out_norm']}.weight"], eps, one_plus)
            logp = torch.log_softmax(model.lm_head(h).float(), -1)  # h[:, t] predicts x_{t+k+1}
            out.append(logp[:, :-1].gather(-1, ids[:, k + 1:, None]).squeeze(-1))  # [B, T-k-1]
    return out


def _ids(batch=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (batch, T), generator=g)


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_model(str(path), dtype="float32")
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_native_mtp_weights_import_and_heads_compute_the_familys_formula(tmp_path, family):
    tensors = _write_checkpoint(tmp_path, family)
    model = _load(tmp_path)
    heads = mtprl.get_mtp_heads(model)
    spec = FAMILIES[family]
    assert heads.num_heads == _depths(family) and heads.native == family
    for k in range(_depths(family)):
        p, layer = spec["prefix"](k), heads.layers[k]
        assert torch.equal(layer.enorm.weight, tensors[f"{p}{spec['enorm']}.weight"])
        assert torch.equal(layer.hnorm.weight, tensors[f"{p}{spec['hnorm']}.weight"])
        assert torch.equal(layer.eh_proj.weight, tensors[f"{p}{spec['proj']}.weight"])
        assert torch.equal(layer.post_norm.weight, tensors[f"{p}{spec['out_norm']}.weight"])
        assert torch.equal(layer.mtp_block.input_layernorm.weight,
                           tensors[f"{_block_prefix(family, k)}input_layernorm.weight"])
    ids = _ids()
    keep = 6
    ours = mtprl.forward_logprobs(model, ids, torch.ones_like(ids), keep).mtp  # [B, K, keep]
    expected = _family_logprobs(model, family, tensors, ids)
    T = ids.shape[1]
    for k in range(1, _depths(family) + 1):
        # completion token j (position T-keep+j) is predicted by depth k from position T-keep+j-k-1
        want = expected[k - 1][:, T - keep - k - 1: T - k - 1]
        torch.testing.assert_close(ours[:, k - 1], want, rtol=1e-4, atol=1e-5, msg=f"{family} depth {k}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_native_checkpoint_trains_an_occ_step_exports_and_reimports_identically(tmp_path, family):
    tensors = _write_checkpoint(tmp_path / "native", family)
    model = _load(tmp_path / "native")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = MTPGRPOConfig(output_dir=str(tmp_path / "rl"), per_device_train_batch_size=8, num_generations=4,
                         max_completion_length=6, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                         save_strategy="no", beta=0.0, seed=0, bf16=False, max_steps=2, steps_per_generation=2,
                         mtp_regime="occ", mtp_num_heads=_depths(family))
    data = Dataset.from_list([{"prompt": p} for p in ["12+3=", "7-4=", "20+2=", "9+9="] * 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, args=args, train_dataset=data, processing_class=TOK,
                                 reward_funcs=[lambda completions, **kw: [float(len(c) % 3) for c in completions]])
        trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl")]
    lambdas = [r["mtp/lambda/1"] for r in rows if "mtp/lambda/1" in r]
    assert all(math.isfinite(x) for x in lambdas) and any(x != 0.0 for x in lambdas)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("mtp_heads."))

    out = tmp_path / "exported"
    assert export_native(model, str(out), TOK) == family
    # the family's names in the written files: the per-depth tensors under their own keys, experts one by one
    index = json.load(open(out / "model.safetensors.index.json"))["weight_map"]
    spec = FAMILIES[family]
    for k in range(_depths(family)):
        p = spec["prefix"](k)
        for part in ("enorm", "hnorm", "proj", "out_norm"):
            assert f"{p}{spec[part]}.weight" in index
    assert set(index) >= {k for k in tensors}
    with safe_open(str(out / index[f"{spec['prefix'](0)}{spec['proj']}.weight"]), framework="pt") as f:
        assert torch.equal(f.get_tensor(f"{spec['prefix'](0)}{spec['proj']}.weight"),
                           model.mtp_heads.layers[0].eh_proj.weight.detach())
    again = _load(out)
    assert mtprl.get_mtp_heads(again).native == family
    trained, reloaded = model.state_dict(), again.state_dict()
    assert set(trained) == set(reloaded)
    for name, t in trained.items():
        assert torch.equal(t, reloaded[name]), name


def test_export_cli_writes_the_native_layout_and_refuses_a_model_without_one(tmp_path, capsys):
    from mtprl.cli import main

    _write_checkpoint(tmp_path / "native", "mimo")
    assert main(["export", "--model_name_or_path", str(tmp_path / "native"), "--output_dir",
                 str(tmp_path / "out"), "--format", "native"]) == 0
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))["weight_map"]
    assert "model.mtp_layers.1.input_proj.weight" in index and "model.layers.0.mlp.up_proj.weight" in index
    first, second = _load(tmp_path / "native").state_dict(), _load(tmp_path / "out").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first) and set(first) == set(second)

    # a Qwen2 model with fresh heads (no family layout): a clear error, nothing written
    tiny, tok = load_model("tiny")
    mtprl.save_pretrained(tiny, str(tmp_path / "tiny"), tok)
    assert main(["export", "--model_name_or_path", str(tmp_path / "tiny"), "--output_dir", str(tmp_path / "x"),
                 "--format", "native"]) == 1
    assert "no native MTP layout" in capsys.readouterr().err and not os.path.exists(tmp_path / "x")
    assert main(["export", "--model_name_or_path", str(tmp_path / "tiny"), "--output_dir", str(tmp_path / "x"),
                 "--format", "onnx"]) == 1


def test_a_mimo_checkpoint_loads_as_qwen2_with_its_mtp_layers_without_remote_code(tmp_path):
    """MiMo-7B's config says model_type "mimo" (remote code = Qwen2 + MTP layers): mtprl loads it as Qwen2 and
    its model.mtp_layers.* tensors as the heads."""
    tensors = _write_checkpoint(tmp_path, "mimo")
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.update(model_type="mimo", architectures=["MiMoForCausalLM"],
               auto_map={"AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM"})
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    model = _load(tmp_path)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.mtp_heads.native == "mimo"
    assert model.mtp_heads.num_heads == DEPTHS
    assert torch.equal(model.mtp_heads.layers[1].eh_proj.weight, tensors["model.mtp_layers.1.input_proj.weight"])


def test_mtprl_checkpoint_of_native_heads_keeps_their_family(tmp_path):
    """A run's output (mtprl format) of a model with native heads reloads them with the family's block (MoE here)
    and exports to the family's layout again."""
    _write_checkpoint(tmp_path / "native", "deepseek_v3")
    model = _load(tmp_path / "native")
    mtprl.save_pretrained(model, str(tmp_path / "run"), TOK)
    assert json.load(open(tmp_path / "run" / "mtp_config.json"))["native"] == "deepseek_v3"
    again = _load(tmp_path / "run")
    assert again.mtp_heads.native == "deepseek_v3"
    assert type(again.mtp_heads.layers[0].mtp_block.mlp).__name__ == "DeepseekV3MoE"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert export_native(again, str(tmp_path / "out"), TOK) == "deepseek_v3"
    final = _load(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), final.state_dict().values()))


def test_fresh_heads_on_a_family_that_declares_mtp_layers_have_its_mtp_block_and_export_natively(tmp_path):
    """A DeepSeek-V3 model without MTP weights gets fresh heads built from transformers' get_mtp_config (an MoE
    block, as the family's MTP layer is), so they export to the family's layout and load back identically."""
    cls, config = _deepseek()
    torch.manual_seed(0)
    model = cls(config).eval()
    heads = mtprl.attach_mtp_heads(model, 1)
    assert type(heads.layers[0].mtp_block.mlp).__name__ == "DeepseekV3MoE" and heads.native is None
    assert export_native(model, str(tmp_path / "out"), TOK) == "deepseek_v3"
    again = _load(tmp_path / "out")
    assert again.mtp_heads.native == "deepseek_v3"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_load_pretrained_reads_the_native_export_and_says_where_heads_come_from(tmp_path, capsys):
    """`mtprl export`'s default (native) output loads through the public loader with the same heads; a config that
    declares MTP layers without their tensors warns and says it attached fresh ones."""
    from mtprl.cli import main

    _write_checkpoint(tmp_path / "native", "deepseek_v3")
    assert main(["export", "--model_name_or_path", str(tmp_path / "native"), "--output_dir",
                 str(tmp_path / "out")]) == 0
    model, tok = mtprl.load_pretrained(str(tmp_path / "out"))
    first = _load(tmp_path / "native").mtp_heads.state_dict()
    assert all(torch.equal(first[k], v) for k, v in model.mtp_heads.state_dict().items()) and tok is not None
    assert "loaded from" in capsys.readouterr().out

    bare = tmp_path / "bare"
    cls, config = FAMILIES["deepseek_v3"]["make"]()
    cls(config).save_pretrained(bare)  # num_nextn_predict_layers in the config, no MTP tensors
    TOK.save_pretrained(bare)
    assert getattr(config, "num_nextn_predict_layers", 0) > 0
    with pytest.warns(UserWarning, match="declares MTP layers .* ships no MTP tensors"):
        load_model(str(bare), dtype="float32")
    assert "fresh head(s) attached (init=copy_last_layer)" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="native MTP layout"):
        mtprl.load_pretrained(str(bare))
