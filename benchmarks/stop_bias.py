"""Does an untrained search stop too early? Self-play with the network's leaf values (0 before training) against rollout values.

Before any training the network values every unfinished search leaf at 0 (the middle of the reward range), while a
finished leaf scores its real reward. This script plays the same train-split items with the same seeds under both
`selfplay.leaf_value` settings, cycle-1 conditions (no checkpoint: uniform priors), and prints, side by side, how
often the played episode stops at its first decision or within its first chunk, the visit share the searches gave
STOP (the policy target the network would learn), the task score and reward of the played answers, and the tokens and
seconds spent.

Usage:  python benchmarks/stop_bias.py [--episodes 24] [--batch 8] [--out benchmarks/results/stop_bias.json]
            [--set rewards.w_coherence=0 ...]
"""
from __future__ import annotations
import argparse, json, sys, tempfile, time
from pathlib import Path


def summarise(buf_path, summary, chunk:int) -> dict:
    import numpy as np
    from research_controller.train import open_buffer, BufferData
    from research_controller.macro_actions import ACTION_NAMES
    with open_buffer(buf_path) as b:
        metas = [b.episode_meta(s) for s in b.episode_serials()]
        d = BufferData(b)
        P = np.stack([d[i]['policies'].numpy() for i in range(len(d))])
    first = [m['actions'][0] for m in metas]
    stop = ACTION_NAMES.index('STOP')
    by_task = {}
    for m in metas: by_task.setdefault(m['task'], []).append(float(m['reward_terms'].get('task', float('nan'))))
    return dict(episodes=len(metas), positions=int(len(P)),
                first_move_stop=float(np.mean([a == 'STOP' for a in first])),
                ended_within_first_chunk=float(np.mean([m['tokens'] <= chunk for m in metas])),
                empty_answers=int(sum(not m['text'].strip() for m in metas)),
                stop_visit_share=float(P[:, stop].mean()),
                first_decision_stop_share=float(np.mean([P[i, stop] for i in np.cumsum([0] + [len(m['actions']) for m in metas[:-1]])])),
                task_score=float(np.nanmean([float(m['reward_terms'].get('task', float('nan'))) for m in metas])),
                task_by_task={k: round(float(np.nanmean(v)), 4) for k, v in by_task.items()},
                reward=float(np.mean([m['reward'] for m in metas])),
                path_tokens=float(np.mean([m['tokens'] for m in metas])),
                search_tokens=float(np.mean([m['search_tokens'] for m in metas])),
                seconds=round(summary.seconds, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--episodes', type=int, default=24)
    ap.add_argument('--batch', type=int, default=8, help='selfplay.batch_episodes (episodes in lock step)')
    ap.add_argument('--seed', type=int, default=7)
    ap.add_argument('--out', default='benchmarks/results/stop_bias.json')
    ap.add_argument('--set', dest='sets', action='append', default=['rewards.w_coherence=0'], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    from research_controller.config import load_config, ConfigError
    from research_controller.selfplay import run_selfplay
    try: cfgs = {lv: load_config(overrides=a.sets + [f'selfplay.batch_episodes={a.batch}', f'selfplay.leaf_value={lv}']) for lv in ('network', 'rollout')}
    except ConfigError as e: print(f"error: {e}", file=sys.stderr); return 2
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lv, c in cfgs.items():
            path = Path(tmp)/lv
            s = run_selfplay(c, None, episodes=a.episodes, buffer_path=path, seed=a.seed, progress=True)
            out[lv] = summarise(path, s, c.macro.chunk_tokens)
            print(lv, json.dumps(out[lv]))
    keys = ['first_move_stop', 'ended_within_first_chunk', 'empty_answers', 'stop_visit_share', 'first_decision_stop_share',
            'task_score', 'reward', 'path_tokens', 'search_tokens', 'seconds']
    print(f"\n| leaf value | " + ' | '.join(keys) + ' |\n|---|' + '---:|'*len(keys))
    for lv, r in out.items(): print(f"| {lv} | " + ' | '.join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + ' |')
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(args=vars(a), when=time.strftime('%Y-%m-%d %H:%M'), results=out), indent=1))
    print(f"-> {a.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
