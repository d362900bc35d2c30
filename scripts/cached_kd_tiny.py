"""Live KD vs cached sparse teacher targets on the tiny main job, in one scripted batch.

One shared corpus with both target forms; for each training seed, three students on
the main job's chip (tiny-stress): ``train.kd_targets`` = live, top_k, sampled.  Each is
evaluated under the chip's deployment noise (PCM ×3) with ``eval.seeds`` noise seeds.

    flock /tmp/afm-heavy.lock python scripts/cached_kd_tiny.py --out /tmp/cached-kd \\
        --steps 250 --seeds 0 1 2

Prints the table and writes ``<out>/results.json``.  (What the targets cost the
sampler: ``scripts/bench_generation.py``.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from afm.training.run import run_training
from afm.training.run_config import build_run_config

FORMS = ("live", "top_k", "sampled")


def student_scores(run_dir: Path) -> dict:
    ev = json.loads((run_dir / "eval.json").read_text())
    s = ev["student_analog"]
    return {k: s[k]["values"] for k in s if isinstance(s[k], dict) and "values" in s[k]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="/tmp/cached-kd")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results: dict = {"steps": args.steps, "seeds": args.seeds, "runs": []}
    data_dir = out / "data"
    common = [
        f"data_dir={data_dir}",
        "data.targets=both",
        f"train.max_steps={args.steps}",
        "train.save_steps=1000",
    ]
    for seed in args.seeds:
        for form in FORMS:
            run_dir = out / f"{form}-seed{seed}"
            sets = [*common, f"train.seed={seed}", f"train.kd_targets={form}"]
            cfg = build_run_config("tiny", str(run_dir), sets=sets)
            t0 = time.perf_counter()
            outcome = run_training(cfg, progress=False)
            scores = student_scores(run_dir)
            row = {
                "form": form,
                "seed": seed,
                "seconds": round(time.perf_counter() - t0, 1),
                "seconds_to_trained": outcome.summary.get("seconds_to_trained"),
                "final_loss": outcome.summary.get("final_loss"),
                **scores,
            }
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nstudent on tiny-stress under PCM x3, {args.steps} steps, mean ± std over "
          f"{len(args.seeds)} training seeds x noise seeds")  # fmt: skip
    for form in FORMS:
        runs = [r for r in results["runs"] if r["form"] == form]
        line = f"{form:<9}"
        for key in [k for k in runs[0] if k not in ("form", "seed", "seconds", "final_loss")]:
            if key == "seconds_to_trained":
                continue
            vals = [100 * v for r in runs for v in r[key]]
            per_seed = [100 * statistics.mean(r[key]) for r in runs]
            line += (
                f"  {key} {statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"
                f" (per training seed {', '.join(f'{v:.1f}' for v in per_seed)})"
            )
        secs = statistics.mean(r["seconds_to_trained"] for r in runs)
        print(f"{line}  train {secs:.0f} s")


if __name__ == "__main__":
    main()
