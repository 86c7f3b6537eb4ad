"""Batched evaluation vs one item at a time: greedy on the research suite (the default SLM, bf16 on CPU), side by side in one run.

What is timed is the generation step of `evaluate.run_suite` (`evaluate.generate_items`) at the suite's token budget:
  one at a time  `batch_items=1`: one `controller.generate` per item (how run_suite worked before batching)
  batched        `batch_items=B`: `controller.generate_batch`, B items' episodes stepped together through `engine.step_batch`
Both run on the same items with the same per-item seeds. The items are batched as run_suite batches them (in
`evaluate.batch_order`: by prompt length, so a batch's padded prefill wastes little), and the two ways alternate batch by
batch (the B items of a batch one at a time, then the same B batched), so load from other processes on the shared cores
falls on both alike. Scoring (KenLM, the judge) is left out: it is the same work either way. Per-task ratios are
approximate: a batch can mix tasks, and its time is shared evenly by its items.

The research suite has 380 items; one pass one at a time takes about 10 minutes on 2 cores, so by default the run
uses a stated subset: the first quarter of each task's items (50 SQuAD, 20 WikiText, 15 NQ-Open, 10 GSM8K = 95
items). `--full` runs all 380.

Usage:  python benchmarks/eval_batching.py [--fraction 0.25 | --full] [--batch 8] [--budget 64] [--threads 2]
        [--controller greedy] [--out benchmarks/results/eval_batching.json] [--set key=value ...]
Prints items/s of both, their ratio (target >= 3x on 2 cores) and how many texts are identical; writes the numbers as
JSON (atomically).
"""
from __future__ import annotations
import argparse, math, os, platform, sys, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import torch

TARGET = 3.0


def subset(suite, fraction:float) -> list:
    "The first ceil(fraction * n) items of each task, in suite order."
    by_task = {}
    for it in suite.items: by_task.setdefault(it['task'], []).append(it)
    keep = {t: {it['id'] for it in its[:math.ceil(fraction * len(its))]} for t, its in by_task.items()}
    return [it for it in suite.items if it['id'] in keep[it['task']]]


def ordered_items(suite, fraction:float, full:bool=False) -> tuple:
    "(items, seeds): the stated subset (or every item), in `evaluate.batch_order` as run_suite runs them, with their item seeds."
    from research_controller.evaluate import batch_order, item_seed
    items = suite.items if full else subset(suite, fraction)
    items = [items[i] for i in batch_order(items)]
    return items, [item_seed(suite.seed, it['id']) for it in items]


def fill_prompt_cache(eng, items:list, batch:int) -> None:
    "Prefill every item's prompt into `eng`'s prompt cache, `batch` at a time (as a sweep's first run leaves it)."
    for i in range(0, len(items), batch): eng.new_states([it['prompt'] for it in items[i:i + batch]], 1)


def run_facts(cfg, eng, load0:tuple) -> dict:
    "What a result needs to be read on its own: dtype, model, SLM fingerprint, config hash, versions, cores, load average at the start and now."
    from research_controller.config import config_hash
    return dict(dtype=str(eng.dtype), model=cfg.slm.source, fingerprint=eng.fingerprint, config_hash=config_hash(cfg),
                torch=torch.__version__, python=platform.python_version(), cores=os.cpu_count(),
                load_average_start=[round(x, 2) for x in load0], load_average_end=[round(x, 2) for x in os.getloadavg()])


def load_note(res:dict) -> str:
    "The load-average line of a result with `run_facts`."
    return f"load average {res['load_average_start'][0]} at the start, {res['load_average_end'][0]} at the end on {res['cores']} cores"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--fraction', type=float, default=0.25, help="share of each task's items (default 0.25)")
    ap.add_argument('--full', action='store_true', help="every item of the suite (fraction 1)")
    ap.add_argument('--batch', type=int, default=None, help="items per batch (default evaluate.batch_items)")
    ap.add_argument('--budget', type=int, default=None, help="token budget per item (default evaluate.token_budget)")
    ap.add_argument('--threads', type=int, default=2, help="torch threads (default 2)")
    ap.add_argument('--controller', default='greedy', help="a training-free controller (default greedy)")
    ap.add_argument('--suite', default='research', help="built-in suite (default research)")
    ap.add_argument('--out', default='benchmarks/results/eval_batching.json')
    ap.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from research_controller.config import atomic_write_json, load_config
    from research_controller.controllers import make_controller
    from research_controller.engine import get_engine
    from research_controller.evaluate import build_suite, generate_items

    cfg = load_config(overrides=a.overrides)
    batch, budget = a.batch or cfg.evaluate.batch_items, a.budget or cfg.evaluate.token_budget
    suite = build_suite(cfg, a.suite)
    items, seeds = ordered_items(suite, a.fraction, a.full)  # run_suite's batches, in the order it runs them
    ctl, eng = make_controller(a.controller, cfg), get_engine(cfg)
    if not callable(getattr(ctl, 'generate_batch', None)): sys.exit(f"{a.controller} has no generate_batch: nothing to compare")
    counts = {}
    for it in items: counts[it['task']] = counts.get(it['task'], 0) + 1
    print(f"{a.controller} on suite {suite.name} [{suite.hash[:12]}]: {len(items)} of {len(suite)} items {counts}, "
          f"{budget} tokens each, batches of {batch}, {a.threads} threads, {eng.dtype}")

    load0 = os.getloadavg()
    generate_items(ctl, items[:2], eng, budget, seeds[:2], batch_items=2)  # warm-up (kernels, caches), untimed
    one, many, t_one, t_many, per_task = [], [], 0.0, 0.0, {}
    for i in range(0, len(items), batch):
        its, sds = items[i:i + batch], seeds[i:i + batch]
        t = time.perf_counter(); g1 = generate_items(ctl, its, eng, budget, sds, batch_items=1); d1 = time.perf_counter() - t
        t = time.perf_counter(); gb = generate_items(ctl, its, eng, budget, sds, batch_items=batch); db = time.perf_counter() - t
        one += g1; many += gb; t_one += d1; t_many += db
        for it in its:
            pt = per_task.setdefault(it['task'], [0, 0.0, 0.0]); pt[0] += 1; pt[1] += d1 / len(its); pt[2] += db / len(its)
        tasks = ','.join(sorted({it['task'] for it in its}))
        print(f"  batch {i // batch + 1:>2} ({tasks:16}) one at a time {len(its) / d1:5.2f} items/s, batched {len(its) / db:5.2f} items/s", flush=True)

    errors = [(it['id'], g['error']) for it, g in zip(items, one + many) if g['error']]
    same = [g1['text'] == gb['text'] for g1, gb in zip(one, many)]
    same_tok = [g1['tokens'] == gb['tokens'] for g1, gb in zip(one, many)]
    diffs = [dict(id=it['id'], one=g1['text'][:80], batched=gb['text'][:80]) for it, g1, gb, s in zip(items, one, many, same) if not s]
    ips_one, ips_many = len(items) / t_one, len(items) / t_many
    res = dict(benchmark='benchmarks/eval_batching.py', controller=a.controller, batched_via=f"{type(ctl).__name__}.generate_batch", suite=suite.name, suite_hash=suite.hash,
               subset='all items' if a.full else f"first {a.fraction:.0%} of each task's items (suite order), batched in evaluate.batch_order",
               items=len(items), per_task_items=counts, token_budget=budget, batch_items=batch, threads=a.threads,
               one_at_a_time=dict(seconds=t_one, items_per_s=ips_one, tokens=sum(g['tokens'] for g in one)),
               batched=dict(seconds=t_many, items_per_s=ips_many, tokens=sum(g['tokens'] for g in many)),
               ratio=ips_many / ips_one, target=f">= {TARGET}x", meets_target=ips_many / ips_one >= TARGET,
               identical_texts=int(sum(same)), identical_token_counts=int(sum(same_tok)),
               per_task={t: dict(items=n, approx_ratio=s1 / sb, identical_texts=int(sum(s for it, s in zip(items, same) if it['task'] == t)))
                         for t, (n, s1, sb) in per_task.items()},
               errors=errors, first_differences=diffs[:5], **run_facts(cfg, eng, load0))
    atomic_write_json(a.out, res)
    print(f"\n{'':16}{'items/s':>9}{'seconds':>9}{'tokens':>8}")
    print(f"{'one at a time':16}{ips_one:9.2f}{t_one:9.1f}{res['one_at_a_time']['tokens']:8d}")
    print(f"{'batched (' + str(batch) + ')':16}{ips_many:9.2f}{t_many:9.1f}{res['batched']['tokens']:8d}")
    print(f"ratio {res['ratio']:.2f}x (target {res['target']}: {'met' if res['meets_target'] else 'NOT met'}); "
          f"identical texts {res['identical_texts']}/{len(items)}, identical token counts {res['identical_token_counts']}/{len(items)}; "
          f"errors {len(errors)}; {load_note(res)}")
    for t, d in res['per_task'].items(): print(f"  {t:9} {d['items']:>3} items: ratio ~{d['approx_ratio']:.2f}x, identical texts {d['identical_texts']}/{d['items']}")
    for d in diffs[:3]: print(f"  differs {d['id']}: one {d['one']!r}\n  {'':8}{' ' * len(d['id'])}  batched {d['batched']!r}")
    print(f"wrote {a.out}")
    return res


if __name__ == '__main__':
    main()
