"""MTP heads: alignment, causality (no leak), gradient isolation, checkpoints, bad input."""

import json
import os

import pytest
import torch
from conftest import VOCAB, tiny_causal_lm
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import mtprl
from mtprl.model.checkpoints import MTP_CONFIG_NAME, MTP_WEIGHTS_NAME

PROMPT, KEEP = 7, 6  # full length T = 13


def _batch(seed=0, batch=3, pad_first=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, PROMPT + KEEP), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad_first] = 0  # row 0 is left-padded
    ids[0, :pad_first] = 0
    return ids, mask


def _model(family="qwen2", heads=2, init="copy_last_layer", seed=0):
    model = tiny_causal_lm(family, seed=seed)
    mtprl.attach_mtp_heads(model, num_heads=heads, init=init)
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_main_equals_log_softmax_of_model_logits(temperature):
    model = _model()
    ids, mask = _batch()
    out = mtprl.forward_logprobs(model, ids, mask, KEEP, temperature=temperature)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -KEEP - 1:-1].float() / temperature
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, -KEEP:, None]).squeeze(-1)
    assert out.main.shape == (3, KEEP) and out.mtp.shape == (3, 2, KEEP)
    torch.testing.assert_close(out.main, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_no_leak_future_tokens_do_not_change_head_logprobs(family):
    model = _model(family)
    ids, mask = _batch()
    base = mtprl.forward_logprobs(model, ids, mask, KEEP).mtp
    g = torch.Generator().manual_seed(1)
    for j in range(KEEP):
        pos = PROMPT + j
        later = ids.clone()
        if pos + 1 < ids.shape[1]:
            later[:, pos + 1:] = torch.randint(1, VOCAB, later[:, pos + 1:].shape, generator=g)
        out = mtprl.forward_logprobs(model, later, mask, KEEP).mtp
        torch.testing.assert_close(out[:, :, j], base[:, :, j], atol=1e-6, rtol=0)
        changed = ids.clone()
        changed[:, pos] = (changed[:, pos] % (VOCAB - 1)) + 1  # a different real token
        out = mtprl.forward_logprobs(model, changed, mask, KEEP).mtp
        assert (out[:, :, j] - base[:, :, j]).abs().min() > 0, f"token {j} does not change its own log-prob"


def test_no_leak_head_distribution_does_not_depend_on_scored_token():
    """Scoring every vocabulary item at position j must give a normalised distribution: if head k's
    prediction at j depended on x_j, the scored values would not sum to 1."""
    model = _model(heads=2)
    ids, mask = _batch(batch=2)
    j = 3
    values = []
    for v in range(VOCAB):
        ids_v = ids.clone()
        ids_v[:, PROMPT + j] = v
        values.append(mtprl.forward_logprobs(model, ids_v, mask, KEEP).mtp[:, :, j])
    total = torch.logsumexp(torch.stack(values, dim=-1), dim=-1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)


def _manual_head_logprob(model, row_ids, t, k, temperature):
    """Independent path: run depths 1..k by hand on the prefix that ends at position t (no padding,
    explicit causal mask), and score x_{t+k+1} with head k at position t."""
    heads = model.mtp_heads
    emb, lm_head, rotary = model.get_input_embeddings(), model.get_output_embeddings(), model.model.rotary_emb
    n = t + 1
    h = model.model(input_ids=row_ids[None, :n]).last_hidden_state  # h^0 at positions 0..t only
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    for d in range(1, k + 1):
        layer = heads.layers[d - 1]
        e = emb(row_ids[None, d:n + d])  # Emb(x_{s+d}) for s = 0..t
        x = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(h)], dim=-1))
        pos = torch.arange(d, n + d)[None]
        x = layer.mtp_block(x, attention_mask=causal, position_embeddings=rotary(x, pos), position_ids=pos)
        h = layer.post_norm(x)
    logits = lm_head(h[0, t]).float() / temperature
    return torch.log_softmax(logits, -1)[row_ids[t + k + 1]]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_alignment_matches_heads_run_by_hand(family):
    model = _model(family, heads=2, init="random")
    ids, mask = _batch()
    temperature = 0.9
    out = mtprl.forward_logprobs(model, ids, mask, KEEP, temperature=temperature)
    row = 1  # an unpadded row: full position P+j is completion position j
    with torch.no_grad():
        for k in (1, 2):
            for j in range(KEEP):
                t = PROMPT + j - k - 1
                expected = _manual_head_logprob(model, ids[row], t, k, temperature)
                torch.testing.assert_close(out.mtp[row, k - 1, j], expected, atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_logprobs():
    model = _model(heads=3)
    ids, mask = _batch(pad_first=0)
    padded_ids = torch.cat([torch.zeros(3, 4, dtype=ids.dtype), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(3, 4, dtype=mask.dtype), mask], dim=1)
    a = mtprl.forward_logprobs(model, ids, mask, KEEP)
    b = mtprl.forward_logprobs(model, padded_ids, padded_mask, KEEP)
    torch.testing.assert_close(b.main, a.main, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.mtp, a.mtp, atol=1e-5, rtol=1e-5)


def test_padded_completion_positions_are_zero():
    model = _model()
    ids, mask = _batch()
    mask[2, -2:] = 0  # right padding after EOS
    out = mtprl.forward_logprobs(model, ids, mask, KEEP, compute_entropy=True, compute_accept=True)
    assert torch.all(out.main[2, -2:] == 0) and torch.all(out.mtp[2, :, -2:] == 0)
    assert torch.all(out.main[2, :-2] < 0)


def test_entropy_and_acceptance_against_full_distributions():
    model = _model(heads=2)
    ids, mask = _batch()
    temperature = 0.8
    out = mtprl.forward_logprobs(model, ids, mask, KEEP, temperature=temperature, compute_entropy=True,
                                 compute_accept=True)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -KEEP - 1:-1].float() / temperature
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(out.entropy, -(p * p.log()).sum(-1), atol=1e-5, rtol=1e-5)
    # Head distributions by hand for the unpadded row 1: exp(head logprob of every token) via the no-leak trick.
    row, j, k = 1, 2, 2
    vals = []
    for v in range(VOCAB):
        ids_v = ids.clone()
        ids_v[row, PROMPT + j] = v
        vals.append(mtprl.forward_logprobs(model, ids_v, mask, KEEP, temperature=temperature).mtp[row, k - 1, j])
    q = torch.stack(vals).exp()
    torch.testing.assert_close(out.accept[row, k - 1, j], torch.minimum(p[row, j], q).sum(), atol=1e-5, rtol=1e-5)
    assert out.accept.min() >= 0 and out.accept.max() <= 1 + 1e-6


def _hand_top_p(p, top_p):
    """Top-p by hand: keep the most probable tokens until their mass reaches top_p (at least one), renormalise."""
    order = p.sort(descending=True)
    before = order.values.cumsum(-1) - order.values  # mass of the more probable tokens
    keep_sorted = before < top_p
    keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order.indices, keep_sorted)
    kept = p * keep
    return kept / kept.sum(-1, keepdim=True)


def test_acceptance_under_the_samplers_truncation_against_hand_top_p():
    """accept_truncation applies the sampler's top-p to target and draft alike: sum_v min(topp(p), topp(q))."""
    from mtprl.generation.speculative import logits_warpers

    model = _model(heads=2)
    ids, mask = _batch()
    temperature, top_p = 0.8, 0.7
    out = mtprl.forward_logprobs(model, ids, mask, KEEP, temperature=temperature, compute_accept=True,
                                 accept_truncation=logits_warpers(1.0, 0, top_p))
    plain = mtprl.forward_logprobs(model, ids, mask, KEEP, temperature=temperature, compute_accept=True).accept
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -KEEP - 1:-1].float() / temperature
    row, j, k = 1, 2, 2
    p = _hand_top_p(torch.softmax(logits[row, j], -1), top_p)
    vals = []
    for v in range(VOCAB):
        ids_v = ids.clone()
        ids_v[row, PROMPT + j] = v
        vals.append(mtprl.forward_logprobs(model, ids_v, mask, KEEP, temperature=temperature).mtp[row, k - 1, j])
    q = _hand_top_p(torch.stack(vals).exp(), top_p)
    torch.testing.assert_close(out.accept[row, k - 1, j], torch.minimum(p, q).sum(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.accept, plain)  # the truncation changes the number
    assert out.accept.min() >= 0 and out.accept.max() <= 1 + 1e-6


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def test_detach_isolates_heads_and_joint_reaches_trunk():
    ids, mask = _batch()
    model = _model(heads=2)
    out = mtprl.forward_logprobs(model, ids, mask, KEEP, mtp_grad="detach")
    mtprl.mtp_ce_loss(out.mtp, mask[:, -KEEP:]).sum().backward()
    for name, grad in _grads(model).items():
        if name.startswith("mtp_heads."):
            assert grad is not None and grad.abs().sum() > 0, f"head parameter {name} got no gradient"
        else:
            assert grad is None or torch.all(grad == 0), f"non-MTP parameter {name} got gradient under detach"

    model.zero_grad(set_to_none=True)
    out = mtprl.forward_logprobs(model, ids, mask, KEEP, mtp_grad="joint")
    mtprl.mtp_ce_loss(out.mtp, mask[:, -KEEP:]).sum().backward()
    grads = _grads(model)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_copy_last_layer_init():
    model = _model(heads=2, init="copy_last_layer")
    last = model.model.layers[-1].state_dict()
    for layer in model.mtp_heads.layers:
        for name, value in layer.mtp_block.state_dict().items():
            torch.testing.assert_close(value, last[name])
            assert value.data_ptr() != last[name].data_ptr()
    assert set(dict(model.mtp_heads.layers[0].named_children())) == {"enorm", "hnorm", "eh_proj", "mtp_block",
                                                                      "post_norm"}


def test_save_and_load_round_trip(tmp_path):
    model = _model(heads=2, init="random")
    ids, mask = _batch()
    before = mtprl.forward_logprobs(model, ids, mask, KEEP)
    mtprl.save_pretrained(model, tmp_path / "ckpt")
    loaded, tokenizer = mtprl.load_pretrained(str(tmp_path / "ckpt"))
    assert tokenizer is None and loaded.mtp_heads.num_heads == 2
    after = mtprl.forward_logprobs(loaded.eval(), ids, mask, KEEP)
    torch.testing.assert_close(after.main, before.main)
    torch.testing.assert_close(after.mtp, before.mtp)
    # The main model alone still loads with plain transformers, with no MTP keys in its weights.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert not any(k.startswith("mtp_heads") for k in plain.state_dict())
    logits = plain(input_ids=ids, attention_mask=mask).logits[:, -KEEP - 1:-1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -KEEP:, None]).squeeze(-1)
    torch.testing.assert_close(before.main, expected, atol=1e-5, rtol=1e-5)
    with open(tmp_path / "ckpt" / MTP_CONFIG_NAME) as f:
        assert json.load(f)["num_heads"] == 2


@pytest.mark.parametrize("missing", [MTP_WEIGHTS_NAME, MTP_CONFIG_NAME, "config.json", "model.safetensors"])
def test_checkpoint_missing_file_is_named(tmp_path, missing):
    model = _model(heads=1)
    mtprl.save_pretrained(model, tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / missing)
    with pytest.raises(FileNotFoundError, match="ckpt"):
        mtprl.load_pretrained(str(tmp_path / "ckpt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mtprl.load_pretrained(str(tmp_path / "nowhere"))


def test_checkpoint_with_wrong_head_count_is_an_error(tmp_path):
    model = _model(heads=2)
    mtprl.save_pretrained(model, tmp_path / "ckpt")
    cfg = tmp_path / "ckpt" / MTP_CONFIG_NAME
    cfg.write_text(json.dumps({"num_heads": 3}))
    with pytest.raises(ValueError, match="missing"):
        mtprl.load_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_num_heads_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="num_heads"):
        mtprl.attach_mtp_heads(tiny_causal_lm(), num_heads=bad)


def test_bad_inputs_have_clear_errors():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="no decoder layers"):
        mtprl.attach_mtp_heads(gpt2)
    with pytest.raises(ValueError, match="init"):
        mtprl.attach_mtp_heads(tiny_causal_lm(), init="zeros")
    ids, mask = _batch()
    with pytest.raises(ValueError, match="attach_mtp_heads"):
        mtprl.forward_logprobs(tiny_causal_lm(), ids, mask, KEEP)
    model = _model(heads=2)
    with pytest.raises(ValueError, match="logits_to_keep"):
        mtprl.forward_logprobs(model, ids, mask, ids.shape[1])  # no prompt token at all
    with pytest.raises(ValueError, match="attention_mask shape"):
        mtprl.forward_logprobs(model, ids, mask[:, 1:], KEEP)
    with pytest.raises(ValueError, match="mtp_grad"):
        mtprl.forward_logprobs(model, ids, mask, KEEP, mtp_grad="stop")


def _with_token(ids, j, v):
    """ids with completion token j replaced by v in every row."""
    ids = ids.clone()
    ids[:, PROMPT + j] = v
    return ids


def test_distill_kl_against_full_distributions_and_its_gradient_reaches_heads_only():
    """compute_divergence: KL(p_main || q_k) per token equals the KL of the full distributions (head k's by the
    no-leak trick), and with mtp_grad="detach" its gradient reaches MTP-only parameters and nothing else."""
    model = _model(heads=2)
    ids, mask = _batch()
    temperature = 0.9
    out = mtprl.forward_logprobs(model, ids, mask, KEEP, temperature=temperature, compute_divergence="kl")
    log_p = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, -KEEP - 1:-1].float()
                              / temperature, -1)
    j = 2
    for k in (1, 2):
        head = torch.stack([mtprl.forward_logprobs(model, _with_token(ids, j, v), mask, KEEP,
                                                   temperature=temperature).mtp[:, k - 1, j] for v in range(VOCAB)], -1)
        expected = (log_p[:, j].exp() * (log_p[:, j] - head)).sum(-1)
        valid = mask[:, PROMPT + j] == 1
        torch.testing.assert_close(out.divergence[valid, k - 1, j], expected[valid], atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)
    out = mtprl.forward_logprobs(model, ids, mask, KEEP, mtp_grad="detach", compute_divergence="kl")
    (out.divergence * mask[:, -KEEP:].unsqueeze(1)).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("mtp_heads.") and ("mtp_block" in name or "eh_proj" in name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif not name.startswith("mtp_heads."):
            assert p.grad is None or p.grad.abs().sum() == 0, name


def test_main_logprobs_equal_forward_logprobs_main():
    from mtprl.model.logprobs import main_logprobs

    model = _model(heads=2)
    ids, mask = _batch()
    mask[2, -2:] = 0
    torch.testing.assert_close(main_logprobs(model, ids, mask, KEEP, 0.8),
                               mtprl.forward_logprobs(model, ids, mask, KEEP, temperature=0.8).main, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["kl", "tv"])
def test_head_divergence_value_and_gradient_against_autograd(kind, monkeypatch):
    """The tiled head divergence (KL, or TV = 1 - sum_v min(p, q)) equals the formula on full softmaxes, and its
    hand-written gradient equals autograd's, with a logit scale and a softcap, over several row tiles."""
    from mtprl.model import logprobs

    monkeypatch.setattr(logprobs, "_ACCEPT_ROWS", 4)  # 3 tiles for 10 rows
    g = torch.Generator().manual_seed(0)
    vocab, dim, temperature, softcap, scale = 11, 6, 0.8, 5.0, 1.3
    weight, bias = torch.randn(vocab, dim, generator=g), torch.randn(vocab, generator=g)
    main = torch.randn(2, 5, dim, generator=g)
    head = torch.randn(2, 5, dim, generator=g, dtype=torch.float64).float().requires_grad_(True)

    def logits(h):
        return softcap * torch.tanh((h @ weight.t() + bias) * scale / softcap) / temperature

    p = torch.softmax(logits(main), -1)
    q = torch.softmax(logits(head), -1)
    expected = (p * (p.log() - q.log())).sum(-1) if kind == "kl" else 1 - torch.minimum(p, q).sum(-1)
    upstream = torch.randn(2, 5, generator=g)
    (grad_ref,) = torch.autograd.grad((expected * upstream).sum(), head)
    value = logprobs.head_divergence(kind, head, main, weight, bias, temperature, softcap, scale)
    torch.testing.assert_close(value, expected.detach(), atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad((value * upstream).sum(), head)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    if kind == "tv":  # a sign slip in q (S - m) is caught by the same comparison
        assert not torch.allclose(-grad, grad_ref, atol=1e-5)


def test_tv_head_loss_raises_acceptance_and_leaves_the_main_model():
    """compute_divergence="tv" is 1 - mtp/accept/k exactly (same tokens, no truncation); SGD on it through detached
    heads raises the expected acceptance and changes MTP-only parameters only."""
    from mtprl.core.objectives import HEAD_LOSS_DIVERGENCE, head_only_loss

    model = _model(heads=2)
    ids, mask = _batch()
    out = mtprl.forward_logprobs(model, ids, mask, KEEP, compute_divergence="tv", compute_accept=True)
    head_mask = mask[:, -KEEP:].unsqueeze(1).bool() & out.mtp_mask
    torch.testing.assert_close(out.divergence[head_mask], 1 - out.accept[head_mask], atol=1e-5, rtol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n.startswith("mtp_heads.")], lr=0.5)
    start = out.accept[head_mask].mean().item()
    for _ in range(20):
        out = mtprl.forward_logprobs(model, ids, mask, KEEP, mtp_grad="detach",
                                     compute_divergence=HEAD_LOSS_DIVERGENCE["tv"])
        loss = head_only_loss("tv", out.mtp, out.divergence, head_mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = mtprl.forward_logprobs(model, ids, mask, KEEP, compute_accept=True).accept[head_mask].mean().item()
    print(f"expected acceptance {start:.3f} -> {end:.3f}")
    assert 1 - end < 0.5 * (1 - start)  # the rejection probability more than halved
    for name, p in model.named_parameters():
        if not name.startswith("mtp_heads."):
            assert torch.equal(p, before[name]), name
