"""Tiny random HF causal LMs of every family afm supports (tests/analog/test_architectures.py).

Built from configs (nothing downloaded): hidden 32, 2 layers, vocab 96; the MoE families
with 4 experts, top-2.  ``build(family)`` seeds torch and returns the model in eval mode.
"""

from __future__ import annotations

import torch
import transformers

DENSE = ("llama", "qwen2", "qwen3", "phi3", "mistral", "gemma2", "gemma3", "gpt2")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
FAMILIES = DENSE + MOE

_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _config(family: str) -> transformers.PretrainedConfig:
    c = dict(_COMMON)
    experts = dict(num_experts_per_tok=2)
    if family == "llama":
        return transformers.LlamaConfig(**c, tie_word_embeddings=True)
    if family == "qwen2":
        return transformers.Qwen2Config(**c, tie_word_embeddings=True)
    if family == "qwen3":
        return transformers.Qwen3Config(**c, head_dim=8)
    if family == "phi3":
        return transformers.Phi3Config(**c)
    if family == "mistral":
        return transformers.MistralConfig(**c)
    if family == "gemma2":
        return transformers.Gemma2Config(**c, head_dim=8)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**c, head_dim=8)
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
            eos_token_id=2,
        )  # fmt: skip
    if family == "mixtral":
        return transformers.MixtralConfig(**c, num_local_experts=4, **experts)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **c, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40,
            **experts,
        )  # fmt: skip
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **c, num_experts=4, moe_intermediate_size=24, head_dim=8, **experts
        )
    if family == "olmoe":
        return transformers.OlmoeConfig(**c, num_experts=4, **experts)
    if family == "gpt_oss":
        return transformers.GptOssConfig(
            **c, num_local_experts=4, head_dim=8, layer_types=["sliding_attention"] * 2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **experts,
        )  # fmt: skip
    raise ValueError(family)


def build(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random ``family`` model; its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family))
    with torch.no_grad():  # some families initialise experts / routers to zeros
        for p in model.parameters():
            if p.ndim >= 2 and float(p.abs().max()) == 0.0:
                p.normal_(0.0, 0.05)
    return model.eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (batch, length), generator=g)
