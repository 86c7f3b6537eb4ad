"""Continuous batching in evaluation: fixed batches vs a stream that refills a finished item's row at once, side by side in one run.

A fixed batch of B items steps until its longest member is done: the rows of items that ended early idle (or leave the
forward and shrink the batch) while one item keeps decoding. `evaluate.stream_items` keeps B items in flight instead:
as soon as one item's episode ends, the next item's episode takes its row (`Controller.generate_stream(live=B)`). What
is timed is the generation step of `evaluate.run_suite` on the same items, seeds and engine:
  batches   `evaluate.generate_batch_items` on consecutive slices of B items in `evaluate.batch_order` (how a sweep ran before)
  stream    `evaluate.stream_items(live=B)` over the same items in the same order (how `evaluate.generate_items` runs now)
The prompt cache is filled before timing (as after a sweep's first run), so neither pays a prefill; best-of-N's
candidate cache is off, so both sample. For each controller and budget the two run back to back, the first of the pair
alternating, so load from other processes falls on both alike. In bf16 a different batch composition can round a
greedy token differently late in a generation: the run counts the identical texts.

By default the subset is the first half of each task's items (190 of 380); `--full` runs all. A longer list lets the
stream refill more often, so the full suite gains more than a subset.

Usage:  python benchmarks/continuous_batching.py [--fraction 0.5 | --full] [--batch 32] [--budgets 128]
        [--controllers greedy,greedy_stop,best_of_n] [--threads 2] [--out benchmarks/results/continuous_batching.json] [--set key=value ...]
Prints seconds both ways and their ratio per controller and budget and in all; writes the numbers as JSON (atomically).
"""
from __future__ import annotations
import argparse, os, sys, time
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import torch
from eval_batching import fill_prompt_cache, load_note, ordered_items, run_facts  # the same stated subset as the batching benchmark


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--fraction', type=float, default=0.5, help="share of each task's items (default 0.5)")
    ap.add_argument('--full', action='store_true', help="every item of the suite (fraction 1)")
    ap.add_argument('--batch', type=int, default=32, help="items per batch / in flight (evaluate.batch_items; default 32)")
    ap.add_argument('--budgets', default='128', help="token budgets, comma-separated (default 128)")
    ap.add_argument('--controllers', default='greedy,greedy_stop,best_of_n', help="training-free controllers, comma-separated")
    ap.add_argument('--threads', type=int, default=2, help="torch threads (default 2)")
    ap.add_argument('--out', default='benchmarks/results/continuous_batching.json')
    ap.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    try: budgets = [int(b) for b in a.budgets.split(',')]
    except ValueError: sys.exit(f"--budgets {a.budgets!r}: give token counts separated by commas, e.g. 64,128")
    torch.set_num_threads(a.threads)
    from research_controller.config import atomic_write_json, load_config
    from research_controller.controllers import baseline_names, make_controller
    from research_controller.engine import get_engine
    from research_controller.evaluate import build_suite, generate_batch_items, stream_items, streamable

    names = [n for n in a.controllers.split(',') if n]
    if bad := [n for n in names if n not in baseline_names()]: sys.exit(f"--controllers: unknown {bad}; choose from {baseline_names()}")
    cfg = load_config(overrides=[*a.overrides, f'engine.batch_size={a.batch}', f'slm.threads={a.threads}', 'baselines.candidate_cache_mb=0'])
    suite = build_suite(cfg, 'research')
    items, seeds = ordered_items(suite, a.fraction, a.full)
    eng = get_engine(cfg)
    print(f"suite {suite.name} [{suite.hash[:12]}]: {len(items)} of {len(suite)} items, budgets {budgets}, {a.batch} items per batch / in flight, "
          f"{a.threads} threads, {eng.dtype}")
    load0 = os.getloadavg()
    fill_prompt_cache(eng, items, a.batch)
    rows, k = [], 0
    for name in names:
        ctl = make_controller(name, cfg)
        if not streamable(ctl): sys.exit(f"{name} does not stream (evaluate.streamable): nothing to compare")
        for b in budgets:
            def batches():
                return [g for i in range(0, len(items), a.batch)
                        for g in generate_batch_items(ctl, items[i:i + a.batch], eng, b, seeds[i:i + a.batch])]
            def stream(): return stream_items(ctl, items, eng, b, seeds, a.batch)
            out = {}
            for way, fn in ([('batches', batches), ('stream', stream)] if k % 2 == 0 else [('stream', stream), ('batches', batches)]):
                f0, t = eng.counters['forward_calls'], time.perf_counter()
                gens = fn()
                out[way] = dict(seconds=time.perf_counter() - t, forward_calls=eng.counters['forward_calls'] - f0,
                                tokens=sum(g['tokens'] for g in gens), texts=[g['text'] for g in gens], errors=sum(bool(g['error']) for g in gens))
            k += 1
            same = sum(x == y for x, y in zip(out['batches'].pop('texts'), out['stream'].pop('texts')))
            r = dict(controller=name, budget=b, **{f'{w}_{key}': v for w, d in out.items() for key, v in d.items()},
                     ratio=out['batches']['seconds'] / out['stream']['seconds'], identical_texts=same, first='batches' if k % 2 else 'stream')
            rows.append(r)
            print(f"  {name:>12} @ {b:>3} tokens: batches {r['batches_seconds']:6.1f} s ({r['batches_forward_calls']} forwards), "
                  f"stream {r['stream_seconds']:6.1f} s ({r['stream_forward_calls']} forwards): {r['ratio']:.2f}x; "
                  f"tokens {r['batches_tokens']} / {r['stream_tokens']}; identical texts {same}/{len(items)}", flush=True)
    tb, ts = sum(r['batches_seconds'] for r in rows), sum(r['stream_seconds'] for r in rows)
    res = dict(benchmark='benchmarks/continuous_batching.py', suite=suite.name, suite_hash=suite.hash,
               subset='all items' if a.full else f"first {a.fraction:.0%} of each task's items (suite order), in evaluate.batch_order",
               items=len(items), rows=rows, batch_items=a.batch, engine_batch=a.batch, threads=a.threads,
               seconds_batches=tb, seconds_stream=ts, ratio=tb / ts, **run_facts(cfg, eng, load0))
    atomic_write_json(a.out, res)
    print(f"all: batches {tb:.1f} s, stream {ts:.1f} s: {res['ratio']:.2f}x; {load_note(res)}")
    print(f"wrote {a.out}")
    return res


if __name__ == '__main__':
    main()
