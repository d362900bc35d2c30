"""Input-range initialisation from data as a separate no-grad pass (spec §2.4).

Running this before the optimizer and any distributed engine wrap the parameters
avoids the two problems of updating ``r.data`` inside a training forward: fights
with ZeRO / FSDP master copies and a host sync every step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from afm.analog.experts import AnalogExperts
from afm.analog.layers import AnalogLinear
from afm.reference import init_range_update

logger = logging.getLogger(__name__)


def _as_batches(batches: Any, tokenizer: Any, batch_size: int) -> Iterable[Any]:
    """What users have, as an iterable of batches: one ``BatchEncoding`` / dict or one
    tensor is a single batch; texts are tokenized (``tokenizer`` required)."""
    if isinstance(batches, (Mapping, torch.Tensor)):
        return [batches]
    if isinstance(batches, str):
        batches = [batches]
    if isinstance(batches, (list, tuple)) and batches and isinstance(batches[0], str):
        if tokenizer is None:
            raise ValueError("calibrate_input_ranges_: texts need tokenizer=")
        return _text_batches(list(batches), tokenizer, batch_size=batch_size)
    return batches


def _forward(model: nn.Module, batch: Any, device: torch.device) -> None:
    """One forward on a batch: a mapping of model kwargs, a tensor (the first positional
    argument), or a DataLoader's ``(input_ids, ...)`` tuple."""
    if isinstance(batch, Mapping):
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        inputs.pop("labels", None)
        model(**inputs)
        return
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        batch = batch[0]
    if not torch.is_tensor(batch):
        raise TypeError(
            f"calibrate_input_ranges_: a batch must be a mapping of model inputs, a tensor "
            f"of input ids or a tuple starting with one, got {type(batch).__name__}"
        )
    model(batch.to(device))


def _total(batches: Any, steps: int) -> int:
    try:
        return min(steps, len(batches))
    except TypeError:  # a generator: unknown length
        return steps


@torch.no_grad()
def calibrate_input_ranges_(
    model: nn.Module,
    batches: Any,
    *,
    max_steps: int | None = None,
    progress: bool = True,
    tokenizer: Any = None,
    batch_size: int = 16,
) -> int:
    """Set every analog layer's ``input_range`` from the data, in place.

    For the first ``init_steps`` batches (the layer config's, or ``max_steps``)
    ``r ← |(r·k + α·std(x_tile)) / (k + 1)|``.  Each layer clips and quantizes with
    its updated range, so downstream layers see the inputs they will see in training.
    ``batches``: an iterable of batches (dicts of model kwargs such as ``input_ids`` /
    ``attention_mask``, tensors of ids, or ``(input_ids, ...)`` tuples: a DataLoader);
    one ``BatchEncoding`` (or dict, or tensor) as a single batch; or a list of strings
    with ``tokenizer`` (tokenized in batches of ``batch_size``).  The progress bar's
    total is the number of batches that will really be used.  Returns that number.
    MoE experts (``AnalogExperts``): each expert's ranges from the tokens routed to it
    only, ``k`` counting the batches in which it received tokens.
    """
    batches = _as_batches(batches, tokenizer, batch_size)
    layers = [
        m
        for m in model.modules()
        if isinstance(m, (AnalogLinear, AnalogExperts)) and m.analog_config.input.uses_range
    ]
    if not layers:
        logger.info("calibrate_input_ranges_: no analog layers with input ranges")
        return 0
    steps = (
        max_steps
        if max_steps is not None
        else max(layer.analog_config.input.init_steps for layer in layers)
    )
    counts = {id(layer): 0 for layer in layers}

    def pre_hook(layer: AnalogLinear, args: tuple) -> None:
        k = counts[id(layer)]
        if k >= layer.analog_config.input.init_steps and max_steps is None:
            return
        x = args[0].reshape(-1, layer.in_features)
        alpha = layer.analog_config.input.init_std_alpha
        for s, (lo, hi) in enumerate(layer.tile_bounds):
            layer.input_range.data[s] = init_range_update(
                layer.input_range.data[s], x[:, lo:hi], k, alpha
            )
        counts[id(layer)] = k + 1

    expert_counts: dict[tuple[int, str, int], int] = {}

    def observe(module: AnalogExperts, proj: str, expert: int, x: torch.Tensor) -> None:
        key = (id(module), proj, expert)
        k = expert_counts.get(key, 0)
        if k >= module.analog_config.input.init_steps and max_steps is None:
            return
        rng = module.input_range(proj).data[expert]
        alpha = module.analog_config.input.init_std_alpha
        for s, (lo, hi) in enumerate(module.tile_bounds(proj)):
            rng[s] = init_range_update(rng[s], x[:, lo:hi], k, alpha)
        expert_counts[key] = k + 1

    handles = []
    for layer in layers:
        if isinstance(layer, AnalogExperts):
            layer.range_observer = observe
        else:
            handles.append(layer.register_forward_pre_hook(pre_hook))
    was_training = model.training
    model.eval()
    used = 0
    try:
        device = next(model.parameters()).device
        bar = tqdm(
            total=_total(batches, steps), desc="calibrating input ranges", disable=not progress
        )
        with bar:
            for batch in batches:
                if used >= steps:
                    break
                _forward(model, batch, device)
                used += 1
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            if isinstance(layer, AnalogExperts):
                layer.range_observer = None
        model.train(was_training)
    logger.info("calibrated input ranges of %d layers on %d batches", len(layers), used)
    return used


def calibrate_on_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    *,
    batch_size: int = 16,
    max_steps: int = 20,
    max_length: int | None = None,
    padding_side: str | None = None,
    progress: bool = False,
) -> int:
    """:func:`calibrate_input_ranges_` on ``texts`` tokenized in batches of ``batch_size``.

    ``max_length`` truncates each text; ``padding_side`` (``"left"`` / ``"right"``)
    overrides the tokenizer's for the duration of the call.  Returns the batches used.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no calibration texts given")
    batches = _text_batches(
        texts, tokenizer, batch_size=batch_size, max_length=max_length, padding_side=padding_side
    )
    return calibrate_input_ranges_(model, batches, max_steps=max_steps, progress=progress)


class _text_batches:  # noqa: N801 - used like a function; a class to have a len()
    """``texts`` tokenized in batches of ``batch_size`` (``input_ids``, ``attention_mask``)."""

    def __init__(
        self,
        texts: list[str],
        tokenizer: Any,
        *,
        batch_size: int,
        max_length: int | None = None,
        padding_side: str | None = None,
    ) -> None:
        self.texts, self.tokenizer, self.batch_size = texts, tokenizer, batch_size
        self.max_length, self.padding_side = max_length, padding_side

    def __len__(self) -> int:
        return -(-len(self.texts) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        tok = self.tokenizer
        old = tok.padding_side
        if self.padding_side is not None:
            tok.padding_side = self.padding_side
        try:
            for i in range(0, len(self.texts), self.batch_size):
                enc = tok(
                    self.texts[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                )
                yield {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        finally:
            tok.padding_side = old
