"""The attention kernel: transformers' eager attention vs the copy-free grouped one (`slm.attn_implementation`), side by side in one run.

SmolLM2-135M shares each key/value head among 3 query heads. Eager attention copies every key and value head once per
query head before its two matrix products (`repeat_kv`); `slm.grouped_eager_attention` (`eager_gqa`, the default)
multiplies each group's query heads with their shared head directly. What is timed is greedy decoding through
`evaluate.stream_items` (32 items in flight) on research-suite items, one loaded SLM, the prompt cache filled first; the
kernel is switched on the loaded model between runs (`model.config._attn_implementation`), and the two alternate,
`--reps` times each, so load from other processes falls on both alike. In bf16 the different matrix shapes can round a
greedy token differently late in a generation: the run counts the identical texts.

By default the subset is the first quarter of each task's items (95 of 380); `--full` runs all.

Usage:  python benchmarks/attention_kernel.py [--fraction 0.25 | --full] [--budgets 64,128] [--reps 2] [--threads 2]
        [--out benchmarks/results/attention_kernel.json] [--set key=value ...]
Prints seconds both ways and their ratio per budget and in all; writes the numbers as JSON (atomically).
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
    ap.add_argument('--budgets', default='64,128', help="token budgets, comma-separated (default 64,128)")
    ap.add_argument('--reps', type=int, default=2, help="runs of each kernel per budget, alternating (default 2)")
    ap.add_argument('--batch', type=int, default=32, help="items in flight (evaluate.batch_items; default 32)")
    ap.add_argument('--threads', type=int, default=2, help="torch threads (default 2)")
    ap.add_argument('--out', default='benchmarks/results/attention_kernel.json')
    ap.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    try: budgets = [int(b) for b in a.budgets.split(',')]
    except ValueError: sys.exit(f"--budgets {a.budgets!r}: give token counts separated by commas, e.g. 64,128")
    if a.reps < 1: sys.exit(f"--reps {a.reps}: give at least 1")
    torch.set_num_threads(a.threads)
    from research_controller.config import atomic_write_json, load_config
    from research_controller.controllers import make_controller
    from research_controller.engine import get_engine
    from research_controller.evaluate import build_suite, stream_items

    cfg = load_config(overrides=[*a.overrides, f'engine.batch_size={a.batch}', f'slm.threads={a.threads}'])
    suite = build_suite(cfg, 'research')
    items, seeds = ordered_items(suite, a.fraction, a.full)
    eng, ctl = get_engine(cfg), make_controller('greedy', cfg)
    kernels = ['eager', 'eager_gqa']
    print(f"greedy on suite {suite.name} [{suite.hash[:12]}]: {len(items)} of {len(suite)} items, budgets {budgets}, {a.batch} in flight, "
          f"{a.threads} threads, {eng.dtype}, {eng.n_kv} key/value heads")
    load0 = os.getloadavg()
    fill_prompt_cache(eng, items, a.batch)
    rows = []
    for b in budgets:
        secs, texts = {k: [] for k in kernels}, {}
        for r in range(a.reps):
            for k in (kernels if r % 2 == 0 else kernels[::-1]):
                eng.model.config._attn_implementation = k
                t = time.perf_counter(); gens = stream_items(ctl, items, eng, b, seeds, a.batch); secs[k].append(time.perf_counter() - t)
                texts.setdefault(k, [g['text'] for g in gens])
        same = sum(x == y for x, y in zip(texts['eager'], texts['eager_gqa']))
        row = dict(budget=b, seconds_eager=secs['eager'], seconds_eager_gqa=secs['eager_gqa'],
                   ratio=sum(secs['eager']) / sum(secs['eager_gqa']), identical_texts=same)
        rows.append(row)
        print(f"  {b:>4} tokens: eager {' / '.join(f'{s:.1f}' for s in secs['eager'])} s, eager_gqa {' / '.join(f'{s:.1f}' for s in secs['eager_gqa'])} s: "
              f"{row['ratio']:.2f}x; identical texts {same}/{len(items)}", flush=True)
    eng.model.config._attn_implementation = cfg.slm.attn_implementation
    te, tg = sum(sum(r['seconds_eager']) for r in rows), sum(sum(r['seconds_eager_gqa']) for r in rows)
    res = dict(benchmark='benchmarks/attention_kernel.py', controller='greedy', suite=suite.name, suite_hash=suite.hash,
               subset='all items' if a.full else f"first {a.fraction:.0%} of each task's items (suite order), in evaluate.batch_order",
               items=len(items), budgets=rows, reps=a.reps, in_flight=a.batch, threads=a.threads,
               seconds_eager=te, seconds_eager_gqa=tg, ratio=te / tg, **run_facts(cfg, eng, load0))
    atomic_write_json(a.out, res)
    print(f"all: eager {te:.1f} s, eager_gqa {tg:.1f} s: {res['ratio']:.2f}x; {load_note(res)}")
    print(f"wrote {a.out}")
    return res


if __name__ == '__main__':
    main()
