"""Tune the threshold controller: a small grid of its settings against greedy at equal token budget, on a DEV set.

The threshold controller (`research_controller.engine.ThresholdController`, settings `baselines.threshold_*`) is the
hand-rule baseline and what `rc cycle` / the server use while nothing is promoted. This script runs each setting of
`GRID` and greedy decoding with the project's own evaluation code (`research_controller.evaluate`:
`evaluate_controllers` on a `Suite`, the configured `RewardCalculator` with every reward term, `compare` for the
paired bootstrap CI and Wilcoxon p of the reward difference to greedy), at `evaluate.token_budget` tokens per item.

The dev set is NOT the benchmark: it is drawn from the TRAIN split of every task in `evaluate.tasks` (SQuAD split by
article, so no dev passage is a benchmark passage) with its own seed, and the script stops if any dev item id is
an item of the fixed default suite that `rc evaluate` and `rc cycle` use. Tuning on that suite would be cheating.

Usage:  python benchmarks/threshold_sweep.py [--per-task 6] [--seed 20261124] [--split train]
        [--configs A,B,...] [--no-resume] [--threads 0] [--out benchmarks/results/threshold_sweep.json] [--set key=value ...]
Per-config results are kept under runs/threshold_sweep/<dev suite hash>/ and reused on a re-run with the same
suite, settings and config (--no-resume runs everything again). Writes the table as JSON (atomically, after every
config) and prints it as Markdown; the best setting (mean dev reward) is named at the end. Needs the default SLM
(cached by `load_slm`) and the KenLM model (`rc build-lm`). 751 s on 2 busy CPU cores with the defaults (24 dev items,
greedy + 9 settings). The best setting of the latest run is what `baselines.threshold_*` defaults to (configs/default.yaml).
"""
from __future__ import annotations
import argparse, dataclasses, hashlib, inspect, json, os, platform, random, sys, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('MPLBACKEND', 'Agg')

ROOT = Path(__file__).resolve().parent.parent
DEV_SEED = 20261124  # the benchmark suite uses evaluate.seed (1234): a different draw

# name -> overrides of the `baselines` section (keys without the `threshold_` prefix). A is the old default.
# resample_zscore 20 (its upper bound) switches resampling off in practice; max_thoughts 0 switches thinking off.
GRID = {
    'A': dict(think_entropy=2.5, varentropy=3.0, resample_zscore=2.0, max_thoughts=2, min_visible_tokens=0),
    'B': dict(think_entropy=2.5, varentropy=3.0, resample_zscore=2.0, max_thoughts=2, min_visible_tokens=8),
    'C': dict(think_entropy=2.5, varentropy=3.0, resample_zscore=2.0, max_thoughts=2, min_visible_tokens=16),
    'D': dict(think_entropy=2.5, varentropy=3.0, resample_zscore=20.0, max_thoughts=2, min_visible_tokens=8),
    'E': dict(think_entropy=3.5, varentropy=5.0, resample_zscore=3.0, max_thoughts=1, min_visible_tokens=16),
    'F': dict(think_entropy=2.5, varentropy=3.0, resample_zscore=2.0, max_thoughts=0, min_visible_tokens=16),
    'G': dict(think_entropy=2.5, varentropy=3.0, resample_zscore=3.0, max_thoughts=2, min_visible_tokens=8),
    'H': dict(think_entropy=2.0, varentropy=3.0, resample_zscore=20.0, max_thoughts=2, min_visible_tokens=8),
    'I': dict(think_entropy=3.0, varentropy=4.0, resample_zscore=20.0, max_thoughts=2, min_visible_tokens=8),
}
SHORT = dict(think_entropy='te', varentropy='ve', resample_zscore='rz', max_thoughts='mt', min_visible_tokens='mv')


def overrides(params:dict) -> list:
    "`--set` style overrides of the `baselines` section for one grid point."
    return [f"baselines.threshold_{k}={v}" for k, v in params.items()]


def describe(params:dict) -> str:
    return ' '.join(f"{SHORT[k]}={v}" for k, v in params.items())


def build_dev_suite(cfg, per_task:int, seed:int, split:str):
    "A `Suite` of `per_task` items per task of `evaluate.tasks` from `split`, none of them in the default benchmark suite."
    from research_controller.evaluate import EVAL_FILES, Suite, get_suite, check_item
    from research_controller.rewards import load_task_items
    from research_controller.config import data_path, sha256_file
    bench = get_suite(cfg)
    bench_ids = {it['id'] for it in bench.items}
    items = []
    for t in cfg.evaluate.tasks:
        pool = [it for it in load_task_items(cfg, t, split=split) if it['id'] not in bench_ids]
        if len(pool) < per_task: sys.exit(f"only {len(pool)} {split} items of {t!r} outside the benchmark suite; lower --per-task.")
        items += [check_item(pool[i], f"{t} dev item") for i in sorted(random.Random(f"{seed}:{t}:{split}:dev").sample(range(len(pool)), per_task))]
    overlap = bench_ids & {it['id'] for it in items}
    if overlap: sys.exit(f"dev items overlap the benchmark suite: {sorted(overlap)[:5]}")  # cannot happen, checked anyway
    # the eval files serve both splits (split by article/question) except GSM8K, whose train split is its own file
    files = {**EVAL_FILES, **({'gsm8k': ['gsm8k/train.jsonl']} if split == 'train' else {})}
    src = [{'path': p, 'sha256': sha256_file(data_path(cfg, p))} for t in cfg.evaluate.tasks for p in files[t]]
    dev = Suite(f'threshold-dev-{split}', items, version=1, seed=seed, token_budget=cfg.evaluate.token_budget, created_from=src)
    return dev, bench


def run_one(cfg, ctl, suite, engine, rewards, cache:Path, key:dict, resume:bool):
    "The SuiteResult of `ctl` on `suite` (reused from `cache` when it was run with the same `key`)."
    from research_controller.evaluate import SuiteResult, evaluate_controllers
    if resume and cache.exists():
        r = SuiteResult.load(cache)
        if r.meta.get('sweep_key') == key: return r, True
    r = evaluate_controllers(cfg, [ctl], suite, progress=True, engine=engine, rewards=rewards)[0]
    r.meta['sweep_key'] = key
    r.save(cache)
    return r, False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--per-task', type=int, default=6, help="dev items per task (tasks: evaluate.tasks)")
    ap.add_argument('--seed', type=int, default=DEV_SEED, help="dev-set seed (the benchmark uses evaluate.seed)")
    ap.add_argument('--split', default='train', choices=['train', 'eval'],
                    help="split the dev items come from; train (default) shares no SQuAD article with the benchmark")
    ap.add_argument('--configs', default=','.join(GRID), help="comma-separated names from GRID")
    ap.add_argument('--threads', type=int, default=0, help="torch threads; 0 = leave torch's default")
    ap.add_argument('--no-resume', action='store_true', help="re-run configs whose results are cached under runs/threshold_sweep/")
    ap.add_argument('--out', default=str(ROOT/'benchmarks/results/threshold_sweep.json'))
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help="config override for every run")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.configs.split(',') if n.strip()]
    bad = [n for n in names if n not in GRID]
    if bad: ap.error(f"unknown config(s) {bad}; choose from {list(GRID)}")
    import torch
    if a.threads: torch.set_num_threads(a.threads)
    from research_controller.config import load_config, config_hash, run_path
    from research_controller.controllers import GreedyBaseline, ThresholdController
    from research_controller.config import atomic_write_json
    from research_controller.evaluate import compare, adjust_pvalues, default_engine, default_rewards
    cfg = load_config(overrides=a.set)
    if a.seed == cfg.evaluate.seed and a.split == 'eval': ap.error("--seed equals evaluate.seed: that draws the benchmark itself")
    t_start = time.perf_counter()
    dev, bench = build_dev_suite(cfg, a.per_task, a.seed, a.split)
    print(f"dev suite: {dev!r}\nbenchmark suite (not used): {bench!r}; id overlap 0", flush=True)
    engine = default_engine(cfg)
    rewards = default_rewards(cfg, engine)
    cache_dir = run_path(cfg, 'threshold_sweep')/dev.hash[:12]
    base_key = dict(suite=dev.hash, config=config_hash(cfg), slm=engine.fingerprint)
    res = dict(script='benchmarks/threshold_sweep.py', argv=list(sys.argv[1:] if argv is None else argv), model=cfg.slm.source,
               fingerprint=engine.fingerprint, config_hash=config_hash(cfg), token_budget=dev.token_budget,
               dev_suite=dict(name=dev.name, hash=dev.hash, seed=dev.seed, split=a.split, tasks=dev.task_counts(),
                              ids=[it['id'] for it in dev.items]),
               benchmark_suite=dict(hash=bench.hash, n=len(bench), id_overlap=0),
               reward_weights={k: v for k, v in dataclasses.asdict(cfg.rewards).items() if k.startswith('w_')},
               torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(), configs={})
    out = Path(a.out)
    code = hashlib.sha256(inspect.getsource(ThresholdController).encode()).hexdigest()[:16]  # cached results of other rules are not reused

    t = time.perf_counter()
    greedy, hit = run_one(cfg, GreedyBaseline(cfg), dev, engine, rewards, cache_dir/'greedy.json', {**base_key, 'controller': 'greedy'}, not a.no_resume)
    res['greedy'] = dict(mean_reward=greedy.mean('reward'), per_task={k: v.get('reward') for k, v in greedy.summary()['per_task'].items()},
                         tokens=greedy.mean('tokens'), seconds=round(time.perf_counter() - t, 1), cached=hit,
                         item_rewards=greedy.values('reward'))
    print(f"greedy: reward {greedy.mean('reward'):.3f}, tokens {greedy.mean('tokens'):.1f} ({time.perf_counter() - t:.0f} s{', cached' if hit else ''})", flush=True)

    for i, n in enumerate(names):
        p = GRID[n]
        ccfg = load_config(overrides=[*a.set, *overrides(p)])
        ctl = ThresholdController(ccfg); ctl.name = f"threshold-{n}"
        t = time.perf_counter()
        key = {**base_key, 'controller': 'threshold', 'params': p, 'code': code}
        r, hit = run_one(cfg, ctl, dev, engine, rewards, cache_dir/f"{n}.json", key, not a.no_resume)
        st = compare(greedy, r, cfg.evaluate)['reward']
        acts = {k: sum(rec.actions.get(k, 0) for rec in r.records) / r.n for k in ('THINK_BEGIN', 'RESAMPLE')}
        res['configs'][n] = dict(params=p, mean_reward=r.mean('reward'), diff=st.diff, ci=[st.ci_lo, st.ci_hi], p_wilcoxon=st.p_wilcoxon,
                                 p_holm_metrics=st.p_adj, n_better=st.n_pos, n_worse=st.n_neg, tokens=r.mean('tokens'),
                                 thoughts_per_item=acts['THINK_BEGIN'], resamples_per_item=acts['RESAMPLE'],
                                 per_task={k: v.get('reward') for k, v in r.summary()['per_task'].items()},
                                 seconds=round(time.perf_counter() - t, 1), cached=hit, item_rewards=r.values('reward'))
        ps = adjust_pvalues([c['p_wilcoxon'] for c in res['configs'].values()], 'holm')
        for c, q in zip(res['configs'].values(), ps): c['p_holm_configs'] = float(q)
        res['seconds'] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(out, res)
        print(f"[{i + 1}/{len(names)}] {n} ({describe(p)}): reward {r.mean('reward'):.3f}, diff vs greedy {st.diff:+.3f} "
              f"[{st.ci_lo:+.3f}, {st.ci_hi:+.3f}] p={st.p_wilcoxon:.3g}, thoughts/item {acts['THINK_BEGIN']:.2f}, "
              f"resamples/item {acts['RESAMPLE']:.2f} ({time.perf_counter() - t:.0f} s{', cached' if hit else ''})", flush=True)

    best = max(res['configs'], key=lambda k: res['configs'][k]['mean_reward'])
    res['best'] = best
    res['seconds'] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(out, res)
    print(f"\n{dev.name} [{dev.hash[:12]}], {len(dev)} items ({', '.join(f'{k} {v}' for k, v in dev.task_counts().items())}), "
          f"budget {dev.token_budget} tokens; diff = config - greedy, paired bootstrap 95% CI, Wilcoxon p "
          f"(raw; Holm over the {len(names)} configs)\n")
    tasks = sorted(res['greedy']['per_task'])
    print('| config | te | ve | rz | mt | mv | reward | diff vs greedy [95% CI] | p | p Holm | +/- | thoughts/item | resamples/item | tokens | '
          + ' | '.join(tasks) + ' |')
    print('|---|' + '---:|' * (14 + len(tasks)))
    g = res['greedy']
    print(f"| greedy | | | | | | {g['mean_reward']:.3f} | — | | | | 0 | 0 | {g['tokens']:.1f} | "
          + ' | '.join(f"{g['per_task'][t]:.3f}" for t in tasks) + ' |')
    for n, c in res['configs'].items():
        p = c['params']
        print(f"| {n}{' **best**' if n == best else ''} | {p['think_entropy']} | {p['varentropy']} | {p['resample_zscore']} | {p['max_thoughts']} | "
              f"{p['min_visible_tokens']} | {c['mean_reward']:.3f} | {c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | "
              f"{c['p_wilcoxon']:.3g} | {c['p_holm_configs']:.3g} | +{c['n_better']}/-{c['n_worse']} | {c['thoughts_per_item']:.2f} | "
              f"{c['resamples_per_item']:.2f} | {c['tokens']:.1f} | " + ' | '.join(f"{c['per_task'].get(t, float('nan')):.3f}" for t in tasks) + ' |')
    c = res['configs'][best]
    verdict = 'beats' if c['diff'] > 0 and c['ci'][0] > 0 else ('is above (not significantly)' if c['diff'] > 0 else 'does not beat')
    print(f"\nbest: {best} ({describe(c['params'])}) {verdict} greedy: {c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}], "
          f"p={c['p_wilcoxon']:.3g}\nwritten: {out} ({res['seconds']:.0f} s)")
    return res


if __name__ == '__main__': main()
