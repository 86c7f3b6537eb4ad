"""The case index as a prior at the MCTS root: the MCTS controller with and without `cases.prior_weight`, paired.

Steps (each skipped when its output is already in --runs, so a stopped run resumes):
  1. `rc selfplay` on SQuAD train items (--episodes, seed 7) into <runs>/selfplay/buffer;
  2. a network trained on that buffer (`train` defaults) -> <runs>/ck/final.pt, and the case index built from the
     same buffer -> <runs>/cases (the index `rc cycle` would rebuild);
  3. the MCTS controller (`controllers.MCTSController`, which has no `rc` name, so the evaluate API is used) on the
     first --items SQuAD items of the research suite (eval split, judge off), once with cases.prior_weight=0 and once
     with --weight, on the same seeds; the paired comparison (bootstrap CI, Wilcoxon with Holm) as the gate does it.

Usage:  python benchmarks/case_prior.py [--runs runs/case_prior] [--episodes 24] [--items 40] [--budget 64]
        [--weight 0.5] [--decisions 1] [--min-similarity 0.3|null]
Writes <runs>/case_prior_<settings>.json (both results' means, the comparison, the changed answers) and prints a table.
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, time
from collections import Counter
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--runs', default='runs/case_prior', help='working directory (buffer, checkpoint, case index, results)')
    ap.add_argument('--episodes', type=int, default=24, help='self-play episodes on SQuAD train items')
    ap.add_argument('--items', type=int, default=40, help='research-suite SQuAD items evaluated')
    ap.add_argument('--budget', type=int, default=64, help='tokens per item (search included)')
    ap.add_argument('--weight', type=float, default=0.5, help='cases.prior_weight of the arm with the prior')
    ap.add_argument('--decisions', type=int, default=1, help='cases.prior_decisions')
    ap.add_argument('--min-similarity', default='0.3', help="cases.min_similarity, or 'null' for no threshold")
    ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from research_controller.config import atomic_write_json, load_config, replace_config, run_path
    from research_controller.cases import CaseIndex, default_embedder
    from research_controller.controllers import MCTSController
    from research_controller.engine import get_engine
    from research_controller.evaluate import Suite, SuiteResult, build_suite, compare, evaluate_controllers
    from research_controller.network import load_checkpoint
    from research_controller.train import train
    runs = Path(a.runs).resolve(); runs.mkdir(parents=True, exist_ok=True)
    minsim = None if a.min_similarity == 'null' else float(a.min_similarity)
    sets = [f'paths.runs_dir={runs}', f'slm.threads={a.threads}', 'rewards.w_coherence=0', f'evaluate.token_budget={a.budget}']
    base = load_config(overrides=sets)
    buf, ck = runs/'selfplay'/'buffer', runs/'ck'/'final.pt'
    if not buf.exists():
        rc = str(Path(sys.executable).with_name('rc'))
        subprocess.run([rc, 'selfplay', '--episodes', str(a.episodes), '--no-progress', '--set', f'paths.runs_dir={runs}',
                        '--set', f'slm.threads={a.threads}', '--set', 'selfplay.tasks=[squad]', '--set', 'selfplay.seed=7'], check=True)
    if not ck.exists():
        train(base, buffer_path=str(buf), out_dir=str(ck.parent), progress=False, resume=False)
    idx_path = run_path(base, base.cases.path)
    if not idx_path.exists(): CaseIndex(default_embedder(base), idx_path).build(str(buf))
    full = build_suite(base, 'research')
    items = [it for it in full.items if it['task'] == 'squad'][:a.items]
    suite = Suite(f'research-squad{a.items}', items, seed=full.seed, token_budget=a.budget, created_from=full.created_from)
    net, info = load_checkpoint(str(ck))
    eng = get_engine(base)
    tag = f"w{a.weight:g}_d{a.decisions}_b{a.budget}_n{a.items}_sim{a.min_similarity}"
    out, acts = {}, {}
    for w in (0.0, a.weight):
        cfg = replace_config(base, {'cases.prior_weight': w, 'cases.prior_decisions': a.decisions, 'cases.min_similarity': minsim})
        path = runs/(f"mcts_w0_b{a.budget}_n{a.items}.json" if w == 0 else f"mcts_{tag}.json")
        if path.exists(): res = SuiteResult.load(path)
        else:
            ctl = MCTSController(net, cfg, name=f'mcts_w{w:g}', slm_fingerprint=info['slm_fingerprint'])
            t = time.perf_counter()
            (res,) = evaluate_controllers(cfg, [ctl], suite=suite, progress=True, engine=eng)
            res.save(path)
            print(f"  cases.prior_weight={w:g}: {time.perf_counter() - t:.0f} s", flush=True)
        out[w] = res
        acts[w] = dict(sum((Counter(r.actions) for r in res.records), Counter()))
    c = compare(out[0.0], out[a.weight], base.evaluate, metrics=['task', 'f1', 'reward'])
    changed = sum(x.text != y.text for x, y in zip(out[0.0].records, out[a.weight].records))
    print(c.table())
    print(f"answers changed by the prior: {changed}/{len(items)}; actions without {acts[0.0]}, with {acts[a.weight]}")
    res = dict(benchmark='case_prior', settings=vars(a), items=len(items), suite_hash=full.hash if hasattr(full, 'hash') else None,
               task_without=out[0.0].mean('task'), task_with=out[a.weight].mean('task'), f1_without=out[0.0].mean('f1'),
               f1_with=out[a.weight].mean('f1'), answers_changed=changed, actions_without=acts[0.0], actions_with=acts[a.weight],
               comparison=c.table())
    print(f"wrote {atomic_write_json(runs/f'case_prior_{tag}.json', res)}")
    return res


if __name__ == '__main__':
    main()
