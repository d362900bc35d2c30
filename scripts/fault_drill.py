#!/usr/bin/env python
"""Fault drill: kill afm-train at random moments, damage its files, run two at once —
and check that the run still ends with exactly the model of an uninterrupted run.

    python scripts/fault_drill.py                    # 12 faults on a small tiny run
    python scripts/fault_drill.py --faults 4 --seed 1
    python scripts/fault_drill.py --keep runs/drill  # keep the run directories

1. An uninterrupted reference run (``afm-train --model tiny`` with small settings,
   ``--config`` free) records when each phase starts: generation, training, final
   save, evaluation (its INFO log lines, time-stamped as they arrive).
2. The drilled run is started again and again in one output directory.  Each start
   carries one fault, drawn at random (``--seed``) and ordered by phase:

   * ``kill:<phase>`` — SIGKILL at a random moment of that phase (for ``checkpoint``:
     while a checkpoint directory is being written);
   * ``damage:checkpoint`` / ``damage:log`` / ``damage:orphans`` — after a kill,
     truncate the newest checkpoint's weights, append half a line to ``log.jsonl``,
     or leave temporary shard / checkpoint directories of a dead process;
   * ``concurrent`` — two copies started at once: one must refuse with one line
     (exit 2, "in use"), the other goes on (and is then killed in its phase).

   The last start runs to the end.
3. Prints ``faults injected / survived / data lost``: a fault survived when the start
   after it went on by itself (no traceback, no error, no manual step); data lost
   counts the artifacts of the drilled run that differ from the reference — every
   tensor of ``model.safetensors`` compared bitwise, the ``log.jsonl`` rows (timings
   aside), ``eval.json``, the summary's steps / skipped steps / final loss / table,
   and the synthetic data.

Exit status 0 when every fault was survived and nothing was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

#: A small run of the bundled tiny teacher: every phase takes a few seconds.
SMALL = (
    "--set", "data.num_tokens=6144",
    "--set", "data.seq_len=32",
    "--set", "data.sequences_per_shard=16",
    "--set", "data.batch_size=16",
    "--set", "train.max_steps=30",
    "--set", "train.per_device_batch_size=4",
    "--set", "train.save_steps=3",
    "--set", "train.save_total_limit=2",
    "--set", "train.logging_steps=1",
    "--set", "train.calibration_batches=2",
    "--set", "eval.seeds=2",
    "--set", "eval.n_per_kind=3",
    "--set", "eval.facts=false",
    "--set", "eval.calibration_batches=1",
    "--set", "num_threads=1",
)  # fmt: skip

TOTAL_STEPS, SAVE_STEPS = 30, 3  # as in SMALL
#: The steps after which training-phase faults strike: one before each checkpoint, so a
#: kill while writing a checkpoint lands at the step after and the next fault is later.
SLOTS = tuple(range(SAVE_STEPS - 1, TOTAL_STEPS - 1, SAVE_STEPS))

#: The INFO lines that open each phase (afm.training.run logs them).
MARKERS = {
    "generation": "sampling synthetic data into",
    "training": "distilling the teacher",
    "final-save": "saving the analog model to",
    "evaluation": "evaluating teacher and student",
}
PHASES = ("generation", "training", "checkpoint", "final-save", "evaluation")
DAMAGES = ("damage:checkpoint", "damage:log", "damage:orphans")
KINDS = (*(f"kill:{p}" for p in PHASES), *DAMAGES, "concurrent")


@dataclass
class Start:
    """One afm-train process: its stderr lines, time-stamped as they arrive."""

    proc: subprocess.Popen
    t0: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    events: dict[str, threading.Event] = field(default_factory=dict)
    stdout: str = ""
    readers: list[threading.Thread] = field(default_factory=list)
    writing: str = ""
    """The checkpoint directory being written when a ``kill:checkpoint`` was sent."""

    def seen(self, phase: str) -> threading.Event:
        return self.events.setdefault(phase, threading.Event())

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _launch(out: Path, model: str) -> Start:
    cmd = [sys.executable, "-m", "afm.cli.train", "--model", model, "--output", str(out), *SMALL]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    env.pop("AFM_DEBUG", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = Start(proc, time.monotonic())

    def read_stderr() -> None:
        for line in proc.stderr:
            start.lines.append((time.monotonic() - start.t0, line.rstrip("\n")))
            for phase, marker in MARKERS.items():
                if marker in line:
                    start.seen(phase).set()

    def read_stdout() -> None:
        start.stdout = proc.stdout.read()

    start.readers = [threading.Thread(target=fn, daemon=True) for fn in (read_stderr, read_stdout)]
    for reader in start.readers:
        reader.start()
    return start


def _wait(start: Start, timeout: float = 900) -> int:
    rc = start.proc.wait(timeout=timeout)
    for reader in start.readers:  # until the pipes are drained
        reader.join(timeout=30)
    return rc


def _phase_times(start: Start) -> dict[str, float]:
    """When each phase began (seconds after the start), from the INFO lines."""
    times = {}
    for t, line in start.lines:
        for phase, marker in MARKERS.items():
            if marker in line and phase not in times:
                times[phase] = t
    return times


def _durations(times: dict[str, float], total: float) -> dict[str, float]:
    order = [p for p in MARKERS if p in times]
    ends = {p: times[q] for p, q in zip(order, order[1:], strict=False)}
    ends[order[-1]] = total
    return {p: max(0.05, ends[p] - times[p]) for p in order}


def _last_step(out: Path) -> int:
    """The step of the last complete row of ``log.jsonl`` (0: none)."""
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _until(start: Start, ready) -> bool:  # noqa: ANN001
    """Wait until ``ready()``; False if the process ended first."""
    while not ready():
        if start.proc.poll() is not None:
            return False
        time.sleep(0.002)
    return True


def _writing_checkpoint(out: Path) -> str:
    ckpts = out / "checkpoints"
    names = [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")] if ckpts.is_dir() else []
    return names[0] if names else ""


def _kill_in_phase(start: Start, phase: str, target: int, durations: dict[str, float],
                   rng: random.Random, out: Path) -> bool:  # fmt: skip
    """SIGKILL ``start`` at a random moment of ``phase`` — for training, during the step
    after ``target`` (for ``checkpoint``, while the next checkpoint is written); False if
    the process ended first."""
    if not _until(start, start.seen("training" if phase == "checkpoint" else phase).is_set):
        return False
    if phase in ("training", "checkpoint"):
        time.sleep(0.2)  # the resumed run cuts log.jsonl back first (rows of older starts)
        if not _until(start, lambda: _last_step(out) >= target):
            return False
        if phase == "checkpoint":
            if not _until(start, lambda: bool(_writing_checkpoint(out))):
                return False
            start.writing = _writing_checkpoint(out)
            time.sleep(rng.uniform(0, 0.03))
        else:
            time.sleep(rng.uniform(0, 0.8 * durations["training"] / TOTAL_STEPS))
    else:
        time.sleep(rng.uniform(0, 0.9 * durations[phase]))
    if start.proc.poll() is not None:
        return False
    start.proc.send_signal(signal.SIGKILL)
    _wait(start)
    return True


def _damage(kind: str, out: Path, rng: random.Random) -> str:
    """Apply a damage fault; returns what was done (empty: nothing to damage yet)."""
    ckpts = (
        sorted((out / "checkpoints").glob("checkpoint-*")) if (out / "checkpoints").is_dir() else []
    )
    if kind == "damage:checkpoint":
        if not ckpts:
            return ""
        weights = ckpts[-1] / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: rng.randrange(1, weights.stat().st_size)])
        return f"truncated {weights.relative_to(out)}"
    if kind == "damage:log":
        if not (out / "log.jsonl").exists():
            return ""
        with open(out / "log.jsonl", "a") as f:
            f.write('{"step": 99999, "loss": 0.1')
        return "half a line appended to log.jsonl"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    made = []
    for d in (
        out / "data" / f".shard-00000.tmp-{dead}",
        out / "checkpoints" / ".checkpoint-0000001.tmp",
    ):
        d.mkdir(parents=True, exist_ok=True)
        (d / "half-written").write_bytes(b"\0" * 100)
        made.append(str(d.relative_to(out)))
    return "left " + ", ".join(made)


def _clean_refusal(start: Start, rc: int) -> bool:
    errors = [ln for _, ln in start.lines if ln.startswith("afm-train: error: ")]
    return (
        rc == 2 and len(errors) == 1 and "in use" in errors[0] and "Traceback" not in start.stderr
    )


def _went_on(start: Start, rc: int | None) -> bool:
    """The start after a fault went on by itself: killed by us, or finished, no error."""
    text = start.stderr
    return rc in (0, -signal.SIGKILL) and "Traceback" not in text and "afm-train: error" not in text


def _in_training(kind: str) -> bool:
    return kind not in ("kill:generation", "kill:final-save", "kill:evaluation")


def _plan(n: int, rng: random.Random) -> list[tuple[str, int]]:
    """``n`` faults ``(kind, target step)``, every kind once when ``n`` allows, ordered by
    the phase they hit; training-phase faults get increasing steps (:data:`SLOTS`)."""
    kinds = list(KINDS) if n >= len(KINDS) else rng.sample(KINDS, n)
    kinds += [
        rng.choice([f"kill:{p}" for p in PHASES] + list(DAMAGES)) for _ in range(n - len(kinds))
    ]
    rank = {"kill:generation": 0, "kill:final-save": 8, "kill:evaluation": 9}
    kinds.sort(key=lambda k: (rank.get(k, 5), rng.random()))
    training = [k for k in kinds if _in_training(k)][: len(SLOTS)]
    if len(training) > 1 and training[0] == "damage:checkpoint":  # none exists yet
        training[0], training[1] = training[1], training[0]
    targets = iter(sorted(rng.sample(SLOTS, len(training))))
    others = [k for k in kinds if not _in_training(k)]
    return (
        [(k, 0) for k in others if k == "kill:generation"]
        + [(k, next(targets)) for k in training]
        + [(k, 0) for k in others if k != "kill:generation"]
    )


# --------------------------------------------------------------------------- comparing
def _rows(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def _summary(out: Path) -> dict[str, Any]:
    s = json.loads((out / "train_summary.json").read_text())
    return {k: s.get(k) for k in ("steps", "skipped_steps", "final_loss", "table")}


def _data(out: Path) -> list[list[int]]:
    from afm.training.shards import load_synthetic_data

    return load_synthetic_data(out / "data")["input_ids"]


def compare(ref: Path, run: Path) -> list[str]:
    """What differs between the two run directories (empty: nothing lost)."""
    import torch

    lost = []
    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b or not torch.equal(a[name], b[name]):
            lost.append(f"model tensor {name}")
    checks = (
        ("log.jsonl rows", _rows),
        ("eval.json", lambda o: json.loads((o / "eval.json").read_text())),
        ("train_summary.json", _summary),
        ("synthetic data", _data),
    )
    for what, read in checks:
        if read(ref) != read(run):
            lost.append(what)
    return lost


# --------------------------------------------------------------------------- the drill
@dataclass
class Fault:
    kind: str
    target: int = 0
    """The step after which a training-phase fault strikes."""
    injected: bool = False
    what: str = ""
    own_check: bool = True
    """The fault's own condition (``concurrent``: the second copy refused cleanly)."""
    survived: bool = False


def _landed(start: Start) -> str:
    """The phase a killed start was in (the last phase line it printed)."""
    seen = [p for p in MARKERS if start.seen(p).is_set()]
    where = seen[-1] if seen else "start-up"
    return f"{where}, writing {start.writing}" if start.writing else where


def _start_with_fault(fault: Fault, out: Path, model: str, durations: dict[str, float],
                      rng: random.Random) -> bool:  # fmt: skip
    """Run one start carrying ``fault`` (filled in); returns whether that start went on
    by itself until it was killed or ended (the verdict on the previous fault)."""
    if fault.kind == "concurrent":
        first, second = _launch(out, model), _launch(out, model)
        while first.proc.poll() is None and second.proc.poll() is None:
            time.sleep(0.05)
        loser, winner = (first, second) if first.proc.poll() is not None else (second, first)
        rc_loser = _wait(loser)
        refused = _clean_refusal(loser, rc_loser)
        fault.own_check = refused or (rc_loser == 0 and "nothing to do" in loser.stdout)
        killed = _kill_in_phase(winner, "training", fault.target, durations, rng, out)
        rc = -signal.SIGKILL if killed else winner.proc.returncode
        fault.injected = True
        fault.what = (
            f"second copy exit {rc_loser} ({'refused: in use' if refused else 'not refused'}); "
            f"first {'killed in ' + _landed(winner) if killed else f'ended (exit {rc})'}"
        )
        return _went_on(winner, rc) and _went_on_or_refused(loser, rc_loser)
    start = _launch(out, model)
    phase = fault.kind.split(":", 1)[1] if fault.kind.startswith("kill:") else "training"
    killed = _kill_in_phase(start, phase, fault.target, durations, rng, out)
    rc = -signal.SIGKILL if killed else start.proc.returncode
    if not killed:
        fault.what = f"the start ended before the moment came (exit {rc})"
    elif fault.kind.startswith("damage:"):
        done = _damage(fault.kind, out, rng)
        fault.injected = bool(done)
        fault.what = f"killed in {_landed(start)}, then {done}" if done else "nothing to damage"
    else:
        fault.injected, fault.what = True, f"killed in {_landed(start)}"
    return _went_on(start, rc)


def _went_on_or_refused(start: Start, rc: int) -> bool:
    return _went_on(start, rc) or _clean_refusal(start, rc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=12, help="faults to inject")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="tiny", help="teacher (the bundled tiny one)")
    parser.add_argument("--keep", type=Path, help="keep the run directories here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.keep or Path(tempfile.mkdtemp(prefix="afm-fault-drill-"))
    ref, run = work / "reference", work / "drilled"
    for d in (ref, run):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.monotonic()
    reference = _launch(ref, args.model)
    if _wait(reference) != 0:
        print(reference.stderr[-3000:], file=sys.stderr)
        raise SystemExit("fault_drill: the reference run failed")
    durations = _durations(_phase_times(reference), time.monotonic() - reference.t0)
    phases = ", ".join(f"{p} {d:.1f} s" for p, d in durations.items())
    print(f"reference run: {time.monotonic() - t0:.1f} s ({phases})")
    faults = [Fault(kind, target) for kind, target in _plan(args.faults, rng)]
    last: Fault | None = None
    for i, fault in enumerate(faults, 1):
        went_on = _start_with_fault(fault, run, args.model, durations, rng)
        if last is not None:  # this start is the one after the last injected fault
            last.survived = last.own_check and went_on
        if fault.injected:
            last = fault
        step = f"after step {fault.target:2d}" if fault.target else " " * 13
        print(f"fault {i:2d} {fault.kind:<18} {step}  {fault.what}", flush=True)
    final = _launch(run, args.model)
    rc = _wait(final)
    completed = (
        rc == 0 and "Traceback" not in final.stderr and (run / "train_summary.json").exists()
    )
    if last is not None:
        last.survived = last.own_check and completed
    if completed:
        resumed = json.loads((run / "train_summary.json").read_text()).get("resumed_from")
        how = f"resumed from step {resumed}" if resumed else "trained from step 0"
        how = "nothing left to do" if "nothing to do" in final.stdout else how
        print(f"final start: exit 0 ({how})")
    else:
        print(f"final start: exit {rc}: {final.stderr[-800:]}")
    lost = compare(ref, run) if completed else ["the run did not complete"]
    for item in lost:
        print(f"  differs from the uninterrupted run: {item}")
    tensors = len(load_file(ref / "model.safetensors"))
    verdict = "bitwise equal" if not lost else "DIFFERENT"
    print(f"final model vs the uninterrupted run: {verdict} ({tensors} tensors compared)")
    injected = [f for f in faults if f.injected]
    survived = sum(f.survived for f in injected)
    print(f"faults injected {len(injected)} / survived {survived} / data lost {len(lost)}")
    where = f"; run directories in {work}" if args.keep else ""
    print(f"({time.monotonic() - t0:.0f} s{where})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if survived == len(injected) and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
