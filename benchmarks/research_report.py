"""One budget report over the stored results of several sweeps on the same suite.

`rc evaluate --budgets ... --out-dir DIR` writes one result per (controller, budget) under `DIR/budgets/` and resumes
from them; a sweep only reuses results made under the same generation settings (`evaluate.generation_hash`). When a
controller is added later under other settings (say a new controller that needs `macro.thought_style=text`, which
the baselines never use because they never think), its sweep goes to its own directory, and this script puts every
stored result of the same suite into one report: `budgets.md` (the summary per budget, then the paired comparison
against the reference controller at each budget with CIs, MDE and Holm-corrected p-values) and the budget curves.

Usage:  python benchmarks/research_report.py --from benchmarks/results/research_smollm2 \
            --from benchmarks/results/research_smollm2_think --out benchmarks/results/research_smollm2_all [--reference greedy]
            [--set evaluate.test=permutation]
Nothing is generated or scored: it reads the stored results only (seconds).
"""
from __future__ import annotations
import argparse, sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--from', dest='dirs', action='append', required=True, help="a sweep's --out-dir (its budgets/ folder is read)")
    ap.add_argument('--out', required=True, help="where budgets.md and the curves go")
    ap.add_argument('--reference', default='greedy', help="the controller every other one is compared with")
    ap.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE',
                    help="config overrides for the statistics, e.g. evaluate.test=permutation")
    a = ap.parse_args(argv)
    from research_controller.config import load_config
    from research_controller.evaluate import SuiteResult, write_budget_report
    results, seen = [], {}
    for d in a.dirs:
        files = sorted((Path(d)/'budgets').glob('*tok.json'))
        if not files: print(f"error: {d}/budgets holds no stored results (*tok.json); give a sweep's --out-dir.", file=sys.stderr); return 2
        for f in files:
            r = SuiteResult.load(f)
            key = (r.label, r.token_budget)
            if key in seen: print(f"error: {r.label} at {r.token_budget} tokens is stored twice ({seen[key]} and {f}); keep one.", file=sys.stderr); return 2
            seen[key] = f; results.append(r)
    labels = list(dict.fromkeys(r.label for r in results))
    if a.reference not in labels: print(f"error: no results of the reference {a.reference!r}; stored: {labels}.", file=sys.stderr); return 2
    order = [a.reference] + [l for l in labels if l != a.reference]
    results.sort(key=lambda r: (r.token_budget, order.index(r.label)))
    from research_controller.config import ConfigError
    try: cfg = load_config(overrides=a.sets)
    except ConfigError as e: print(f"error: {e}", file=sys.stderr); return 2
    paths = write_budget_report(results, cfg, a.out)
    print(f"{len(results)} results ({len(labels)} controllers, budgets {sorted({r.token_budget for r in results})}) -> {paths['table']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
