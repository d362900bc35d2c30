"""What a distillation run reports while it trains: a progress bar on a TTY or a log
line every ``logging_steps`` off one (``progress``: ``auto`` / ``bar`` / ``log`` /
``none``), ``log.jsonl``, and the ``train.report_to`` trackers (accelerate's).

A resumed run first cuts ``log.jsonl`` back to the rows of the steps its checkpoint
holds (rows written after it, and a line half-written by a killed run, are dropped), so
the log of a run killed and resumed any number of times equals the log of one
uninterrupted run (timings aside).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from afm.training.files import write_text_atomic
from afm.training.step import SKIP_REASONS, StepOutcome

__all__ = ["PROGRESS_MODES", "TrainLog", "cut_log", "resolve_progress"]

PROGRESS_MODES = ("auto", "bar", "log", "none")


def resolve_progress(progress: bool | str) -> str:
    """``"bar"``, ``"log"`` or ``"none"``: ``auto`` (or True) is a bar on a TTY and log
    lines elsewhere (nohup, Slurm, CI); False is ``none``."""
    if progress is True:
        progress = "auto"
    elif progress is False:
        progress = "none"
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress={progress!r} is invalid: must be one of {PROGRESS_MODES}")
    if progress == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return progress


logger = logging.getLogger(__name__)


def cut_log(path: Path, last_step: int) -> None:
    """Keep the rows of ``path`` up to step ``last_step`` (stops at a damaged line)."""
    if not path.exists():
        return
    keep = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("%s: line %d is damaged; dropping it and what follows", path, number)
            break
        if step <= last_step:
            keep.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in keep))


class TrainLog:
    """Counts skipped steps (in total and in a row), keeps the last applied step's loss,
    writes a row every ``logging_steps`` (and at the end) to ``log.jsonl`` on the main
    process.  ``skipped``, ``consecutive`` and ``last_loss`` continue a resumed run's."""

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
        progress: bool | str,
        accelerator: Any = None,
        consecutive: int = 0,
        last_loss: float | None = None,
        max_consecutive: int = 20,
    ) -> None:
        from tqdm.auto import tqdm

        self.path = out / "log.jsonl"
        self.out, self.start, self.end, self.logging_steps = out, start, end, logging_steps
        self.main_process = main_process
        self.mode = resolve_progress(progress) if main_process else "none"
        self.trackers = accelerator if accelerator is not None and accelerator.trackers else None
        self.skipped = skipped
        self.consecutive, self.max_consecutive = consecutive, max_consecutive
        self.last_loss = last_loss
        self.last_reason: str | None = None
        if main_process:
            cut_log(self.path, start)
        self.rows: list[dict[str, Any]] = []
        self._t0 = self._t_last = time.perf_counter()
        self._tokens = 0
        self.bar = tqdm(
            total=total,
            initial=start,
            desc="distilling",
            unit="step",
            disable=self.mode != "bar",
        )

    def record(self, step: int, outcome: StepOutcome, lr: float, accelerator: Any) -> None:
        """Account for step ``step`` (0-based) after the scheduler stepped; a row is
        written every ``logging_steps``, at the end, and when ``max_consecutive`` steps in
        a row were skipped (the trainer stops there)."""
        self._tokens += outcome.tokens
        sums = outcome.sums
        if outcome.skipped:
            self.skipped += 1
            self.consecutive += 1
            self.last_reason = outcome.reason
            logger.warning(
                "step %d: %s, update skipped (%d so far, %d in a row)",
                step + 1,
                SKIP_REASONS.get(outcome.reason or "", "non-finite values"),
                self.skipped,
                self.consecutive,
            )
        else:
            self.consecutive = 0
            if accelerator.num_processes > 1:
                sums = accelerator.reduce(sums, reduction="mean")
            self.last_loss = float(sums[0])
        self.bar.update(1)
        done = step + 1
        if done % self.logging_steps == 0 or done == self.end or self.must_stop:
            self._write_row(done, outcome.skipped, sums, lr)

    @property
    def must_stop(self) -> bool:
        return self.consecutive >= self.max_consecutive

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
        if self.mode == "log":
            self._log_line(row, now)
        if self.trackers is not None:
            scalars = {f"train/{k}": v for k, v in row.items() if k != "step" and v is not None}
            self.trackers.log(scalars, step=done)
        if self.main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _log_line(self, row: dict[str, Any], now: float) -> None:
        done = row["step"]
        per_step = (now - self._t0) / max(done - self.start, 1)
        eta = datetime.timedelta(seconds=round(per_step * (self.end - done)))
        loss = "nan" if row["loss"] is None else f"{row['loss']:.4f}"
        logger.info(
            "step %d/%d  loss %s  lr %.3g  %.0f tokens/s  ETA %s",
            done,
            self.end,
            loss,
            row["lr"],
            row["tokens_per_s"],
            eta,
        )

    def close(self) -> None:
        self.bar.close()
