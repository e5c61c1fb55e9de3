"""How far apart DWA, SRe2L and the random real subset are on the digits demo, seed to seed.

  python benchmarks/demo_spread.py [--seeds 0,1,2,3,4] [--workdir workdir/demo_spread]

Runs the README's demo (`configs/demo_digits.py`, through `dwa_jax.main.run_stages`) once per
`config.seed`: the seed draws the teacher, the synthesis and the random real subset; each run
validates every set with the config's 3 student seeds. Per method it reports the best top-1
(mean over the 3 students) of every run, the mean and spread over runs, and the paired
difference DWA - SRe2L per run. The difference counts as resolved when the mean paired
difference is more than twice its standard error over the runs (decided before the runs).
Writes `benchmarks/results/demo_spread.json`.
"""

import argparse
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--workdir", default="workdir/demo_spread")
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/demo_spread.json"))
  args = parser.parse_args(argv)
  from dwa_jax import files, main as entry, presets, provenance  # pylint: disable=g-import-not-at-top
  seeds = [int(s) for s in args.seeds.split(",")]
  record = provenance.record()
  runs = {}
  for seed in seeds:
    config = presets.demo_digits()
    config.seed = seed
    out = entry.run_stages(config, f"{args.workdir}/seed_{seed}")
    runs[seed] = {name: {"best": [r["best"] for r in s["runs"]], "best_mean": s["best_mean"],
                         "final_mean": s["final_mean"]}
                  for name, s in out["sets"].items()}
  names = list(runs[seeds[0]])
  summary = {}
  for name in names:
    best = np.array([runs[s][name]["best_mean"] for s in seeds])
    summary[name] = {"best_mean": float(best.mean()), "best_std_over_runs": float(best.std(ddof=1)),
                     "best_min": float(best.min()), "best_max": float(best.max())}
  diff = np.array([runs[s]["dwa"]["best_mean"] - runs[s]["sre2l"]["best_mean"] for s in seeds])
  sem = float(diff.std(ddof=1) / np.sqrt(len(diff)))
  paired = {"per_run": diff.tolist(), "mean": float(diff.mean()), "std": float(diff.std(ddof=1)),
            "standard_error": sem, "dwa_ahead_in_runs": int((diff > 0).sum()),
            "resolved": bool(abs(diff.mean()) > 2 * sem)}
  result = {"provenance": record, "config": "configs/demo_digits.py", "seeds": seeds,
            "student_seeds_per_run": list(presets.demo_digits().relabel.seeds),
            "runs": {str(s): runs[s] for s in seeds}, "summary": summary,
            "dwa_minus_sre2l": paired}
  files.write_json(pathlib.Path(args.out), result)
  print("| images | best top-1 over runs (mean ± std) | min | max |")
  print("|---|---|---|---|")
  for name in names:
    s = summary[name]
    print(f"| {name} | {s['best_mean']:.2f} ± {s['best_std_over_runs']:.2f} | {s['best_min']:.2f} | "
          f"{s['best_max']:.2f} |")
  print(f"DWA - SRe2L per run: {', '.join(f'{d:+.2f}' for d in diff)}; mean {diff.mean():+.2f} "
        f"± {sem:.2f} (standard error); resolved: {paired['resolved']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
