"""Cost per episode of each reward term on the real SLM (CPU).

Scores the final texts of `--episodes` episodes drawn from the train split of every task with each term of
`research_controller.rewards.default_terms` and prints milliseconds per episode:

- fluency (KenLM), task score, length / repetition / unclosed-thought penalties;
- the G-Eval coherence judge three ways, side by side in one run: fully cold (empty sqlite cache, the shared
  prompt prefix not yet computed), cold with the prefix keys/values already computed (the steady state of a
  long run: new texts, known prompts), and cached (every rating in sqlite); plus the cold judge called one
  episode at a time instead of batched, to show what batching saves;
- the whole `RewardCalculator.calc.batch` cold and cached.

Episode texts are the items' reference answers (WikiText: the first ~48 words of the reference continuation;
GSM8K: the worked solution), or with `--generate` the SLM's own greedy answers (slower: it generates first).

    python benchmarks/reward_cost.py --episodes 12 --out runs/bench/reward_cost.json
"""
import argparse, json, os, re, statistics, sys, tempfile, time
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
from research_controller.config import load_config
from research_controller import rewards as R
from research_controller.slm import load_slm, model_fingerprint, quick_generate

def episode_texts(cfg, n, seed, generate, model, tok):
    "`n` (text, item) pairs, round-robin over the tasks, from the train split."
    tasks = ['nq_open', 'squad', 'gsm8k', 'wikitext']
    per = {t: R.load_task_items(cfg, t, 'train', n=(n + 3) // 4, seed=seed) for t in tasks}
    items = [per[tasks[i % 4]][i // 4] for i in range(n)]
    out = []
    for it in items:
        if generate: text = quick_generate(model, tok, it['prompt'], max_new_tokens=cfg.selfplay.max_new_tokens, cfg=cfg)
        elif it['task'] == 'gsm8k': text = re.sub(r'<<[^>]*>>', '', it['meta']['solution'].rsplit('####', 1)[0]).strip() + f" The answer is {it['references'][0]}."
        elif it['task'] == 'wikitext': text = ' '.join(it['references'][0].split()[:48])
        else: text = it['references'][0] + '.'
        out.append((text, it))
    return out

CPU = {}  # row name -> CPU ms per episode (process time, all threads): less noisy than wall time on a shared machine

def timed(fn, reps=1):
    "Median wall seconds of `reps` calls of `fn` (and its last result); the CPU seconds go to `timed.cpu`."
    ts, cs, r = [], [], None
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time(); r = fn(); ts.append(time.perf_counter() - t0); cs.append(time.process_time() - c0)
    timed.cpu = statistics.median(cs)
    return statistics.median(ts), r

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--episodes', type=int, default=12, help='episodes (final texts) to score')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--reps', type=int, default=3, help='repetitions of the cheap terms (median)')
    ap.add_argument('--generate', action='store_true', help="score the SLM's own greedy answers instead of references")
    ap.add_argument('--out', default=None, help='write the numbers as JSON here')
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix='reward-cost-')
    cfg = load_config(overrides=[f'rewards.judge_cache={tmp}/judge.sqlite'])
    t0 = time.perf_counter(); model, tok = load_slm(cfg); t_load = time.perf_counter() - t0
    eps = episode_texts(cfg, a.episodes, a.seed, a.generate, model, tok)
    n = len(eps)
    ctxs = lambda: [R.RewardContext(t, it, len(tok(t, add_special_tokens=False)['input_ids']), False, {}) for t, it in eps]
    rows = {}
    # cheap terms
    for term in [R.FluencyTerm(cfg), R.TaskTerm(), R.LengthPenalty(cfg), R.RepetitionPenalty(cfg), R.UnclosedThoughtPenalty()]:
        cs = ctxs(); s, _ = timed(lambda: term.batch(cs), a.reps); rows[term.name] = s / n * 1000; CPU[term.name] = timed.cpu / n * 1000
    s, _ = timed(ctxs, a.reps); rows['token count (tokenizer)'] = s / n * 1000; CPU['token count (tokenizer)'] = timed.cpu / n * 1000
    # judge: fully cold, cold with the shared prefix computed, cached, and cold one episode at a time
    texts, reqs = [t for t, _ in eps], [it['prompt'] for _, it in eps]
    R._PREFIX_KV.clear()
    j = R.Judge(cfg, model, tok)
    s, sc = timed(lambda: j.score(texts, reqs)); rows['coherence judge, fully cold (batched)'] = s / n * 1000; CPU['coherence judge, fully cold (batched)'] = timed.cpu / n * 1000
    s, _ = timed(lambda: j.score(texts, reqs)); rows['coherence judge, cached (sqlite)'] = s / n * 1000; CPU['coherence judge, cached (sqlite)'] = timed.cpu / n * 1000
    cfg2 = load_config(overrides=[f'rewards.judge_cache={tmp}/judge2.sqlite'])
    j2 = R.Judge(cfg2, model, tok)
    s, sc2 = timed(lambda: j2.score(texts, reqs)); rows['coherence judge, cold, prefix known (batched)'] = s / n * 1000; CPU['coherence judge, cold, prefix known (batched)'] = timed.cpu / n * 1000
    cfg3 = load_config(overrides=[f'rewards.judge_cache={tmp}/judge3.sqlite'])
    j3 = R.Judge(cfg3, model, tok)
    s, sc3 = timed(lambda: [j3.score([t], [r])[0] for t, r in zip(texts, reqs)]); rows['coherence judge, cold, prefix known (one at a time)'] = s / n * 1000; CPU['coherence judge, cold, prefix known (one at a time)'] = timed.cpu / n * 1000
    agree = max(abs(x.score - y.score) for x, y in zip(sc2, sc3))
    # whole calculator
    cfg4 = load_config(overrides=[f'rewards.judge_cache={tmp}/judge4.sqlite'])
    rc = R.RewardCalculator(cfg4, model, tok)
    s, bd = timed(lambda: rc.calc.batch(texts, [it for _, it in eps])); rows['RewardCalculator.calc.batch, judge cold (prefix known)'] = s / n * 1000; CPU['RewardCalculator.calc.batch, judge cold (prefix known)'] = timed.cpu / n * 1000
    s, _ = timed(lambda: rc.calc.batch(texts, [it for _, it in eps])); rows['RewardCalculator.calc.batch, judge cached'] = s / n * 1000; CPU['RewardCalculator.calc.batch, judge cached'] = timed.cpu / n * 1000
    ntok = [len(tok(t, add_special_tokens=False)['input_ids']) for t in texts]
    meta = dict(episodes=n, judge_paraphrases=cfg.rewards.judge_paraphrases, slm_fingerprint=model_fingerprint(model),
                answer_tokens_mean=round(sum(ntok) / n, 1), judge_prompt_tokens_mean=round(sum(len(j.prompt_ids(r, t, 0)) for t, r in zip(texts, reqs)) / n, 1),
                judge_shared_prefix_tokens=len(j._shared_prefix(0)), slm_load_s=round(t_load, 2), generate=a.generate,
                max_abs_diff_batched_vs_single=round(agree, 5), mean_total=round(sum(b.total for b in bd) / n, 4),
                load_avg_1min=os.getloadavg()[0], cpu_count=os.cpu_count())
    print(f"reward cost per episode ({n} episodes; mean answer {meta['answer_tokens_mean']} tokens; judge prompt "
          f"{meta['judge_prompt_tokens_mean']} tokens of which {meta['judge_shared_prefix_tokens']} shared; "
          f"{meta['judge_paraphrases']} paraphrases; load avg {meta['load_avg_1min']:.1f} on {meta['cpu_count']} CPUs)")
    w = max(map(len, rows))
    print(f"  {'term':<{w}}  {'wall ms':>10}  {'CPU ms':>10}  (per episode)")
    for k, v in rows.items(): print(f"  {k:<{w}}  {v:10.2f}  {CPU[k]:10.2f}")
    print(f"  batched vs one-at-a-time judge: {rows['coherence judge, cold, prefix known (one at a time)'] / rows['coherence judge, cold, prefix known (batched)']:.2f}x; "
          f"cold vs cached: {rows['coherence judge, cold, prefix known (batched)'] / max(rows['coherence judge, cached (sqlite)'], 1e-9):.0f}x; "
          f"max |batched - single| score {agree:.4f}")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        tmpf = a.out + '.tmp'
        with open(tmpf, 'w') as f: json.dump(dict(ms_per_episode={k: round(v, 3) for k, v in rows.items()}, cpu_ms_per_episode={k: round(v, 3) for k, v in CPU.items()}, **meta), f, indent=1)
        os.replace(tmpf, a.out)
    return rows, meta

if __name__ == '__main__': main()
