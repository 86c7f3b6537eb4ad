"""The long run: many self-play -> train cycles, each network evaluated on the research suite, drawn as a learning curve.

Each cycle (resumable after a kill: every stage writes its output under --out and is skipped when it is there):
  1. self-play: `--episodes` train-split episodes with the latest network (none in cycle 1: uniform priors), played
     `--batch` at a time in lock step, added to one replay buffer (`<out>/buffer`);
  2. train: a fresh network on every position so far except a held-out tenth of the episodes (by id), reporting the
     train and held-out value and policy losses;
  3. evaluate: the network as a policy controller (argmax of its policy at each decision) on the research suite at
     `--budget` tokens per item, task score per task, paired against greedy's stored result on the same suite;
  4. value quality on eval-split positions: at every decision of greedy's answers to the research suite (computed once,
     `<out>/probe.npz`), the rank correlation of the predicted value with the item's realised task score, and the AUC of
     the network's STOP probability for "stopping here beats continuing" (the prefix's task score against the final one).
After the last cycle (`--search-last`, `--value-guided-last K`), the final network also runs as an MCTS search controller
and as value-guided decoding (`controllers.ValueGuided`) on the suite.
The curve (`curve.png`: task score against self-play positions, with greedy, best-of-N, self-consistency, the stop
rule and the shipped think gate as lines from their stored research results) and `report.md` are rewritten after
every cycle.

Usage:  python benchmarks/learning_curve.py --out runs/learning_curve --cycles 6 --episodes 48 --batch 16 \
            --set rewards.w_coherence=0 --set selfplay.leaf_value=rollout --set slm.threads=1
"""
from __future__ import annotations
import argparse, hashlib, json, math, os, sys, time
from pathlib import Path
from typing import Callable
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts: gate_quality.auc

BASELINES = {  # label -> stored research result at 64 tokens (the suite hash is checked)
    'greedy': 'benchmarks/results/research_smollm2/budgets/greedy__{b}tok.json',
    'greedy_stop': 'benchmarks/results/research_smollm2/budgets/greedy_stop__{b}tok.json',
    'best_of_n': 'benchmarks/results/research_smollm2/budgets/best_of_n__{b}tok.json',
    'self_consistency': 'benchmarks/results/research_smollm2/budgets/self_consistency__{b}tok.json',
    'think_gate (v4)': 'benchmarks/results/research_smollm2_gate_v4/budgets/think_gate__{b}tok.json',
}


def atomic_json(path:Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + '.tmp'); tmp.write_text(json.dumps(obj, indent=1, default=float)); os.replace(tmp, path)


def held_out(eid:str) -> bool:
    "A tenth of the episodes, fixed by id, never trained on (the held-out value loss)."
    return int(hashlib.sha256(eid.encode()).hexdigest()[:8], 16) % 10 == 0


def task_means(res) -> dict:
    import numpy as np
    by = {}
    for r in res.records: by.setdefault(r.task, []).append(r.value('task'))
    out = {t: float(np.nanmean(v)) for t, v in sorted(by.items())}
    out['all'] = float(np.nanmean([r.value('task') for r in res.records]))
    return out


def build_probe(cfg, suite, path:Path, budget:int) -> dict:
    "Greedy's decisions on the suite: features, STOP legality, prefix and final task scores (computed once)."
    import numpy as np
    from tqdm.auto import tqdm
    from research_controller.evaluate import default_engine, default_rewards, TASK_METRIC
    from research_controller.macro_actions import Action
    if path.exists(): return dict(np.load(path, allow_pickle=False))
    eng = default_engine(cfg); rw = default_rewards(cfg, eng)
    items = list(suite.items)
    X, M, prefix, final, task, item_ix = [], [], [], [], [], []
    bs = 16
    for k in tqdm(range(0, len(items), bs), desc='probe (greedy decisions)', unit='batch'):
        chunk = items[k:k + bs]
        states = eng.new_states([it['prompt'] for it in chunk], budget)
        while any(not eng.is_done(s) for s in states):
            live = [i for i, s in enumerate(states) if not eng.is_done(s)]
            kids = eng.expand([states[i] for i in live], [Action.CONTINUE]*len(live))
            for i, c in zip(live, kids): states[i] = c
        for j, (it, s) in enumerate(zip(chunk, states)):
            metric = TASK_METRIC.get(it['task'], 'task')
            score = lambda text: float(rw.task_metrics(text, it).get(metric, math.nan))
            tr = eng.trace(s)
            feats = eng.decision_features(s, drift=True)
            fin = score(eng.result(s).text)
            text = ''
            for d, f in zip(tr, feats):
                X.append(f); M.append(True); prefix.append(score(text)); final.append(fin); task.append(it['task']); item_ix.append(k + j)
                if d['action'] == 'CONTINUE': text += d['chunk']
    out = dict(X=np.stack(X).astype(np.float32), prefix=np.array(prefix), final=np.array(final), task=np.array(task), item=np.array(item_ix))
    np.savez(path, **out)
    return out


def value_quality(ckpt:Path, probe:dict) -> dict:
    "Spearman(value, realised task score) on the probe positions, per task and overall; AUC of P(STOP) for 'stopping here beats continuing'."
    import numpy as np, torch
    from research_controller.network import load_checkpoint, make_evaluator
    from research_controller.macro_actions import ACTION_NAMES, N_ACTIONS
    from research_controller.evaluate import spearman
    from gate_quality import auc  # the same AUC (ties count one half) as the think gate's quality report
    net, _ = load_checkpoint(ckpt, action_names=ACTION_NAMES)
    ev = make_evaluator(net)
    X = probe['X']; masks = np.ones((len(X), N_ACTIONS), bool)
    P, V = ev(X, masks)
    stop = ACTION_NAMES.index('STOP')
    out = {}
    for t in ['all'] + sorted(set(probe['task'].tolist())):
        sel = np.ones(len(X), bool) if t == 'all' else probe['task'] == t
        rho = spearman(V[sel], probe['final'][sel])
        diff = probe['prefix'][sel] - probe['final'][sel]
        lab = np.where(diff > 0, 1, np.where(diff < 0, 0, -1))
        keep = lab >= 0
        out[t] = dict(n=int(sel.sum()), rho=float(np.asarray(rho).reshape(-1)[0]),
                      stop_auc=auc(P[sel][:, stop][keep], lab[keep] == 1), stop_pairs=int(keep.sum()),
                      mean_value=float(V[sel].mean()), mean_p_stop=float(P[sel][:, stop].mean()))
    return out


def heldout_losses(ckpt:Path, buf_path:Path, train_ids:list, held_ids:list) -> dict:
    import torch
    from research_controller.network import load_checkpoint, loss
    from research_controller.macro_actions import ACTION_NAMES
    from research_controller.train import open_buffer, BufferData
    net, _ = load_checkpoint(ckpt, action_names=ACTION_NAMES); net.eval()
    out = {}
    with open_buffer(buf_path) as b:
        for name, ids in (('train', train_ids), ('held_out', held_ids)):
            if not ids: continue
            d = BufferData(b, ids)
            rows = [d[i] for i in range(len(d))]
            batch = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}
            with torch.no_grad(): _, parts = loss(net, batch)
            out[name] = dict(positions=len(d), value_mse=parts['value'], policy_ce=parts['policy'])
    return out


def plot(state:dict, baselines:dict, out:Path) -> None:
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cyc = [c for c in state['cycles'] if 'policy' in c]
    if not cyc: return
    tasks = ['all', 'squad', 'wikitext', 'nq_open', 'gsm8k']
    fig, axes = plt.subplots(1, len(tasks), figsize=(4*len(tasks), 3.4))
    for ax, t in zip(axes, tasks):
        x = [c['positions_total'] for c in cyc]
        ax.plot(x, [c['policy']['task'].get(t, math.nan) for c in cyc], 'o-', color='black', label='learned policy')
        if any('search' in c for c in cyc):
            s = [c for c in cyc if 'search' in c]
            ax.plot([c['positions_total'] for c in s], [c['search']['task'].get(t, math.nan) for c in s], 's', color='black', mfc='none', label='learned + MCTS')
        if any('value_guided' in c for c in cyc):
            s = [c for c in cyc if 'value_guided' in c]
            ax.plot([c['positions_total'] for c in s], [c['value_guided']['task'].get(t, math.nan) for c in s], 'D', color='black', mfc='none', label='value-guided')
        for k, (lab, b) in enumerate(baselines.items()):
            ax.axhline(b['task'].get(t, math.nan), ls='--', lw=1, color=f'C{k}', label=lab)
        ax.set_title({'all': 'mean task score'}.get(t, t)); ax.set_xlabel('self-play positions')
    axes[0].legend(fontsize=7, loc='best')
    hours = cyc[-1]['cpu_hours']
    fig.suptitle(f"learning curve on the research suite ({state['budget']} tokens per item; {hours:.2f} CPU-hours of self-play, training and evaluation so far)", fontsize=9)
    fig.tight_layout(); fig.savefig(out, dpi=110); plt.close(fig)


def report(state:dict, baselines:dict, out:Path) -> None:
    L = [f"# Learning curve ({state['budget']} tokens per item, {state.get('suite', 'research')} suite {state['suite_hash'][:12]})", '',
         f"Command: `{state['command']}`", '',
         '| cycle | positions (self-play total) | episodes | self-play reward | train / held-out value MSE | task (policy) | SQuAD F1 | WikiText | NQ-Open | GSM8K | Δ vs greedy [95% CI] | p (Wilcoxon / mean, Holm) | value ρ (all / SQuAD) | STOP AUC | CPU-h |',
         '|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|']
    for c in state['cycles']:
        if 'policy' not in c: continue
        p, d, vq, hl = c['policy'], c['policy']['vs_greedy'], c.get('value_quality', {}), c.get('losses', {})
        L.append(f"| {c['cycle']} | {c['positions_total']} | {c['episodes_total']} | {c['selfplay_reward']:.3f} | "
                 f"{hl.get('train', {}).get('value_mse', math.nan):.4f} / {hl.get('held_out', {}).get('value_mse', math.nan):.4f} | "
                 f"{p['task']['all']:.3f} | {p['task'].get('squad', math.nan):.3f} | {p['task'].get('wikitext', math.nan):.3f} | "
                 f"{p['task'].get('nq_open', math.nan):.3f} | {p['task'].get('gsm8k', math.nan):.3f} | "
                 f"{d['diff']:+.3f} [{d['ci_lo']:+.3f}, {d['ci_hi']:+.3f}] | {d['p_wilcoxon']:.3g} / {d['p_perm']:.3g} | "
                 f"{vq.get('all', {}).get('rho', math.nan):+.2f} / {vq.get('squad', {}).get('rho', math.nan):+.2f} | "
                 f"{vq.get('all', {}).get('stop_auc', math.nan):.2f} | {c['cpu_hours']:.2f} |")
    L += ['', 'Stored baselines on the same suite and budget:', '', '| controller | task | SQuAD F1 | WikiText | NQ-Open | GSM8K |', '|---|---:|---:|---:|---:|---:|']
    for lab, b in baselines.items():
        t = b['task']; L.append(f"| {lab} | " + ' | '.join(f"{t.get(k, math.nan):.3f}" for k in ('all', 'squad', 'wikitext', 'nq_open', 'gsm8k')) + ' |')
    last = [c for c in state['cycles'] if 'search' in c]
    if last:
        s = last[-1]['search']; d = s['vs_greedy']
        L += ['', f"MCTS search controller with the cycle-{last[-1]['cycle']} network: task {s['task']['all']:.3f}, Δ vs greedy "
                  f"{d['diff']:+.3f} [{d['ci_lo']:+.3f}, {d['ci_hi']:+.3f}], p {d['p_wilcoxon']:.3g} / {d['p_perm']:.3g}; "
                  f"mean tokens {s['tokens']:.1f}; actions {s.get('actions', {})}."]
    vgs = [c for c in state['cycles'] if 'value_guided' in c]
    if vgs:
        s = vgs[-1]['value_guided']; d = s['vs_greedy']
        L += ['', f"Value-guided decoding (k = {s['k']}) with the cycle-{vgs[-1]['cycle']} network: task {s['task']['all']:.3f} "
                  f"(SQuAD {s['task'].get('squad', math.nan):.3f}, WikiText {s['task'].get('wikitext', math.nan):.3f}), Δ vs greedy "
                  f"{d['diff']:+.3f} [{d['ci_lo']:+.3f}, {d['ci_hi']:+.3f}], p {d['p_wilcoxon']:.3g} / {d['p_perm']:.3g}; mean tokens {s['tokens']:.1f}."]
    L += ['', '![learning curve](curve.png)', '']
    (out/'report.md').write_text('\n'.join(L))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default='runs/learning_curve')
    ap.add_argument('--cycles', type=int, default=6)
    ap.add_argument('--episodes', type=int, default=48, help='self-play episodes per cycle')
    ap.add_argument('--batch', type=int, default=16, help='episodes in lock step (selfplay.batch_episodes)')
    ap.add_argument('--steps', type=int, default=400, help='optimiser steps per cycle (a fresh network on all positions)')
    ap.add_argument('--budget', type=int, default=64, help='tokens per research-suite item')
    ap.add_argument('--search-last', action='store_true', help='after the last cycle, also evaluate the network as an MCTS search controller')
    ap.add_argument('--value-guided-last', type=int, default=0, metavar='K', help='after the last cycle, also evaluate controllers.ValueGuided (K sampled chunks per block) with the network')
    ap.add_argument('--suite', default='research', choices=['research', 'default'], help="'default' (32 items) is a smoke test only")
    ap.add_argument('--seed', type=int, default=100)
    ap.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    import numpy as np
    from research_controller.config import load_config, ConfigError
    from research_controller.evaluate import get_suite, evaluate_controllers, compare, SuiteResult, default_engine
    from research_controller.selfplay import run_selfplay
    from research_controller.train import train, open_buffer
    from research_controller.controllers import load_controller, MCTSController, ValueGuided
    from research_controller.network import load_checkpoint
    from research_controller.macro_actions import ACTION_NAMES
    try:
        cfg = load_config(overrides=a.sets + [f'selfplay.batch_episodes={a.batch}', f'evaluate.suite={a.suite}',
                                              f'evaluate.token_budget={a.budget}', f'train.steps={a.steps}'])
    except ConfigError as e: print(f"error: {e}", file=sys.stderr); return 2
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    sp = out/'state.json'
    state = json.loads(sp.read_text()) if sp.exists() else dict(cycles=[], budget=a.budget, command=' '.join(['python', 'benchmarks/learning_curve.py'] + (argv or sys.argv[1:])))
    suite = get_suite(cfg); state['suite_hash'], state['suite'] = suite.hash, a.suite
    baselines = {}
    for lab, pat in BASELINES.items():
        p = Path(pat.format(b=a.budget))
        if p.exists():
            r = SuiteResult.load(p)
            if r.suite_hash == suite.hash: baselines[lab] = dict(task=task_means(r), result=r)
    greedy = baselines.get('greedy', {}).get('result')
    if greedy is None:  # no stored result on this suite and budget: run greedy once
        gp = out/'greedy_result.json'
        greedy = SuiteResult.load(gp) if gp.exists() else evaluate_controllers(cfg, ['greedy'], suite=suite)[0]
        greedy.save(gp); baselines['greedy'] = dict(task=task_means(greedy), result=greedy)
    buf = out/'buffer'
    probe = build_probe(cfg, suite, out/'probe.npz', a.budget)
    print(f"probe: {len(probe['X'])} greedy decisions on {len(set(probe['item'].tolist()))} eval items")
    def vs(res):
        s = compare(greedy, res, cfg.evaluate, metrics=['task'])['task']
        return dict(diff=s.diff, ci_lo=s.ci_lo, ci_hi=s.ci_hi, p_wilcoxon=s.p_wilcoxon, p_perm=s.p_perm, mde=s.mde, n=s.n)
    def outcome(res) -> dict:
        "A controller's suite result in the state: task means, the pairing with greedy, mean tokens, macro-actions played."
        acts = {}
        for r in res.records:
            for k_, v_ in (r.actions or {}).items(): acts[k_] = acts.get(k_, 0) + v_
        return dict(task=task_means(res), vs_greedy=vs(res), tokens=float(np.mean([r.tokens for r in res.records])), actions=acts)
    ckpt = None
    for c in range(1, a.cycles + 1):
        cdir = out/f'cycle-{c:02d}'; cdir.mkdir(exist_ok=True)
        rec = next((x for x in state['cycles'] if x['cycle'] == c), None)
        if rec is None: rec = dict(cycle=c, seconds={}); state['cycles'].append(rec)
        if 'selfplay_reward' not in rec:  # 1. self-play with the latest network
            t = time.perf_counter()
            s = run_selfplay(cfg, ckpt, episodes=a.episodes, buffer_path=buf, seed=a.seed + c, progress=True)
            rec['seconds']['selfplay'] = time.perf_counter() - t
            rec.update(selfplay_reward=s.mean_reward, selfplay_positions=s.positions)
            atomic_json(sp, state)
        with open_buffer(buf) as b:
            metas = {s_: b.episode_meta(s_) for s_ in b.episode_serials()}
        ids = [m['episode_id'] for m in metas.values()]
        train_ids, held_ids = [i for i in ids if not held_out(i)], [i for i in ids if held_out(i)]
        if 'positions_total' not in rec:  # the buffer as this cycle trained on it (a resumed run's buffer may hold later cycles too)
            rec.update(episodes_total=len(ids), positions_total=int(sum(len(m['actions']) for m in metas.values())))
        ck = cdir/'train'/'final.pt'
        if not ck.exists():  # 2. train a fresh network on every position but the held-out episodes
            t = time.perf_counter()
            train(cfg, buffer_path=buf, out_dir=cdir/'train', episode_ids=train_ids, resume=True, progress=True)
            rec['seconds']['train'] = time.perf_counter() - t
        if 'losses' not in rec: rec['losses'] = heldout_losses(ck, buf, train_ids, held_ids); atomic_json(sp, state)
        ckpt = ck
        if 'policy' not in rec:  # 3. the network as a policy controller on the research suite
            t = time.perf_counter()
            ctl = load_controller(ck, cfg, name=f'policy-c{c}')
            res = evaluate_controllers(cfg, [ctl], suite=suite)[0]
            res.save(cdir/'policy_result.json')
            rec['seconds']['evaluate'] = time.perf_counter() - t
            rec['policy'] = dict(outcome(res), empty=int(sum(not r.text.strip() for r in res.records)))
        if 'value_quality' not in rec: rec['value_quality'] = value_quality(ck, probe)
        rec['cpu_hours'] = sum(sum(x['seconds'].values()) for x in state['cycles'] if x['cycle'] <= c)/3600
        atomic_json(sp, state)
        plot(state, baselines, out/'curve.png'); report(state, baselines, out)
        p = rec['policy']
        print(f"cycle {c}: {rec['positions_total']} positions, policy task {p['task']['all']:.3f} "
              f"(Δ vs greedy {p['vs_greedy']['diff']:+.3f} [{p['vs_greedy']['ci_lo']:+.3f}, {p['vs_greedy']['ci_hi']:+.3f}]), "
              f"value ρ {rec['value_quality']['all']['rho']:+.2f}, STOP AUC {rec['value_quality']['all']['stop_auc']:.2f}, "
              f"held-out value MSE {rec['losses'].get('held_out', {}).get('value_mse', math.nan):.4f}", flush=True)
    last = state['cycles'][-1]
    def final_eval(key:str, make:Callable, fname:str, **extra) -> None:
        "The last cycle's network as another controller (`make(net, slm_fingerprint)`) on the suite, once; its outcome goes to `last[key]`."
        if key in last or ckpt is None: return
        t = time.perf_counter()
        net, info = load_checkpoint(ckpt, action_names=ACTION_NAMES)
        res = evaluate_controllers(cfg, [make(net, info['slm_fingerprint'])], suite=suite)[0]
        res.save(out/f"cycle-{last['cycle']:02d}"/fname)
        last['seconds'][f'{key}_eval'] = time.perf_counter() - t
        last[key] = dict(extra, **outcome(res))
        last['cpu_hours'] = sum(sum(x['seconds'].values()) for x in state['cycles'])/3600
        atomic_json(sp, state); plot(state, baselines, out/'curve.png'); report(state, baselines, out)
    if a.search_last:
        final_eval('search', lambda net, fp: MCTSController(net, cfg, name=f"mcts-c{last['cycle']}", slm_fingerprint=fp), 'search_result.json')
    if a.value_guided_last:
        k = a.value_guided_last
        final_eval('value_guided', lambda net, fp: ValueGuided(net, cfg, k=k, name=f"value_guided{k}-c{last['cycle']}", slm_fingerprint=fp),
                   'value_guided_result.json', k=k)
    print(f"-> {out/'report.md'}, {out/'curve.png'}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
