"""Which thought delimiters can the frozen SLM read? Special tokens vs plain-text phrases, on a dev set from the train split.

A hidden thought is opened and closed either by the two special tokens the loader adds (`macro.thought_style=tokens`:
new to the frozen SLM, their embedding rows initialised from phrase embeddings) or by plain-text phrases it already
reads (`macro.thought_style=text`: `macro.thought_open_text`, `macro.thought_close_text`), the latter with and without
`macro.answer_after_thought` (the answer may not end before its first word). They are measured with
the same scripted use of a thought, the `think_answer` controller (open a thought, write to its first sentence end,
close it, answer to the first sentence end), beside greedy and greedy-with-a-stop-rule, on the same items at the same
token budget (every token forwarded counts: thought and delimiters included):
  - the answer's task score after the thought (SQuAD F1 by default),
  - the log-probability of the first visible token after the thought (how sure the SLM is of what follows the close),
  - empty answers, and tokens spent.
Items come from the train split (a seeded sample): this is where defaults are chosen; the eval split is kept for
the research suite's final numbers. The paired difference of each delimiter style against greedy is printed with a
bootstrap CI.

Usage:  python benchmarks/thought_delimiters.py [--task squad] [--n 60] [--seed 123] [--budget 64] [--threads 1]
        [--out benchmarks/results/thought_delimiters.json] [--set key=value ...]
"""
from __future__ import annotations
import argparse, os, sys, time
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import numpy as np
import torch


def run_think(ctl, eng, items, budget:int, batch:int) -> tuple:
    "think_answer over `items` in batches, stepping the engine by hand to read the log-prob after each close: (texts, tokens, first-token log-probs)."
    from research_controller.macro_actions import Action
    texts, toks, first = [], [], []
    for i in range(0, len(items), batch):
        its = items[i:i + batch]
        ss = eng.new_states([it['prompt'] for it in its], budget, seed=0, **ctl.sampling())
        lp = [None] * len(ss)
        while live := [k for k, s in enumerate(ss) if not eng.is_done(s)]:
            for k in live:
                s = ss[k]
                if lp[k] is None and s.ms.last == 'close':  # the next token is the first of the visible answer
                    lp[k] = float(torch.log_softmax(s.tip.logits.float(), -1).max())
            eng.step_batch([ss[k] for k in live], [ctl.decide(eng, ss[k])[0] for k in live])
        for s, l in zip(ss, lp):
            r = ctl.finish(eng.result(s), {})
            texts.append(r.text); toks.append(r.tokens); first.append(l)
    return texts, toks, first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--task', default='squad', choices=['squad', 'gsm8k', 'nq_open', 'wikitext'])
    ap.add_argument('--n', type=int, default=60, help="train-split items (a seeded sample)")
    ap.add_argument('--seed', type=int, default=123)
    ap.add_argument('--budget', type=int, default=64, help="tokens per item, everything forwarded included")
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default='benchmarks/results/thought_delimiters.json')
    ap.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from research_controller.config import atomic_write_json, load_config
    from research_controller.controllers import BASELINES
    from research_controller.engine import Engine
    from research_controller.evaluate import bootstrap_ci
    from research_controller.rewards import TASK_METRIC, load_task_items, task_score
    from research_controller.slm import load_slm
    base = load_config(overrides=a.sets)
    model, tok = load_slm(base)
    items = load_task_items(base, a.task, 'train', n=a.n, seed=a.seed)
    metric = TASK_METRIC[a.task]
    arms = [('greedy', []), ('greedy_stop', []), ('think_answer', ['macro.thought_style=tokens']),
            ('think_answer', ['macro.thought_style=text', 'macro.answer_after_thought=false']), ('think_answer', ['macro.thought_style=text'])]
    rows, t0 = [], time.time()
    for name, ov in arms:
        cfg = load_config(overrides=[*a.sets, *ov]); eng = Engine(model, tok, cfg); ctl = BASELINES[name](cfg)
        t = time.time()
        if name == 'think_answer': texts, toks, first = run_think(ctl, eng, items, a.budget, a.batch)
        else:
            res = [r for i in range(0, len(items), a.batch) for r in ctl.generate_batch(eng, [it['prompt'] for it in items[i:i + a.batch]], a.budget, seeds=0)]
            texts, toks, first = [r.text for r in res], [r.tokens for r in res], [None] * len(res)
        scores = [task_score(it, x)[metric] for it, x in zip(items, texts)]
        fl = [x for x in first if x is not None]
        style = (cfg.macro.thought_style + ('+word' if cfg.macro.answer_after_thought else '')) if name == 'think_answer' else None
        rows.append(dict(controller=name, style=style, answer_after_thought=cfg.macro.answer_after_thought, scores=scores,
                         mean=float(np.mean(scores)), tokens=float(np.mean(toks)), empty=int(sum(not x.strip() for x in texts)),
                         first_token_logprob=float(np.mean(fl)) if fl else None, seconds=round(time.time() - t, 1), texts=texts))
        print(f"{name:13} {rows[-1]['style'] or '':11} {metric} {rows[-1]['mean']:.3f}  tokens {rows[-1]['tokens']:.1f}  empty {rows[-1]['empty']:2}"
              f"  first visible token log-prob {rows[-1]['first_token_logprob'] if fl else float('nan'):.2f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    g = np.array(rows[0]['scores'])
    print(f"\n{len(items)} train-split {a.task} items (seed {a.seed}), {a.budget} tokens per item; paired difference vs greedy [95% bootstrap CI]:")
    for r in rows[1:]:
        d = np.array(r['scores']) - g; lo, hi = bootstrap_ci(d)
        r['delta_vs_greedy'] = [float(d.mean()), float(lo), float(hi)]
        print(f"  {r['controller']:13} {r['style'] or '':11} {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
    best = max((r for r in rows if r['controller'] == 'think_answer'), key=lambda r: r['mean'])
    d0 = load_config().macro
    print(f"better here: {best['style']} (defaults: macro.thought_style={d0.thought_style}, macro.answer_after_thought={d0.answer_after_thought}; "
          f"'+word': the answer may not end before its first word)")
    atomic_write_json(a.out, dict(task=a.task, n=len(items), seed=a.seed, budget=a.budget, split='train', threads=a.threads,
                                  seconds=round(time.time() - t0, 1), arms=rows, better=best['style']))
    print(f"wrote {a.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
