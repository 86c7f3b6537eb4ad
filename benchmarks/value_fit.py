"""How well does the value head fit outcomes it has not seen? Train/held-out losses of the policy/value network under a grid of training settings.

Reads a replay buffer written by self-play (for example the long run's `runs/learning_curve/buffer`), holds out a tenth
of its episodes by id (the same rule as `benchmarks/learning_curve.py`), trains a fresh network on the rest under each
setting of a small grid (optimiser steps, weight decay, dropout, value-loss weight, width), and prints, side by side, the
train and held-out value MSE against the held-out MSE of always predicting the training mean, the held-out policy
cross-entropy, and, when a probe file is given (`runs/learning_curve/probe.npz`: greedy's decisions on the research
suite), the rank correlation of the predicted value with the realised task score there. Nothing here touches the
eval split's answers beyond that probe; the grid is chosen on the held-out train-split episodes.

Usage:  python benchmarks/value_fit.py --buffer runs/learning_curve/buffer [--probe runs/learning_curve/probe.npz]
            [--out benchmarks/results/value_fit.json] [--set key=value ...]
"""
from __future__ import annotations
import argparse, itertools, json, math, shutil, sys, tempfile, time
from pathlib import Path

GRID = dict(steps=[25, 100, 400], weight_decay=[1e-4, 1e-1], dropout=[0.0, 0.3], value_weight=[1.0, 0.25], hidden=[64, 256])


sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_curve import held_out  # the long run's held-out rule, so both scripts hold out the same episodes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--buffer', required=True)
    ap.add_argument('--probe', default=None)
    ap.add_argument('--out', default='benchmarks/results/value_fit.json')
    ap.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    import numpy as np, torch
    from research_controller.config import load_config, ConfigError
    from research_controller.train import train, open_buffer, BufferData
    from research_controller.network import load_checkpoint, loss, make_evaluator
    from research_controller.macro_actions import ACTION_NAMES, N_ACTIONS
    from research_controller.evaluate import spearman
    src = Path(a.buffer)
    if not src.exists(): print(f"error: no replay buffer at {src}; give --buffer the long run's buffer directory.", file=sys.stderr); return 2
    tmp = Path(tempfile.mkdtemp()); buf = tmp/'buffer'; shutil.copytree(src, buf)  # a snapshot: the long run may still be writing
    with open_buffer(buf) as b: metas = [b.episode_meta(s) for s in b.episode_serials()]
    ids = [m['episode_id'] for m in metas]
    tr_ids, ho_ids = [i for i in ids if not held_out(i)], [i for i in ids if held_out(i)]
    def batch_of(idlist):
        with open_buffer(buf) as b:
            d = BufferData(b, idlist); rows = [d[i] for i in range(len(d))]
        return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}
    tr_b, ho_b = batch_of(tr_ids), batch_of(ho_ids)
    mean_mse = float(((ho_b['values'] - tr_b['values'].mean())**2).mean())
    probe = dict(np.load(a.probe)) if a.probe else None
    rows = []
    keys = list(GRID)
    for combo in itertools.product(*GRID.values()):
        s = dict(zip(keys, combo))
        try: cfg = load_config(overrides=a.sets + [f'train.steps={s["steps"]}', f'train.weight_decay={s["weight_decay"]}',
                                                  f'network.dropout={s["dropout"]}', f'train.value_weight={s["value_weight"]}',
                                                  f'network.hidden={s["hidden"]}'])
        except ConfigError as e: print(f"error: {e}", file=sys.stderr); return 2
        out = tmp/('run-' + '-'.join(map(str, combo)))
        r = train(cfg, buffer_path=buf, out_dir=out, episode_ids=tr_ids, resume=False, progress=False)
        net, _ = load_checkpoint(r.checkpoint, action_names=ACTION_NAMES); net.eval()
        with torch.no_grad(): _, ptr = loss(net, tr_b); _, pho = loss(net, ho_b)
        row = dict(s, train_value_mse=ptr['value'], held_out_value_mse=pho['value'], held_out_policy_ce=pho['policy'])
        if probe is not None:
            _, V = make_evaluator(net)(probe['X'], np.ones((len(probe['X']), N_ACTIONS), bool))
            row['probe_rho'] = float(spearman(V, probe['final']))
            sq = probe['task'] == 'squad'
            row['probe_rho_squad'] = float(spearman(V[sq], probe['final'][sq]))
        rows.append(row); print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    best = min(rows, key=lambda r: r['held_out_value_mse'])
    cols = keys + ['train_value_mse', 'held_out_value_mse', 'held_out_policy_ce'] + (['probe_rho', 'probe_rho_squad'] if probe is not None else [])
    print(f"\n{len(tr_ids)} training / {len(ho_ids)} held-out episodes ({len(tr_b['values'])} / {len(ho_b['values'])} positions); "
          f"held-out MSE of the training mean: {mean_mse:.4f}\n")
    print('| ' + ' | '.join(cols) + ' |\n|' + '---:|'*len(cols))
    for r in rows: print('| ' + ' | '.join(f"{r[c]:.4g}" for c in cols) + ' |')
    print(f"\nlowest held-out value MSE: {json.dumps({k: best[k] for k in keys})} -> {best['held_out_value_mse']:.4f} (training mean: {mean_mse:.4f})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(buffer=str(src), when=time.strftime('%Y-%m-%d %H:%M'), episodes=dict(train=len(tr_ids), held_out=len(ho_ids)),
                                           positions=dict(train=len(tr_b['values']), held_out=len(ho_b['values'])),
                                           held_out_mse_of_mean=mean_mse, rows=rows, best=best), indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"-> {a.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
