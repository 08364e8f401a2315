"""How often the regression gate false-alarms, and how often it catches a real regression, for one model.

Trains the model at ``--scale`` for seeds 0..N-1, twice: as it is, and with a planted regression given as
model options (default: jem with half its training SGLD steps). Then, for every pair of disjoint seed sets
of the workflow's size, it runs the gate (the same `bench.results.gate.compare` as `bench compare`, with the
suite's tolerances):

* false alarm: baseline seeds A vs candidate seeds B of the unchanged model, verdict not "pass";
* detection: baseline seeds A vs the planted model's seeds B, verdict "regression" (exit 1).

    python benchmarks/gate_power.py --model jem --scale tiny --seeds 8 --per-side 2 --plant sgld_steps=1

Timings are not the point: run it on any box. The records stay in --out for inspection.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from pathlib import Path

from bench.results import gate
from bench.results.records import load_records


def run(model: str, scale: str, seed: int, out: Path, opts: list[str], suite: str) -> None:
    if any(r["seed"] == seed for r in load_records(out, required=False)):
        return
    cmd = [sys.executable, "-m", "bench", "run", f"suite={suite}", f"model={model}", f"scale={scale}",
           f"seed={seed}", f"out={out}", *[f"opts.{o}" for o in opts]]
    # exit 1: the model failed (e.g. diverged) and its record says so: the gate counts that as a regression
    if subprocess.run(cmd).returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} could not run")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="jem")
    ap.add_argument("--suite", default="hybrid")
    ap.add_argument("--scale", default="tiny")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--per-side", type=int, default=2, help="seeds per side, as the workflow runs them")
    ap.add_argument("--plant", action="append", default=None, help="model option of the planted regression")
    ap.add_argument("--out", type=Path, default=Path("results/gate-power"))
    args = ap.parse_args()
    plant = args.plant or ["sgld_steps=1"]
    normal, planted = args.out / "normal", args.out / "planted"
    for s in range(args.seeds):
        run(args.model, args.scale, s, normal, [], args.suite)
        run(args.model, args.scale, s, planted, plant, args.suite)
    by_seed = {d: {r["seed"]: r for r in load_records(d)} for d in (normal, planted)}
    alarms = detections = pairs = 0
    missed = []
    for a in itertools.combinations(range(args.seeds), args.per_side):
        rest = [s for s in range(args.seeds) if s not in a]
        for b in itertools.combinations(rest, args.per_side):
            base = [by_seed[normal][s] for s in a]
            pairs += 1
            alarms += gate.compare(base, [by_seed[normal][s] for s in b]).exit_code != 0
            rep = gate.compare(base, [by_seed[planted][s] for s in b])
            if rep.exit_code == 1:
                detections += 1
            else:
                missed.append((a, b, rep.exit_code))
    print(f"{args.model} scale={args.scale}, {args.seeds} seeds, {args.per_side} per side, {pairs} disjoint pairs; "
          f"planted: {' '.join(plant)}")
    print(f"false alarms: {alarms}/{pairs} = {100 * alarms / pairs:.1f}%")
    print(f"detected:     {detections}/{pairs} = {100 * detections / pairs:.1f}%")
    for m in missed[:5]:
        print("  missed:", m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
