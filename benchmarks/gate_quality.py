"""How good is the think gate's judgement? Its score against the realised gain of thinking, on held-out items.

The think gate (`benchmarks/think_gate.py`, fitted on the train split) scores each prompt's root state; a score >= 0
means "thinking first answers better". Here the realised gain is read from two stored research-suite results on the
eval split: `think_answer` (always think) minus `greedy` (never think), the item's task score, at one budget. Printed,
per task and over all items: Spearman's rank correlation between the gate's score and the realised gain (bootstrap CI),
the AUC of the score for "thinking is better" among the items where the two arms differ, the share of items the gate
sends to think, and the gain the gate takes against the oracle's (the better arm on every item).

Nothing is generated: only one prefill per prompt to compute the root state vector (about a minute on 2 cores).

Usage:  python benchmarks/gate_quality.py [--think DIR/budgets/think_answer__64tok.json]
            [--greedy DIR/budgets/greedy__64tok.json] [--gate assets/think_gate_smollm2.json] [--out FILE.json]
"""
from __future__ import annotations
import argparse, os, sys
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import numpy as np


def auc(score:np.ndarray, pos:np.ndarray) -> float:
    "Area under the ROC curve of `score` for the boolean labels `pos` (ties count one half); NaN without both classes."
    p, n = score[pos], score[~pos]
    if len(p) == 0 or len(n) == 0: return float('nan')
    return float(((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (len(p) * len(n)))


def boot_ci(score:np.ndarray, d:np.ndarray, n:int=2000, seed:int=0) -> list:
    "95% percentile bootstrap CI of Spearman's rho of (score, d) over items."
    from research_controller.evaluate import spearman
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))
    boots = spearman(score[idx], d[idx])
    return [float(q) for q in np.nanquantile(boots, [0.025, 0.975])] if np.isfinite(boots).any() else [float('nan')] * 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--think', default='benchmarks/results/research_smollm2_think/budgets/think_answer__64tok.json')
    ap.add_argument('--greedy', default='benchmarks/results/research_smollm2/budgets/greedy__64tok.json')
    ap.add_argument('--gate', default='assets/think_gate_smollm2.json')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from research_controller.config import atomic_write_json, load_config
    from research_controller.controllers import GateError, ThinkGate, gate_inputs, load_think_gate
    from research_controller.engine import Engine
    from research_controller.evaluate import SuiteResult, build_suite, spearman
    from research_controller.slm import load_slm
    try:
        res = {k: SuiteResult.load(p) for k, p in (('think', a.think), ('greedy', a.greedy))}
        gate = load_think_gate(a.gate)
    except (OSError, ValueError, GateError) as e:
        print(f"error: {e}", file=sys.stderr); return 2
    if res['think'].suite_hash != res['greedy'].suite_hash or res['think'].token_budget != res['greedy'].token_budget:
        print("error: the two results are not on the same suite and budget "
              f"({res['think'].suite_hash[:12]}@{res['think'].token_budget} vs {res['greedy'].suite_hash[:12]}@{res['greedy'].token_budget}).", file=sys.stderr)
        return 2
    cfg = load_config()
    suite = build_suite(cfg, res['think'].suite)
    if suite.hash != res['think'].suite_hash:
        print(f"error: the stored results are on suite {res['think'].suite_hash[:12]}, the {res['think'].suite!r} suite built here is {suite.hash[:12]}.", file=sys.stderr)
        return 2
    model, tok = load_slm(cfg); eng = Engine(model, tok, cfg)
    tg = ThinkGate(cfg, gate); tg.check(eng)
    by_id = {k: {r.item_id: r for r in v.records} for k, v in res.items()}
    items = [it for it in suite.items if it['id'] in by_id['think'] and it['id'] in by_id['greedy']]
    X = np.concatenate([gate_inputs(eng, eng.new_states([it['prompt'] for it in items[i:i + 8]], res['think'].token_budget), tg.inputs)
                        for i in range(0, len(items), 8)])  # what the gate reads (its file names the inputs)
    z = (np.nan_to_num(X) - tg.mu) / tg.sd
    score = z @ tg.w + gate['b']
    d = np.array([by_id['think'][it['id']].value('task') - by_id['greedy'][it['id']].value('task') for it in items])
    tasks = np.array([it['task'] for it in items])
    out = {}
    print(f"gate {a.gate} ({gate.get('model', 'logistic')}, fitted on {gate.get('n')} train items) on {len(items)} eval items, "
          f"{res['think'].token_budget} tokens")
    print("task       n   rho [95% CI]              AUC (d != 0)     thinks on   gain taken / oracle")
    for t in [*sorted(set(tasks)), 'all']:
        m = np.ones(len(d), bool) if t == 'all' else tasks == t
        s, dd = score[m], d[m]; nz = dd != 0
        rho, ci = float(spearman(s, dd)), boot_ci(s, dd)
        au = auc(s[nz], dd[nz] > 0)
        took, oracle = float(np.where(s >= 0, dd, 0).mean()), float(np.maximum(dd, 0).mean())
        out[t] = dict(n=int(m.sum()), rho=rho, rho_ci=ci, auc=au, n_differ=int(nz.sum()), think_share=float((s >= 0).mean()),
                      gain=took, oracle_gain=oracle, always_gain=float(dd.mean()))
        print(f"{t:9} {m.sum():3}   {rho:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]   {au:.3f} ({nz.sum():3})    {(s >= 0).mean():6.0%}     "
              f"{took:+.4f} / {oracle:+.4f}")
    if a.out: atomic_write_json(a.out, dict(gate=a.gate, think=a.think, greedy=a.greedy, by_task=out)); print(f"wrote {a.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
