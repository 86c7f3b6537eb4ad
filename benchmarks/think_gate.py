"""Fit the think gate (controller `think_gate`) from task outcomes on the train split, and write it to assets/.

For a seeded sample of train-split items of every task (in the research suite's proportions; never the eval split),
both arms are played at the same token budget, everything forwarded counted:
  answer directly  greedy
  think first      think_answer (a thought to the first sentence end, then the answer to a sentence end)
and `d` = task score of thinking minus that of answering. `train.fit_think_gate` fits a linear gate on what `--inputs`
names (`controllers.gate_inputs`; default: the root state vector, which carries the prompt's pooled hidden state, and
MiniLM embeddings of the prompt's first and last 200 characters, which carry the kind of request): a logistic model that thinks where `d > 0` (items weighted by
|d|) or a ridge regression of `d`, the kind and its L2 penalty chosen by 5-fold cross-validation on the gain over never
thinking. Printed: per task the mean `d`, the
cross-validated gain of the gate against always/never thinking and the oracle, and where the gate thinks.

Every played batch is appended to the outcomes file (`--outcomes`, JSON: per arm, the generation settings it depends on
and each item's task score and tokens; greedy's outcomes stay valid when only the thought settings change), so a killed
run resumes where it stopped and a refit (`--refit`) reads the
stored outcomes and only recomputes the root state vectors (one prefill per prompt, no generation).

Usage:  python benchmarks/think_gate.py [--squad 100 --wikitext 40 --nq 30 --gsm8k 20] [--seed 7] [--budget 64]
        [--threads 1] [--out assets/think_gate_smollm2.json] [--outcomes FILE] [--refit] [--inputs state,prompt_head,prompt_tail]
        [--set key=value ...]
The fitted gate is evaluated on the eval split like any controller: rc evaluate --suite research --controller think_gate.
"""
from __future__ import annotations
import argparse, json, os, sys, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import numpy as np
import torch


def uid(it:dict) -> str:
    "An item's key in the outcomes file."
    return f"{it['task']}:{it['id']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for t, n in (('squad', 100), ('wikitext', 40), ('nq', 30), ('gsm8k', 20)): ap.add_argument(f'--{t}', type=int, default=n)
    ap.add_argument('--seed', type=int, default=7)
    ap.add_argument('--budget', type=int, default=64)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default='assets/think_gate_smollm2.json')
    ap.add_argument('--outcomes', default=None, help="where played outcomes are stored and resumed from "
                    "(default: benchmarks/results/think_gate_outcomes_seed<seed>.json)")
    ap.add_argument('--refit', action='store_true', help="fit from stored outcomes only; refuse to generate")
    ap.add_argument('--inputs', default='state,prompt_head,prompt_tail', help="what the gate reads, comma-separated (controllers.GATE_INPUTS)")
    ap.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from tqdm.auto import tqdm
    from research_controller.config import atomic_write_json, load_config
    from research_controller.controllers import GATE_INPUTS, PROMPT_END_CHARS, GreedyBaseline, ThinkThenAnswer, gate_inputs
    from research_controller.engine import Engine
    from research_controller.rewards import TASK_METRIC, load_task_items, task_score
    from research_controller.slm import load_slm
    from research_controller.train import fit_think_gate
    cfg = load_config(overrides=a.sets)
    model, tok = load_slm(cfg); eng = Engine(model, tok, cfg)
    items = [it for t, n in (('squad', a.squad), ('wikitext', a.wikitext), ('nq_open', a.nq), ('gsm8k', a.gsm8k))
             for it in load_task_items(cfg, t, 'train', n=n, seed=a.seed)]
    t0 = time.time()
    inputs = [x.strip() for x in a.inputs.split(',') if x.strip()]
    if not inputs or any(x not in GATE_INPUTS for x in inputs):
        print(f"error: --inputs {a.inputs!r}: name one or more of {', '.join(GATE_INPUTS)}.", file=sys.stderr); return 2
    X = np.concatenate([gate_inputs(eng, eng.new_states([it['prompt'] for it in items[i:i + a.batch]], a.budget), inputs)
                        for i in range(0, len(items), a.batch)])
    arms = {'answer': GreedyBaseline(cfg), 'think': ThinkThenAnswer(cfg)}
    out_path = Path(a.outcomes or f'benchmarks/results/think_gate_outcomes_seed{a.seed}.json')
    keys = {'answer': json.dumps(dict(slm=eng.fingerprint, budget=a.budget), sort_keys=True),  # greedy never thinks
            'think': json.dumps(dict(slm=eng.fingerprint, budget=a.budget, thought_style=cfg.macro.thought_style,
                                     open=cfg.macro.thought_open_text, close=cfg.macro.thought_close_text,
                                     answer_after_thought=cfg.macro.answer_after_thought), sort_keys=True)}
    store = json.loads(out_path.read_text()) if out_path.exists() else {}
    if store and 'arms' not in store:
        print(f"error: {out_path} is not an outcomes file of this script (no 'arms'); give another --outcomes file.", file=sys.stderr); return 2
    arms_store = store.setdefault('arms', {})
    for k in arms:
        got = arms_store.setdefault(k, {'key': keys[k], 'items': {}})
        if got['key'] != keys[k]:
            print(f"error: {out_path} holds {k!r} outcomes played under other settings ({got['key']}; now {keys[k]}); "
                  f"give another --outcomes file or delete that arm from it.", file=sys.stderr); return 2
    done = {k: arms_store[k]['items'] for k in arms}
    todo = [it for it in items if any(uid(it) not in done[k] for k in arms)]
    if todo and a.refit:
        print(f"error: --refit, but {len(todo)} of {len(items)} items lack a stored outcome in {out_path}; "
              f"run without --refit to play them.", file=sys.stderr); return 2
    with tqdm(total=sum(uid(it) not in done[k] for it in items for k in arms), desc='both arms', unit='item') as bar:
        for k, ctl in arms.items():
            rest = [it for it in items if uid(it) not in done[k]]
            for i in range(0, len(rest), a.batch):
                its = rest[i:i + a.batch]
                for it, r in zip(its, ctl.generate_batch(eng, [it['prompt'] for it in its], a.budget, seeds=0, items=its)):
                    done[k][uid(it)] = dict(task=it['task'], score=task_score(it, r.text)[TASK_METRIC[it['task']]], tokens=r.tokens)
                atomic_write_json(out_path, store); bar.update(len(its))
    score = {k: np.array([done[k][uid(it)]['score'] for it in items]) for k in arms}
    toks = {k: np.array([done[k][uid(it)]['tokens'] for it in items]) for k in arms}
    d = score['think'] - score['answer']
    try: gate = fit_think_gate(X, d, seed=a.seed)
    except ValueError as e: print(f"error: {e} Fix: play more items (--squad, --wikitext, ...).", file=sys.stderr); return 2
    tasks = np.array([it['task'] for it in items])
    z = (np.nan_to_num(X) - np.array(gate['mu'])) / np.array(gate['sd'])
    think = z @ np.array(gate['w']) + gate['b'] >= 0
    gate.update(slm_fingerprint=eng.fingerprint, feature_dim=eng.feature_dim, inputs=inputs, prompt_end_chars=PROMPT_END_CHARS, thought_style=cfg.macro.thought_style,
                thought_open_text=cfg.macro.thought_open_text, thought_close_text=cfg.macro.thought_close_text,
                answer_after_thought=cfg.macro.answer_after_thought, budget=a.budget,
                split='train', seed=a.seed, tasks={t: int((tasks == t).sum()) for t in sorted(set(tasks))},
                per_task={t: dict(mean_d=float(d[tasks == t].mean()), think_share=float(think[tasks == t].mean()),
                                  answer=float(score['answer'][tasks == t].mean()), think=float(score['think'][tasks == t].mean()))
                          for t in sorted(set(tasks))},
                tokens=dict(answer=float(toks['answer'].mean()), think=float(toks['think'].mean())), seconds=round(time.time() - t0, 1), outcomes=str(out_path))
    print(f"{len(items)} train-split items, {a.budget} tokens per item, {time.time() - t0:.0f} s")
    print("task       n   answer   think   mean d   gate thinks on")
    for t, v in gate['per_task'].items():
        print(f"{t:9} {gate['tasks'][t]:3}   {v['answer']:.3f}   {v['think']:.3f}   {v['mean_d']:+.3f}   {v['think_share']:.0%}")
    print(f"gain over always answering: always think {gate['always_think_gain']:+.4f}, oracle {gate['oracle_gain']:+.4f}, "
          f"gate ({gate['model']}, lam={gate['lam']}, 5-fold CV) {gate['cv_gain'][gate['model']][gate['lam']]:+.4f}")
    for m, by_lam in gate['cv_gain'].items():
        print(f"  CV gain, {m:8}: " + ', '.join(f"lam {l}: {g:+.4f}" for l, g in by_lam.items()))
    gate['cv_gain'] = {m: {str(l): g for l, g in by_lam.items()} for m, by_lam in gate['cv_gain'].items()}
    atomic_write_json(a.out, gate)
    print(f"wrote {a.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
