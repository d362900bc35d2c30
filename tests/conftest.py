import os

# Triton kernels run in the interpreter on CPU; this must be set before anything in the
# test session imports triton (afm never reads it inside a forward).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from helpers import tiny_llama_for  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _restore_grad_mode():
    """Some libraries (lm-eval) switch autograd off globally; keep tests independent."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


def _tiny(kind: str):
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True
            )
        )
    if kind == "phi3":
        return transformers.Phi3ForCausalLM(
            transformers.Phi3Config(
                **common, intermediate_size=64, num_key_value_heads=4, pad_token_id=0
            )
        )
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                **common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True
            )
        )
    if kind == "mistral":
        return transformers.MistralForCausalLM(
            transformers.MistralConfig(**common, intermediate_size=64, num_key_value_heads=2)
        )
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        )
    raise ValueError(kind)


@pytest.fixture
def tiny_model():
    """Factory for tiny random HF causal LMs (nothing downloaded)."""

    def make(kind: str = "llama", seed: int = 0):
        torch.manual_seed(seed)
        return _tiny(kind).eval()

    return make


@pytest.fixture(scope="session")
def toy_llama():
    """Factory: a tiny random Llama with a BPE tokenizer trained on toy-world text."""
    import itertools

    from afm import toyworld as tw
    from afm.toyworld.tokenizer import train_tokenizer

    tok = train_tokenizer(list(itertools.islice(tw.training_documents(), 200)), vocab_size=300)

    def make(max_positions: int = 64, tie: bool = False):
        return tiny_llama_for(tok, max_positions=max_positions, tie=tie), tok

    return make
