"""Self-play positions/s with episodes in lock step (`selfplay.batch_episodes`) against one episode at a time.

Side by side in one run, on the same episodes (same items, same seeds, same config apart from
`selfplay.batch_episodes`), interleaved repetitions, medians:

  1. the tiny random Llama (`tiny_slm`, float32) with small settings: the two modes must give the same
     episodes (actions and text), and the ratio shows what lock step saves in per-forward overhead;
  2. a short run on the default SLM (bfloat16 on CPU): batch shapes change bfloat16 rounding, so the
     episodes may differ; how many came out the same is reported.

Both modes run with `engine.batch_size = batch_episodes * mcts.leaf_batch`, so a joint expansion fits one
forward (one episode's leaf batch never exceeds `mcts.leaf_batch`, so this changes nothing one at a time).
Reported per mode: positions/s (wall and CPU time: the CPU ratio is the robust one on a shared machine),
SLM forwards, mean rows per forward; then the ratio batched/sequential (target: >= 4x positions/s).
When the two modes play an episode differently their position counts differ; positions/s stays comparable.

On CPU the ratio is bounded by the cost of a bfloat16 forward per row (about 52 ms at 1 row, 77 ms at 8,
115 ms at 16 on one core: one episode alone already averages ~3 rows per forward) and by the per-episode
prefill, which lock step does not batch; the tiny model is bound by its per-row vocabulary work (lm_head,
entropy and sampling over 49k tokens), which batching does not shrink.

Usage:  python benchmarks/selfplay_batching.py [--k 16] [--tiny-episodes 16] [--slm-episodes 16] [--reps 1]
        [--threads 1] [--reward length|default] [--skip-slm] [--skip-tiny] [--out benchmarks/results/selfplay_batching.json]
        [--set key=value ...]   (config overrides for both models, e.g. --set mcts.n_sims=8)
Writes the numbers as JSON (atomically) and prints a table. The default SLM must be cached (`load_slm`).
"""
from __future__ import annotations
from research_controller.config import atomic_write_json
import argparse, json, os, platform, statistics, tempfile, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import torch


def episodes_of(path, dim, cfg):
    "(prompt id, actions, text) of every committed episode, in order."
    from research_controller.buffer import ReplayBuffer
    from research_controller.macro_actions import N_ACTIONS
    with ReplayBuffer(path, dim, N_ACTIONS, cfg.buffer.capacity, cfg.buffer.dtype, readonly=True) as rb:
        return [(m['prompt_id'], m['actions'], m['text']) for m in map(rb.episode_meta, rb.episode_serials())]


def one_run(engine, cfg, k, episodes, reward_fn, items, d, tag):
    "One self-play run; returns its numbers."
    from research_controller.config import replace_config
    from research_controller.selfplay import run_selfplay
    c0, t0 = dict(engine.counters), (time.perf_counter(), time.process_time())
    sm = run_selfplay(replace_config(cfg, [f'selfplay.batch_episodes={k}']), episodes=episodes, buffer_path=Path(d)/tag, seed=0, progress=False,
                      reward_fn=reward_fn, engine=engine, items=items)
    wall, cpu = time.perf_counter() - t0[0], time.process_time() - t0[1]
    dc = {key: engine.counters[key] - c0.get(key, 0) for key in ('forward_calls', 'forwarded', 'padded')}
    return dict(k=k, episodes=sm.episodes, positions=sm.positions, seconds=wall, cpu_seconds=cpu,
                positions_per_s=sm.positions/wall, positions_per_cpu_s=sm.positions/cpu, mean_reward=sm.mean_reward,
                forward_calls=dc['forward_calls'], rows_per_forward=(dc['forwarded'] + dc['padded'])/max(dc['forward_calls'], 1),
                active_rows_per_forward=dc['forwarded']/max(dc['forward_calls'], 1), episodes_played=episodes_of(Path(d)/tag, engine.feature_dim, cfg))


def compare(name, engine, cfg, k, episodes, reward_fn, reps, items):
    "Both modes, interleaved `reps` times; medians and per-repetition ratios."
    runs = {1: [], k: []}
    with tempfile.TemporaryDirectory() as d:
        one_run(engine, cfg, k, min(k, episodes), reward_fn, items, d, 'warmup')  # allocations, embedder and reward models loaded
        for rep in range(reps):
            for kk in (1, k):
                r = one_run(engine, cfg, kk, episodes, reward_fn, items, d, f'{name}-{kk}-{rep}')
                runs[kk].append(r)
                print(f"  {name} rep {rep} batch_episodes={kk}: {r['positions']} positions in {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU): "
                      f"{r['positions_per_s']:.2f} positions/s, {r['forward_calls']} forwards of {r['rows_per_forward']:.1f} rows "
                      f"({r['active_rows_per_forward']:.1f} active)", flush=True)
    med = lambda xs: float(statistics.median(xs))
    row = lambda rs: {key: med([r[key] for r in rs]) for key in ('positions', 'seconds', 'cpu_seconds', 'positions_per_s', 'positions_per_cpu_s',
                                                                   'forward_calls', 'rows_per_forward', 'active_rows_per_forward', 'mean_reward')}
    same = [sum(a == b for a, b in zip(runs[1][i]['episodes_played'], runs[k][i]['episodes_played'])) for i in range(reps)]
    return dict(model=name, dtype=str(engine.model.dtype), episodes=episodes, k=k, reps=reps,
                sequential=row(runs[1]), batched=row(runs[k]),
                ratio=med([runs[k][i]['positions_per_s']/runs[1][i]['positions_per_s'] for i in range(reps)]),
                ratio_cpu=med([runs[k][i]['positions_per_cpu_s']/runs[1][i]['positions_per_cpu_s'] for i in range(reps)]),
                same_episodes=min(same), of=episodes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--k', type=int, default=16, help='selfplay.batch_episodes of the batched mode')
    ap.add_argument('--tiny-episodes', type=int, default=16)
    ap.add_argument('--slm-episodes', type=int, default=16)
    ap.add_argument('--reps', type=int, default=1, help='repetitions per mode (interleaved; medians reported)')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (more than the free cores makes small forwards stall: keep 1 on a shared machine)')
    ap.add_argument('--reward', choices=['length', 'default'], default='length',
                    help="reward of the default-SLM run: 'length' (LengthReward: isolates the search) or 'default' (RewardCalculator with the judge)")
    ap.add_argument('--skip-slm', action='store_true', help='only the tiny model')
    ap.add_argument('--skip-tiny', action='store_true', help='only the default SLM')
    ap.add_argument('--out', default='benchmarks/results/selfplay_batching.json')
    ap.add_argument('--set', action='append', default=[], help='config override key=value (both models)')
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from research_controller.config import load_config
    from research_controller.engine import Engine
    from research_controller.selfplay import LengthReward, selfplay_items
    from research_controller.slm import load_slm, tiny_slm
    base = load_config(overrides=a.set)
    lb = base.mcts.leaf_batch
    cfg = load_config(overrides=[*a.set, f'engine.batch_size={max(base.engine.batch_size, a.k*lb)}'])
    results = []
    # 1. tiny model, small settings: pooled-SLM drift (no sentence embedder), 4-token chunks, 24-token episodes
    tiny_cfg = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4', 'selfplay.max_new_tokens=24',
                                      *a.set, f'engine.batch_size={max(base.engine.batch_size, a.k*lb)}'])
    if not a.skip_tiny:
        tm, tt = tiny_slm(tiny_cfg, seed=0)
        print(f"tiny model: {a.tiny_episodes} episodes, batch_episodes {a.k}, n_sims {tiny_cfg.mcts.n_sims}, leaf_batch {lb}, "
              f"engine.batch_size {tiny_cfg.engine.batch_size}, {a.threads} threads", flush=True)
        results.append(compare('tiny', Engine(tm, tt, tiny_cfg), tiny_cfg, a.k, a.tiny_episodes, LengthReward(6), a.reps,
                               selfplay_items(tiny_cfg, a.tiny_episodes, 0)))
    # 2. the default SLM, default settings
    if not a.skip_slm:
        model, tok = load_slm(cfg)
        eng = Engine(model, tok, cfg)
        reward = LengthReward(12) if a.reward == 'length' else None
        print(f"default SLM {cfg.slm.source} ({model.dtype}): {a.slm_episodes} episodes, batch_episodes {a.k}, n_sims {cfg.mcts.n_sims}, "
              f"leaf_batch {lb}, engine.batch_size {cfg.engine.batch_size}, max_new_tokens {cfg.selfplay.max_new_tokens}, "
              f"drift {cfg.features.drift_embedder}, reward {a.reward}", flush=True)
        results.append(compare('default_slm', eng, cfg, a.k, a.slm_episodes, reward, a.reps, selfplay_items(cfg, a.slm_episodes, 0)))
    print("\n| model | mode | positions | s | CPU s | positions/s | positions/CPU s | forwards | rows/forward |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for mode in ('sequential', 'batched'):
            x = r[mode]
            print(f"| {r['model']} | {mode} (batch_episodes={1 if mode == 'sequential' else r['k']}) | {x['positions']:.0f} | {x['seconds']:.1f} | "
                  f"{x['cpu_seconds']:.1f} | {x['positions_per_s']:.2f} | {x['positions_per_cpu_s']:.2f} | {x['forward_calls']:.0f} | {x['rows_per_forward']:.1f} |")
    for r in results:
        print(f"{r['model']}: batched/sequential = {r['ratio']:.2f}x positions/s wall, {r['ratio_cpu']:.2f}x per CPU second (target >= 4x); "
              f"{r['same_episodes']}/{r['of']} episodes identical ({r['dtype']})")
    res = dict(benchmark='selfplay_batching', k=a.k, threads=a.threads, reward=a.reward, overrides=a.set, results=results,
               load_average=os.getloadavg(), machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), torch=torch.__version__),
               target='batched positions/s >= 4x sequential')
    out = atomic_write_json(a.out, res)
    print(f"wrote {out}")
    return res


if __name__ == '__main__':
    main()
