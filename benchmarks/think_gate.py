"""Fit the think gate (controller `think_gate`) from task outcomes on the train split, and write it to assets/.

For a seeded sample of train-split items of every task (in the research suite's proportions; never the eval split),
both arms are played at the same token budget, everything forwarded counted:
  answer directly  greedy
  think first      think_answer (a thought to the first sentence end, then the answer to a sentence end)
and `d` = task score of thinking minus that of answering. `train.fit_think_gate` fits a logistic model of the root
state vector (which carries the prompt's pooled hidden state) that thinks where `d > 0`, weighting items by |d|, with
the L2 penalty chosen by 5-fold cross-validation on the gain over never thinking. Printed: per task the mean `d`, the
cross-validated gain of the gate against always/never thinking and the oracle, and where the gate thinks.

Usage:  python benchmarks/think_gate.py [--squad 100 --wikitext 40 --nq 30 --gsm8k 20] [--seed 7] [--budget 64]
        [--threads 1] [--out assets/think_gate_smollm2.json] [--set key=value ...]
The fitted gate is evaluated on the eval split like any controller: rc evaluate --suite research --controller think_gate.
"""
from __future__ import annotations
import argparse, os, sys, time
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for t, n in (('squad', 100), ('wikitext', 40), ('nq', 30), ('gsm8k', 20)): ap.add_argument(f'--{t}', type=int, default=n)
    ap.add_argument('--seed', type=int, default=7)
    ap.add_argument('--budget', type=int, default=64)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default='assets/think_gate_smollm2.json')
    ap.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from tqdm.auto import tqdm
    from research_controller.config import atomic_write_json, load_config
    from research_controller.controllers import GreedyBaseline, ThinkThenAnswer
    from research_controller.engine import Engine
    from research_controller.rewards import TASK_METRIC, load_task_items, task_score
    from research_controller.slm import load_slm
    from research_controller.train import fit_think_gate
    cfg = load_config(overrides=a.sets)
    model, tok = load_slm(cfg); eng = Engine(model, tok, cfg)
    items = [it for t, n in (('squad', a.squad), ('wikitext', a.wikitext), ('nq_open', a.nq), ('gsm8k', a.gsm8k))
             for it in load_task_items(cfg, t, 'train', n=n, seed=a.seed)]
    t0 = time.time()
    X = np.concatenate([eng.features_batch(eng.new_states([it['prompt'] for it in items[i:i + a.batch]], a.budget))
                        for i in range(0, len(items), a.batch)])
    arms = {'answer': GreedyBaseline(cfg), 'think': ThinkThenAnswer(cfg)}
    score, toks = {}, {}
    with tqdm(total=len(items) * len(arms), desc='both arms', unit='item') as bar:
        for k, ctl in arms.items():
            s, n = [], []
            for i in range(0, len(items), a.batch):
                its = items[i:i + a.batch]
                for it, r in zip(its, ctl.generate_batch(eng, [it['prompt'] for it in its], a.budget, seeds=0, items=its)):
                    s.append(task_score(it, r.text)[TASK_METRIC[it['task']]]); n.append(r.tokens)
                bar.update(len(its))
            score[k], toks[k] = np.array(s), np.array(n)
    d = score['think'] - score['answer']
    gate = fit_think_gate(X, d, seed=a.seed)
    tasks = np.array([it['task'] for it in items])
    z = (np.nan_to_num(X) - np.array(gate['mu'])) / np.array(gate['sd'])
    think = z @ np.array(gate['w']) + gate['b'] >= 0
    gate.update(slm_fingerprint=eng.fingerprint, feature_dim=eng.feature_dim, thought_style=cfg.macro.thought_style,
                thought_open_text=cfg.macro.thought_open_text, thought_close_text=cfg.macro.thought_close_text, budget=a.budget,
                split='train', seed=a.seed, tasks={t: int((tasks == t).sum()) for t in sorted(set(tasks))},
                per_task={t: dict(mean_d=float(d[tasks == t].mean()), think_share=float(think[tasks == t].mean()),
                                  answer=float(score['answer'][tasks == t].mean()), think=float(score['think'][tasks == t].mean()))
                          for t in sorted(set(tasks))},
                tokens=dict(answer=float(toks['answer'].mean()), think=float(toks['think'].mean())), seconds=round(time.time() - t0, 1))
    print(f"{len(items)} train-split items, {a.budget} tokens per item, {time.time() - t0:.0f} s")
    print("task       n   answer   think   mean d   gate thinks on")
    for t, v in gate['per_task'].items():
        print(f"{t:9} {gate['tasks'][t]:3}   {v['answer']:.3f}   {v['think']:.3f}   {v['mean_d']:+.3f}   {v['think_share']:.0%}")
    print(f"gain over always answering: always think {gate['always_think_gain']:+.4f}, oracle {gate['oracle_gain']:+.4f}, "
          f"gate (5-fold CV, lam={gate['lam']}) {gate['cv_gain'][gate['lam']]:+.4f}; CV by lam: "
          + ', '.join(f"{l}: {g:+.4f}" for l, g in gate['cv_gain'].items()))
    gate['cv_gain'] = {str(k): v for k, v in gate['cv_gain'].items()}
    atomic_write_json(a.out, gate)
    print(f"wrote {a.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
