"""What a distillation run reports while it trains: the progress bar and ``log.jsonl``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from afm.training.step import StepOutcome

__all__ = ["TrainLog"]

logger = logging.getLogger(__name__)


class TrainLog:
    """Counts skipped steps, keeps the last applied loss, writes a row every
    ``logging_steps`` (and at the end) to ``log.jsonl`` on the main process."""

    def __init__(
        self,
        out: Path,
        *,
        start: int,
        total: int,
        end: int,
        skipped: int,
        logging_steps: int,
        main_process: bool,
        progress: bool,
    ) -> None:
        from tqdm.auto import tqdm

        self.path = out / "log.jsonl"
        self.out, self.end, self.logging_steps = out, end, logging_steps
        self.main_process = main_process
        self.skipped = skipped
        self.last_loss: float | None = None
        self.rows: list[dict[str, Any]] = []
        self._t_last, self._tokens = time.perf_counter(), 0
        self.bar = tqdm(
            total=total,
            initial=start,
            desc="distilling",
            unit="step",
            disable=not progress or not main_process,
        )

    def record(self, step: int, outcome: StepOutcome, lr: float, accelerator: Any) -> None:
        """Account for step ``step`` (0-based) after the scheduler stepped."""
        self._tokens += outcome.tokens
        sums = outcome.sums
        if outcome.skipped:
            self.skipped += 1
            logger.warning(
                "step %d: non-finite loss or gradient, update skipped (%d so far)",
                step + 1,
                self.skipped,
            )
        else:
            if accelerator.num_processes > 1:
                sums = accelerator.reduce(sums, reduction="mean")
            self.last_loss = float(sums[0])
        self.bar.update(1)
        done = step + 1
        if done % self.logging_steps == 0 or done == self.end:
            self._write_row(done, outcome.skipped, sums, lr)

    def _write_row(self, done: int, skipped_step: bool, sums: Any, lr: float) -> None:
        now = time.perf_counter()
        row = {
            "step": done,
            "loss": self.last_loss,
            "kl": float(sums[1]) if not skipped_step else None,
            "lm": float(sums[2]) if not skipped_step else None,
            "lr": lr,
            "skipped_steps": self.skipped,
            "tokens_per_s": self._tokens / max(now - self._t_last, 1e-9),
        }
        self._t_last, self._tokens = now, 0
        self.rows.append(row)
        loss = self.last_loss
        self.bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "nan")
        if self.main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.bar.close()
