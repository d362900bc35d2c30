"""Byte-level BPE tokenizer for the toy world (trained with the ``tokenizers`` library).

Pre-tokenization is ``Digits(individual_digits=True)`` then
``ByteLevel(use_regex=False)``: every digit is its own token, and merges may
cross spaces and punctuation (compact step-by-step arithmetic).  Newlines
separate packed documents; the corpus is fed document by document, so no merge
contains a newline and ``"\\n"`` is always the single token ``"Ċ"``.  The
result is wrapped as a :class:`transformers.PreTrainedTokenizerFast` whose
``add_special_tokens=True`` prepends ``<|bos|>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

__all__ = ["train_tokenizer", "BOS", "EOS", "PAD"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Any:
    """Train the BPE tokenizer on ``texts`` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )
