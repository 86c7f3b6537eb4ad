"""Thread policy: the same decode work alone and beside an identical twin process, for each torch thread setting.

Two `rc`-like processes on a 2-core machine can wreck each other: torch's OpenMP workers spin while they wait, so
two processes that each use every core spend much of their time spinning against each other. This benchmark
measures it side by side in one run, for each policy (torch threads, OpenMP wait policy):
  - single stream: 3 greedy generations of 32 tokens on a ~400-token prompt (the engine's greedy controller);
  - batched: one CONTINUE chunk of 32 tokens for 8 sampled states forked from that prompt (one forward per token);
each first alone, then as two identical processes started together (a file barrier lines up their timed parts).
It prints seconds, tokens/s and the slowdown beside a twin (target: <= 2.5x), then the policy `slm.threads`
should default to.

Usage:  python benchmarks/thread_twins.py [--reps 2] [--policies 1,2,2p] [--out benchmarks/results/thread_twins.json]
        (a policy is the thread count, with `p` for OMP_WAIT_POLICY=PASSIVE)
Needs the default SLM (cached by `load_slm`).
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, subprocess, sys, tempfile, time
from pathlib import Path


def worker(threads:int, barrier:str, n_peers:int) -> dict:
    "Load the SLM with `threads` torch threads, wait for the peers, time the single-stream and batched work."
    os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    from research_controller.config import load_config
    from research_controller.slm import load_slm
    from research_controller.engine import Engine
    from research_controller.controllers import make_controller
    from research_controller.macro_actions import Action
    from research_controller.rewards import load_task_items
    cfg = load_config(overrides=[f'slm.threads={threads}', 'macro.max_new_tokens=32'])
    model, tok = load_slm(cfg)
    import torch
    eng = Engine(model, tok, cfg)
    items = load_task_items(cfg, 'squad', 'train', n=40, seed=0)
    prompt = max(items, key=lambda it: len(it['prompt']))['prompt']  # the longest of 40 SQuAD passages (~400 tokens)
    greedy = make_controller('greedy', cfg)
    greedy.generate(eng, prompt, max_new_tokens=4)  # warm-up (allocations)
    Path(barrier, f'ready{os.getpid()}').touch()
    while len(list(Path(barrier).glob('ready*'))) < n_peers: time.sleep(0.01)
    t = time.perf_counter(); n1 = 0
    for _ in range(3): n1 += greedy.generate(eng, prompt, max_new_tokens=32).tokens
    single = time.perf_counter() - t
    root = eng.new_state(prompt, max_new_tokens=32, temperature=1.0, seed=0)
    kids = [eng.fork(root, seed=i) for i in range(8)]
    t = time.perf_counter()
    eng.step_batch(kids, [Action.CONTINUE]*8)
    batched = time.perf_counter() - t
    n8 = sum(eng.tokens_spent(k) for k in kids)
    return dict(threads=torch.get_num_threads(), prompt_tokens=root.tip.end, single_s=single, single_tok_s=n1/single,
                batched_s=batched, batched_tok_s=n8/batched, wait_policy=os.environ.get('OMP_WAIT_POLICY', ''))


def run_group(policy:str, n:int) -> list[dict]:
    "Start `n` identical workers under `policy` together; their results (the timed parts overlap)."
    threads, passive = int(policy.rstrip('p')), policy.endswith('p')
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop('OMP_WAIT_POLICY', None)
    if passive: env['OMP_WAIT_POLICY'] = 'PASSIVE'
    with tempfile.TemporaryDirectory() as d:
        ps = [subprocess.Popen([sys.executable, __file__, '--worker', str(threads), d, str(n)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
        outs = [p.communicate()[0] for p in ps]
    res = []
    for p, o in zip(ps, outs):
        if p.returncode != 0: raise SystemExit(f"worker ({policy}, {n} processes) failed with exit code {p.returncode}")
        res.append(json.loads(o.strip().splitlines()[-1]))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--reps', type=int, default=2, help='repetitions of every (policy, alone/twin) group, interleaved; medians reported')
    ap.add_argument('--policies', default='1,2,2p', help="comma-separated: thread count, 'p' suffix = OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument('--out', default='benchmarks/results/thread_twins.json')
    ap.add_argument('--worker', nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(int(a.worker[0]), a.worker[1], int(a.worker[2])))); return
    from research_controller.config import atomic_write_json
    pols = [p.strip() for p in a.policies.split(',') if p.strip()]
    runs = {(p, n): [] for p in pols for n in (1, 2)}
    for rep in range(a.reps):
        for p in pols:
            for n in (1, 2):
                rs = run_group(p, n); runs[(p, n)].append(rs)
                singles = ', '.join(f"{r['single_s']:.2f}" for r in rs); batched = ', '.join(f"{r['batched_tok_s']:.0f}" for r in rs)
                print(f"  rep {rep} policy {p:>3} x{n}: single {singles} s, batched {batched} tok/s", flush=True)
    med = lambda xs: float(statistics.median(xs))
    table = {}
    for p in pols:
        alone, twin = runs[(p, 1)], runs[(p, 2)]
        s1, s2 = med([g[0]['single_s'] for g in alone]), med([r['single_s'] for g in twin for r in g])
        b1, b2 = med([g[0]['batched_tok_s'] for g in alone]), med([r['batched_tok_s'] for g in twin for r in g])
        table[p] = dict(threads=int(p.rstrip('p')), omp_wait_policy='PASSIVE' if p.endswith('p') else 'default',
                        single_alone_s=s1, single_twin_s=s2, single_slowdown=s2/s1,
                        single_alone_tok_s=med([g[0]['single_tok_s'] for g in alone]),
                        batched_alone_tok_s=b1, batched_twin_tok_s=b2, batched_slowdown=b1/b2,
                        batched_twin_total_tok_s=med([sum(r['batched_tok_s'] for r in g) for g in twin]))
    ok = [p for p, r in table.items() if max(r['single_slowdown'], r['batched_slowdown']) <= 2.5]
    best = max(ok or table, key=lambda p: table[p]['single_alone_tok_s'])
    res = dict(benchmark='thread_twins', reps=a.reps, prompt_tokens=runs[(pols[0], 1)][0][0]['prompt_tokens'],
               machine=dict(cpu_count=os.cpu_count(), platform=platform.platform()), load_average_end=os.getloadavg(),
               policies=table, target='slowdown beside a twin <= 2.5x', within_target=ok, fastest_within_target=best,
               raw={f'{p}x{n}': v for (p, n), v in runs.items()})
    print("\n| threads | OMP wait | single alone s | beside twin s | slowdown | batched alone tok/s | beside twin | slowdown | two twins total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, r in table.items():
        print(f"| {r['threads']} | {r['omp_wait_policy']} | {r['single_alone_s']:.2f} | {r['single_twin_s']:.2f} | {r['single_slowdown']:.2f}x | "
              f"{r['batched_alone_tok_s']:.0f} | {r['batched_twin_tok_s']:.0f} | {r['batched_slowdown']:.2f}x | {r['batched_twin_total_tok_s']:.0f} |")
    print(f"\nwithin the 2.5x target: {ok or 'none'}; fastest alone among them: {best}")
    print(f"wrote {atomic_write_json(a.out, res)}")
    return res


if __name__ == '__main__':
    main()
