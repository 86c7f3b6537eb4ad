"""The engine's prompt cache in a budget sweep: greedy on the research suite with the cache off vs warm, side by side in one run.

A budget sweep (`rc evaluate --budgets 16,32,64,128`) runs every controller at every budget on the same prompts. With
`engine.prompt_cache_mb=0` each of those runs prefills every prompt again; with the cache (the default) only the first
run does, and the later ones read the prompt's K/V, logits and pooled state back (`engine.PromptCache`). What is timed is
the generation step of `evaluate.run_suite` (`evaluate.generate_items`, batched as a sweep batches: `evaluate.batch_order`,
`--batch` items per `generate_batch`) on two engines sharing one loaded SLM:
  cache off   `engine.prompt_cache_mb=0`: every batch prefills its prompts
  cache warm  the default cache, filled once before timing (as after the sweep's first controller and budget)
The two alternate batch by batch, so load from other processes falls on both alike. Both prefill a prompt in the same
batch of prompts, so their K/V are the same numbers and their texts must be identical (the run counts them).

By default the subset is the first quarter of each task's items (95 of 380); `--full` runs all.

Usage:  python benchmarks/prompt_cache.py [--fraction 0.25 | --full] [--batch 32] [--engine-batch 32] [--budgets 16,64]
        [--threads 2] [--out benchmarks/results/prompt_cache.json] [--set key=value ...]
Prints items/s both ways and their ratio per budget and in all; writes the numbers as JSON (atomically).
"""
from __future__ import annotations
import argparse, os, sys, time
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import torch
from eval_batching import fill_prompt_cache, load_note, ordered_items, run_facts  # the same stated subset as the batching benchmark


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--fraction', type=float, default=0.25, help="share of each task's items (default 0.25)")
    ap.add_argument('--full', action='store_true', help="every item of the suite (fraction 1)")
    ap.add_argument('--batch', type=int, default=32, help="items per generate_batch (evaluate.batch_items; default 32)")
    ap.add_argument('--engine-batch', type=int, default=32, help="states per forward (engine.batch_size; default 32)")
    ap.add_argument('--budgets', default='16,64', help="token budgets, comma-separated (default 16,64)")
    ap.add_argument('--threads', type=int, default=2, help="torch threads (default 2)")
    ap.add_argument('--controller', default='greedy', help="a training-free controller (default greedy)")
    ap.add_argument('--out', default='benchmarks/results/prompt_cache.json')
    ap.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    try: budgets = [int(b) for b in a.budgets.split(',')]
    except ValueError: sys.exit(f"--budgets {a.budgets!r}: give token counts separated by commas, e.g. 16,64")
    torch.set_num_threads(a.threads)
    from research_controller.config import atomic_write_json, load_config, replace_config
    from research_controller.controllers import make_controller
    from research_controller.engine import Engine, get_engine
    from research_controller.evaluate import build_suite, generate_items

    cfg = load_config(overrides=[*a.overrides, f'engine.batch_size={a.engine_batch}', f'slm.threads={a.threads}'])
    if cfg.engine.prompt_cache_mb == 0: sys.exit("engine.prompt_cache_mb=0: the warm engine needs the cache on; drop that override")
    suite = build_suite(cfg, 'research')
    items, seeds = ordered_items(suite, a.fraction, a.full)
    ctl, warm = make_controller(a.controller, cfg), get_engine(cfg)
    off = Engine(warm.model, warm.tok, replace_config(cfg, ['engine.prompt_cache_mb=0']))
    print(f"{a.controller} on suite {suite.name} [{suite.hash[:12]}]: {len(items)} of {len(suite)} items, budgets {budgets}, "
          f"batches of {a.batch} items, engine batch {a.engine_batch}, {a.threads} threads, {warm.dtype}")
    load0 = os.getloadavg()
    t = time.perf_counter()
    fill_prompt_cache(warm, items, a.batch)  # the sweep's first run
    fill_s = time.perf_counter() - t
    print(f"filled the cache in {fill_s:.1f} s: {warm.prompt_cache!r}")
    generate_items(ctl, items[:2], off, 8, seeds[:2], batch_items=2)  # warm-up (kernels), untimed
    rows, texts = [], {'off': [], 'warm': []}
    for b in budgets:
        t_off = t_warm = 0.0
        for i in range(0, len(items), a.batch):
            its, sds = items[i:i + a.batch], seeds[i:i + a.batch]
            t = time.perf_counter(); g0 = generate_items(ctl, its, off, b, sds, batch_items=a.batch); t_off += time.perf_counter() - t
            t = time.perf_counter(); g1 = generate_items(ctl, its, warm, b, sds, batch_items=a.batch); t_warm += time.perf_counter() - t
            texts['off'] += [g['text'] for g in g0]; texts['warm'] += [g['text'] for g in g1]
        rows.append(dict(budget=b, seconds_off=t_off, seconds_warm=t_warm, ratio=t_off / t_warm))
        print(f"  {b:>4} tokens: cache off {len(items) / t_off:5.2f} items/s ({t_off:6.1f} s), warm {len(items) / t_warm:5.2f} items/s "
              f"({t_warm:6.1f} s): {t_off / t_warm:.2f}x", flush=True)
    same = sum(x == y for x, y in zip(texts['off'], texts['warm']))
    tot_off, tot_warm = sum(r['seconds_off'] for r in rows), sum(r['seconds_warm'] for r in rows)
    res = dict(benchmark='benchmarks/prompt_cache.py', controller=a.controller, suite=suite.name, suite_hash=suite.hash,
               subset='all items' if a.full else f"first {a.fraction:.0%} of each task's items (suite order), batched in evaluate.batch_order",
               items=len(items), budgets=rows, batch_items=a.batch, engine_batch=a.engine_batch, threads=a.threads,
               cache_fill_seconds=fill_s,
               cache_prompts=len(warm.prompt_cache), cache_mib=warm.prompt_cache.nbytes / 2**20,
               seconds_off=tot_off, seconds_warm=tot_warm, ratio=tot_off / tot_warm,
               identical_texts=int(same), texts=len(texts['off']), **run_facts(cfg, warm, load0))
    atomic_write_json(a.out, res)
    print(f"all budgets: cache off {tot_off:.1f} s, warm {tot_warm:.1f} s: {res['ratio']:.2f}x; identical texts {same}/{len(texts['off'])}; "
          f"cache {res['cache_prompts']} prompts, {res['cache_mib']:.0f} MiB; {load_note(res)}")
    print(f"wrote {a.out}")
    return res


if __name__ == '__main__':
    main()
