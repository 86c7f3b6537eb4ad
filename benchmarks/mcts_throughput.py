"""MCTS throughput on the real SLM, and training throughput of both network bodies.

Measures, side by side in one run (interleaved repetitions, medians):
  1. simulations/s and SLM tokens/s inside one search at 8, 32 and 128 simulations per decision
     (leaf_batch 8, root Dirichlet noise, untrained policy/value network as evaluator); the cost per
     simulation at 128 relative to 8 (target: <= 1.2x);
  2. batched leaf evaluation (leaf_batch 8) against sequential (leaf_batch 1) at 32 simulations
     (target: >= 2x simulations/s);
  3. training samples/s of the mlp and recursive bodies (train.batch_size, the default feature size);
  4. SLM tokens/s during search (32 simulations, leaf batch 8) against the engine's batched throughput at the
     same width (8 forked states, one CONTINUE chunk), interleaved on the same prompts (target: >= 0.6x), and where
     a search's time goes: inside the SLM forward (transformer + lm_head), in the engine around it (per-token
     Python, cache assembly, statistics), and outside the engine (features, drift embeddings, network, tree)
     (target: outside the SLM forward <= 25%); with the active rows per forward that explain the ratio.

Usage:  python benchmarks/mcts_throughput.py [--reps 3] [--threads 2] [--out benchmarks/results/mcts_throughput.json]
        [--set key=value ...]   (config overrides, e.g. --set features.drift_embedder=slm)
Writes the numbers as JSON (atomically) and prints a table. Needs the default SLM (cached by `load_slm`).
"""
from __future__ import annotations
from research_controller.config import atomic_write_json
import argparse, json, os, platform, statistics, sys, tempfile, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import numpy as np
import torch


def _zero_reward(text, item=None, n_tokens=None, unclosed_thought=False): return 0.0


def search_once(engine, net_eval, cfg, prompt, n_sims, leaf_batch, seed, clock=None):
    "One search from a fresh root; returns (seconds, simulations, tokens, SLM forward calls, max depth, expansions)."
    from research_controller.config import replace_config
    from research_controller.mcts import MCTS, SearchLog
    from research_controller.selfplay import SelfPlayEnv
    c = replace_config(cfg, [f'mcts.leaf_batch={leaf_batch}'])
    # every finished text is worth -1 (reward 0 on the range (0, 1)): simulations then do not pile onto terminal children
    # (free revisits of a STOP or EOS leaf), they expand real continuations, which is the cost being measured
    env = SelfPlayEnv(engine, _zero_reward, dict(id='bench', task='wikitext', prompt=prompt, references=[]), bounds=(0.0, 1.0))
    root = env.root(max_new_tokens=c.macro.max_new_tokens, seed=seed)
    env.features(root)  # the root's features are computed before the clock starts (every decision has them already)
    sl = SearchLog()
    m = MCTS(env, net_eval, c.mcts, seed=seed, callbacks=[sl])
    calls0 = engine.counters['forward_calls']
    k0 = clock.read() if clock else None  # the root's prefill is not part of the search
    t, c0 = time.perf_counter(), time.process_time()
    r = m.search(root, add_noise=True, n_sims=n_sims, early_stop=False)
    dt, cpu = time.perf_counter() - t, time.process_time() - c0
    if clock: clock.last = tuple(b - a for a, b in zip(k0, clock.read()))  # (SLM forward s, step_batch s) inside the search
    depth, stack = 0, [(m.root, 0)]
    while stack:
        nd, d = stack.pop(); depth = max(depth, d)
        stack += [(ch, d + 1) for ch in nd.children if ch is not None]
    return dt, r.n_sims_done, r.tokens_spent, engine.counters['forward_calls'] - calls0, depth, sum(b['leaves'] for b in sl.batches), cpu


class ForwardClock:
    "Times every call of the SLM's transformer and lm_head, and of `Engine.step_batch` (the engine around them)."
    def __init__(self, engine):
        self.fwd = self.eng = 0.0
        m, self.engine = engine.model, engine
        for mod in (m.model, m.lm_head): mod.forward = self._wrap(mod.forward, 'fwd')
        engine.step_batch = self._wrap(engine.step_batch, 'eng')
    def _wrap(self, f, attr):
        def g(*a, **k):
            t = time.perf_counter()
            try: return f(*a, **k)
            finally: setattr(self, attr, getattr(self, attr) + time.perf_counter() - t)
        return g
    def read(self): return self.fwd, self.eng


def engine_batched(engine, cfg, prompt, width, seed):
    "(seconds, tokens, forwards) of one CONTINUE chunk for `width` sampled states forked from `prompt` (the engine's batched step)."
    from research_controller.macro_actions import Action
    root = engine.new_state(prompt, max_new_tokens=cfg.macro.max_new_tokens, temperature=1.0, seed=seed)
    kids = [engine.fork(root, seed=seed*100 + i) for i in range(width)]
    c0, f0 = dict(engine.counters), engine.counters['forward_calls']
    t = time.perf_counter()
    engine.step_batch(kids, [Action.CONTINUE]*width)
    return time.perf_counter() - t, engine.counters['forwarded'] - c0['forwarded'], engine.counters['forward_calls'] - f0


def train_throughput(body, cfg, reps, steps=30):
    "Training samples/s of one body on a synthetic buffer of the default feature size."
    from research_controller.config import replace_config
    from research_controller.buffer import ReplayBuffer
    from research_controller.macro_actions import N_ACTIONS
    from research_controller.network import synthetic_batch
    from research_controller.train import BufferData, Trainer, open_buffer
    dim = 582
    with tempfile.TemporaryDirectory() as d:
        b = synthetic_batch(4096, dim=dim, seed=0)
        with ReplayBuffer(Path(d)/'buf', dim, N_ACTIONS, capacity=4096, dtype='float16') as rb:
            for e in range(64):
                s = slice(e*64, (e + 1)*64)
                rb.add_episode(b['states'][s], b['masks'][s], b['policies'][s], b['values'][s],
                               dict(episode_id=f'e{e}', controller_version='bench', slm_fingerprint='0'*16))
        with open_buffer(Path(d)/'buf') as rb: data = BufferData(rb)
        c = replace_config(cfg, [f'network.body={body}', f'paths.runs_dir={d}/runs', f'train.checkpoint_every={10**6}'])
        out = []
        for rep in range(reps):
            tr = Trainer(c, data, Path(d)/f'{body}{rep}', steps + 3)
            from research_controller.train import make_loader
            it = iter(make_loader(data, c, 0, steps + 3))
            for _ in range(3): tr.train_step(next(it))  # warm-up
            t = time.perf_counter()
            for _ in range(steps): tr.train_step(next(it))
            out.append(steps*c.train.batch_size/(time.perf_counter() - t))
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--reps', type=int, default=3, help='repetitions per setting (interleaved; medians reported)')
    ap.add_argument('--threads', type=int, default=2, help='torch threads')
    ap.add_argument('--out', default='benchmarks/results/mcts_throughput.json')
    ap.add_argument('--set', action='append', default=[], help='config override key=value')
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from research_controller.config import load_config
    from research_controller.slm import load_slm
    from research_controller.engine import Engine
    from research_controller.macro_actions import N_ACTIONS
    from research_controller.network import PolicyValueNet, make_evaluator
    from research_controller.rewards import load_task_items
    cfg = load_config(overrides=a.set)
    model, tok = load_slm(cfg)
    engine = Engine(model, tok, cfg)
    torch.manual_seed(0)
    ev = make_evaluator(PolicyValueNet(engine.feature_dim, N_ACTIONS, cfg.network))
    prompts = [it['prompt'] for it in load_task_items(cfg, 'wikitext', 'train', n=a.reps + 1, seed=0)]
    print(f"SLM {cfg.slm.source} ({model.dtype}), feature_dim {engine.feature_dim}, chunk {cfg.macro.chunk_tokens} tokens, "
          f"drift {cfg.features.drift_embedder}, {a.threads} threads", flush=True)
    for n, lb in ((8, 8), (32, 8), (8, 1)): search_once(engine, ev, cfg, prompts[-1], n, lb, 0)  # warm-up (allocations, MiniLM load)

    settings = [(8, 8), (32, 8), (128, 8), (32, 1)]
    runs = {s: [] for s in settings}
    for rep in range(a.reps):  # interleaved, so machine load hits every setting alike
        for n, lb in settings:
            runs[(n, lb)].append(search_once(engine, ev, cfg, prompts[rep], n, lb, rep))
            dt, sims, toks, calls, depth, leaves, cpu = runs[(n, lb)][-1]
            print(f"  rep {rep} n_sims={n:3d} leaf_batch={lb}: {dt:6.2f} s ({cpu:6.2f} s CPU), {sims/dt:6.2f} sims/s, {toks/dt:6.1f} tok/s, "
                  f"{leaves} expansions, {toks} tokens, {calls} forwards, depth {depth}", flush=True)

    med = lambda xs: float(statistics.median(xs))
    rows = {}
    for (n, lb), rs in runs.items():
        rows[f'n{n}_lb{lb}'] = dict(n_sims=n, leaf_batch=lb, seconds=med([r[0] for r in rs]),
                                   sims_per_s=med([r[1]/r[0] for r in rs]), tokens_per_s=med([r[2]/r[0] for r in rs]),
                                   ms_per_sim=med([1000*r[0]/r[1] for r in rs]), tokens_per_sim=med([r[2]/r[1] for r in rs]),
                                   forward_calls=med([r[3] for r in rs]), max_depth=med([r[4] for r in rs]),
                                   expansions=med([r[5] for r in rs]), ms_per_token=med([1000*r[0]/max(r[2], 1) for r in rs]),
                                   cpu_seconds=med([r[6] for r in rs]), cpu_ms_per_sim=med([1000*r[6]/r[1] for r in rs]),
                                   cpu_ms_per_token=med([1000*r[6]/max(r[2], 1) for r in rs]))
    # ratios per repetition (the settings of one repetition ran back to back), then their median
    per_rep = lambda f: med([f(i) for i in range(a.reps)])
    R = lambda n, lb, i: runs[(n, lb)][i]
    cost_ratio = per_rep(lambda i: (R(128, 8, i)[0]/R(128, 8, i)[1])/(R(8, 8, i)[0]/R(8, 8, i)[1]))
    cpu_cost_ratio = per_rep(lambda i: (R(128, 8, i)[6]/R(128, 8, i)[1])/(R(8, 8, i)[6]/R(8, 8, i)[1]))
    token_cost_ratio = per_rep(lambda i: (R(128, 8, i)[0]/R(128, 8, i)[2])/(R(8, 8, i)[0]/R(8, 8, i)[2]))
    batch_speedup = per_rep(lambda i: (R(32, 8, i)[1]/R(32, 8, i)[0])/(R(32, 1, i)[1]/R(32, 1, i)[0]))
    cpu_batch_speedup = per_rep(lambda i: (R(32, 8, i)[1]/R(32, 8, i)[6])/(R(32, 1, i)[1]/R(32, 1, i)[6]))
    clock = ForwardClock(engine)
    vs = dict(search=[], engine=[], split=[])
    for rep in range(a.reps):  # search and the engine's batched step, interleaved on the same prompt
        c0 = dict(engine.counters)
        dt, sims, toks, calls, depth, leaves, cpu = search_once(engine, ev, cfg, prompts[rep], 32, 8, 100 + rep, clock=clock)
        fwd, eng_s = clock.last  # SLM forward and step_batch seconds inside the search
        rows_fw, pad = engine.counters['forwarded'] - c0['forwarded'], engine.counters['padded'] - c0['padded']
        vs['search'].append(dict(seconds=dt, tokens=toks, forwards=calls, tok_s=toks/dt, active_rows_per_forward=rows_fw/max(calls, 1),
                                 padded_rows_per_forward=pad/max(calls, 1)))
        vs['split'].append(dict(slm_forward=fwd/dt, engine_other=(eng_s - fwd)/dt, outside_engine=(dt - eng_s)/dt))
        edt, etoks, ecalls = engine_batched(engine, cfg, prompts[rep], 8, rep)
        vs['engine'].append(dict(seconds=edt, tokens=etoks, forwards=ecalls, tok_s=etoks/edt, active_rows_per_forward=etoks/max(ecalls, 1)))
        print(f"  rep {rep} search 32 sims: {toks/dt:6.1f} tok/s ({rows_fw/max(calls, 1):.1f} active + {pad/max(calls, 1):.1f} padded rows per forward); "
              f"engine batched x8: {etoks/edt:6.1f} tok/s; search time in SLM forward {fwd/dt:.0%}, engine other "
              f"{(eng_s - fwd)/dt:.0%}, outside the engine {(dt - eng_s)/dt:.0%}", flush=True)
    search_vs_engine = dict(
        ratio=per_rep(lambda i: vs['search'][i]['tok_s']/vs['engine'][i]['tok_s']), target='>= 0.6',
        search_tok_s=med([x['tok_s'] for x in vs['search']]), engine_tok_s=med([x['tok_s'] for x in vs['engine']]),
        search_active_rows_per_forward=med([x['active_rows_per_forward'] for x in vs['search']]),
        search_padded_rows_per_forward=med([x['padded_rows_per_forward'] for x in vs['search']]),
        search_ms_per_forward=med([1000*x['seconds']/max(x['forwards'], 1) for x in vs['search']]),
        engine_ms_per_forward=med([1000*x['seconds']/max(x['forwards'], 1) for x in vs['engine']]),
        time_split={k: med([x[k] for x in vs['split']]) for k in ('slm_forward', 'engine_other', 'outside_engine')},
        outside_slm_forward=med([1 - x['slm_forward'] for x in vs['split']]), outside_target='<= 0.25', raw=vs)
    train_rows = {}
    for body in ('mlp', 'recursive'):
        xs = train_throughput(body, cfg, a.reps)
        train_rows[body] = dict(samples_per_s=med(xs), batch_size=cfg.train.batch_size, reps=xs)
    res = dict(benchmark='mcts_throughput', slm=cfg.slm.source, dtype=str(model.dtype), feature_dim=engine.feature_dim,
               chunk_tokens=cfg.macro.chunk_tokens, drift_embedder=cfg.features.drift_embedder, threads=a.threads, reps=a.reps,
               machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), torch=torch.__version__),
               search=rows, cost_per_sim_128_vs_8=cost_ratio, cost_per_sim_128_vs_8_cpu=cpu_cost_ratio, cost_per_token_128_vs_8=token_cost_ratio,
               leaf_batch_8_vs_1_speedup_cpu=cpu_batch_speedup, load_average=os.getloadavg(), leaf_batch_8_vs_1_speedup=batch_speedup,
               train=train_rows, search_vs_engine=search_vs_engine,
               targets=dict(cost_per_sim_128_vs_8='<= 1.2', leaf_batch_8_vs_1_speedup='>= 2', search_vs_engine='>= 0.6',
                            outside_slm_forward='<= 0.25'),
               overrides=a.set)
    print("\n| n_sims | leaf_batch | sims/s | SLM tok/s | ms/sim | ms/token | tok/sim | expansions | max depth |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['n_sims']} | {r['leaf_batch']} | {r['sims_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['ms_per_sim']:.0f} | "
              f"{r['ms_per_token']:.1f} | {r['tokens_per_sim']:.1f} | {r['expansions']:.0f} | {r['max_depth']:.0f} |")
    print(f"\ncost per simulation, 128 vs 8 sims: {cost_ratio:.2f}x wall, {cpu_cost_ratio:.2f}x CPU (target <= 1.2x); per SLM token: {token_cost_ratio:.2f}x")
    print(f"leaf_batch 8 vs 1 at 32 sims: {batch_speedup:.2f}x sims/s wall, {cpu_batch_speedup:.2f}x CPU (target >= 2x)")
    sv = search_vs_engine
    print(f"search vs the engine's batched step at width 8: {sv['search_tok_s']:.1f} vs {sv['engine_tok_s']:.1f} tok/s = {sv['ratio']:.2f}x (target >= 0.6x); "
          f"{sv['search_active_rows_per_forward']:.1f} active rows per search forward ({sv['search_ms_per_forward']:.0f} ms) vs 8 ({sv['engine_ms_per_forward']:.0f} ms)")
    print(f"search time: SLM forward {sv['time_split']['slm_forward']:.0%}, engine around it {sv['time_split']['engine_other']:.0%}, "
          f"outside the engine {sv['time_split']['outside_engine']:.0%} (outside the SLM forward: {sv['outside_slm_forward']:.0%}, target <= 25%)")
    print(f"load average during the run: {os.getloadavg()} on {os.cpu_count()} cores (CPU-time ratios are the robust ones on a shared machine)")
    for b, r in train_rows.items(): print(f"training, {b} body: {r['samples_per_s']:.0f} samples/s (batch {r['batch_size']})")
    out = atomic_write_json(a.out, res)
    print(f"wrote {out}")
    return res


if __name__ == '__main__':
    main()
