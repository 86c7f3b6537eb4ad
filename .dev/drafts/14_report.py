# %%
#| default_exp report

# %% [markdown]
# # Report
# > Results tables (Markdown + LaTeX) and figures rebuilt from the stored runs, and an explorer for macro traces and MCTS trees.

# %%
#| export
from __future__ import annotations
import html, json, math, re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
import numpy as np
from fastcore.basics import patch
from research_controller.config import Config, EvaluateConfig, atomic_write, atomic_write_text, load_config, run_path, sha256_file
from research_controller.evaluate import (SuiteResult, bootstrap_ci, compare, compare_table, plot_metric_bars, plot_reward_terms,
                                          plot_tokens_vs_score)
from research_controller.macro_actions import ACTION_NAMES

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import os, shutil, tempfile, time

# %% [markdown]
# `write_report` reads three kinds of stored runs and never reruns anything:
#
# - evaluation results (`SuiteResult` JSON written by `rc evaluate`, under `runs/<evaluate.out_dir>`),
# - training runs (TensorBoard event files under `runs/<train.log_dir>`),
# - promotion cycle reports (`runs/<promotion.reports_dir>/cycle-*.json`).
#
# The same stored runs always give byte-identical Markdown and LaTeX: no timestamps, sorted inputs,
# seeded bootstraps.
#
# ## Finding the evaluation results
# Every JSON file under the evaluation directory that is a saved `SuiteResult` is a candidate. Results are
# grouped by (suite, suite hash, token budget): only results from one suite at one budget can share a table.
# The report uses the group written most recently, and the newest result of each controller in it.

# %%
#| export
class ReportError(ValueError):
    "Nothing to report, or stored runs that cannot be read; the message names the path and the fix."

def _is_result(p:Path) -> bool:
    try: d = json.loads(p.read_text(encoding='utf-8'))
    except (OSError, ValueError): return False
    return isinstance(d, dict) and all(k in d for k in ('controller', 'suite_hash', 'records', 'token_budget'))

def find_eval_results(cfg:Config, # `evaluate.out_dir` and `paths.runs_dir`
                      eval_dir:str|Path|None=None, # None = runs/<evaluate.out_dir>
                      with_paths:bool=False, # return (path, result) pairs
                     ) -> list:
    "The latest comparable `SuiteResult`s under the evaluation directory, sorted by label (empty if none)."
    pairs = _find_eval(Path(eval_dir) if eval_dir else run_path(cfg, cfg.evaluate.out_dir))
    return pairs if with_paths else [r for _, r in pairs]

def _find_eval(root:Path) -> list:
    "(path, SuiteResult) pairs of the newest group of comparable results under `root`, sorted by label."
    if not root.is_dir(): return []
    groups = {}
    for p in sorted(root.rglob('*.json')):
        if p.name.startswith('.') or not _is_result(p): continue
        r = SuiteResult.load(p)
        g = groups.setdefault((r.suite, r.suite_hash, r.token_budget), {})
        mt = p.stat().st_mtime_ns
        if r.label not in g or mt >= g[r.label][0]: g[r.label] = (mt, p, r)
    if not groups: return []
    latest = max(groups.values(), key=lambda g: (max(m for m, _, _ in g.values()), sorted(g)))
    return [latest[k][1:] for k in sorted(latest)]

def _reference(results:list) -> int:
    "Index of the controller the others are compared with: greedy if present, else the first."
    labels = [r.label for r in results]
    return labels.index('greedy') if 'greedy' in labels else 0

# %% [markdown]
# A small synthetic benchmark to show the report on: three controllers on 12 items of a suite, with known
# differences (`sampling` is worse than `greedy` on every item, `v0002` better). These are made-up numbers for the
# demo only; the real ones come from `rc evaluate`.

# %%
#| export
def _demo_results(n:int=12, seed:int=0) -> list:
    "Synthetic `SuiteResult`s with known gaps (for tests and docs only)."
    from research_controller.evaluate import ItemRecord
    rng = np.random.default_rng(seed); out = []
    base = rng.uniform(0.2, 0.6, n)
    for name, ver, shift in (('greedy', None, 0.0), ('sampling', None, -0.1), ('policy', 'v0002', 0.15)):
        recs = []
        for i in range(n):
            task = ('squad', 'gsm8k')[i % 2]; r = float(base[i] + shift + rng.normal(0, 0.02))
            recs.append(ItemRecord(name, ver, f"item{i:02d}", task, f"answer {i}", {'f1': r / 2} if task == 'squad' else {'acc': float(r > 0.4)},
                                   {'fluency': r / 2, 'task': r / 2, 'length': -0.05}, r, 40 + i, 100.0 + 10 * i + 20 * shift, None, i,
                                   {'CONTINUE': 5, 'STOP': 1}))
        out.append(SuiteResult(name, ver, 'demo', 'f' * 64, 64, recs, {'slm_fingerprint': '0' * 16}))
    return out

# %%
tmp = Path(tempfile.mkdtemp())
cfg = load_config(overrides=[f'paths.runs_dir={tmp}', 'evaluate.bootstrap=500'])
demo = _demo_results()
for r in demo: r.save(tmp/'eval'/'demo'/'results'/f"{r.label}.json")
found = find_eval_results(cfg)
test_eq([r.label for r in found], ['greedy', 'policy@v0002', 'sampling'])
test_eq(_reference(found), 0)
found

# %% [markdown]
# A result of another suite written later wins; an unreadable JSON file is ignored; an empty directory gives nothing.

# %%
time.sleep(0.01)
other = _demo_results(4, seed=1)[0]; other.suite_hash = 'e' * 64
other.save(tmp/'eval'/'other'/'results'/'greedy.json'); (tmp/'eval'/'junk.json').write_text('{not json')
test_eq([(r.label, r.suite_hash[:1]) for r in find_eval_results(cfg)], [('greedy', 'e')])
shutil.rmtree(tmp/'eval'/'other')
test_eq(len(find_eval_results(cfg)), 3)
test_eq(find_eval_results(cfg, tmp/'nothing'), [])
test_eq([p.name for p, _ in find_eval_results(cfg, with_paths=True)], ['greedy.json', 'policy@v0002.json', 'sampling.json'])

# %% [markdown]
# ## The LaTeX results table
# `compare_table` (from 11_evaluate) gives the Markdown table. `latex_table` gives the same numbers as a
# booktabs table: each controller's mean and bootstrap CI per metric, tokens, errors, and the paired
# reward difference to the reference with its corrected p-value.

# %%
#| export
_TEX = {'\\': r'\textbackslash{}', '&': r'\&', '%': r'\%', '$': r'\$', '#': r'\#', '_': r'\_', '{': r'\{', '}': r'\}',
        '~': r'\textasciitilde{}', '^': r'\textasciicircum{}'}

def tex_escape(s) -> str:
    "Escape LaTeX special characters in `s`."
    return ''.join(_TEX.get(c, c) for c in str(s))

def _ci(v, ec) -> tuple:
    v = np.asarray(v, float)
    m = float(np.nanmean(v)) if (~np.isnan(v)).any() else math.nan
    return (m, *bootstrap_ci(v, ec.bootstrap, ec.alpha, ec.seed))

def _metrics(results:list) -> list:
    return ['reward', *sorted(set.intersection(*[set(r.metric_names()) for r in results]))]

def latex_table(results:list, # SuiteResults on one suite at one budget
                ecfg:EvaluateConfig|None=None, # bootstrap, alpha, correction, test, seed
                reference:int|None=None, # index of the reference controller; None = greedy or the first
               ) -> str:
    "A booktabs LaTeX table: means with bootstrap CIs, tokens, errors, paired Δ reward and corrected p."
    ec = ecfg or EvaluateConfig()
    if not results: raise ReportError("latex_table needs at least one SuiteResult.")
    ref = results[_reference(results) if reference is None else reference]
    ms, lvl = _metrics(results), f"{1 - ec.alpha:.0%}"
    f = lambda m, lo, hi: '--' if math.isnan(m) else f"{m:.3f} {{\\scriptsize[{lo:.3f}, {hi:.3f}]}}"
    head = ['controller', '$n$', *[tex_escape(m) for m in ms], 'tokens', 'errors', f"$\\Delta$ reward vs {tex_escape(ref.label)}", '$p$']
    lines = ['% generated by research_controller.report from stored evaluation results; do not edit by hand',
             '\\begin{table}[t]', '\\centering', '\\small',
             f"\\caption{{Suite \\texttt{{{tex_escape(ref.suite)}}} [{ref.suite_hash[:12]}], {ref.token_budget} tokens per item for every controller. "
             f"Means with {tex_escape(lvl)} bootstrap CIs ({ec.bootstrap} resamples); $\\Delta$ is the paired difference to {tex_escape(ref.label)}, "
             f"$p$ the {ec.test} test after {ec.correction} correction.}}",
             f"\\label{{tab:{re.sub(r'[^A-Za-z0-9]+', '-', ref.suite)}}}",
             '\\begin{tabular}{l' + 'r' * (len(head) - 1) + '}', '\\toprule', ' & '.join(head) + ' \\\\', '\\midrule']
    for r in results:
        cells = [tex_escape(r.label), str(r.n)] + [f(*_ci(list(r.values(m).values()), ec)) for m in ms]
        cells += [f"{r.mean('tokens'):.1f}", tex_escape(f"{r.error_rate:.0%}")]
        if r is ref: cells += ['--', '--']
        else:
            s = compare(ref, r, ec, metrics=ms)['reward']
            cells += [f"{s.diff:+.3f} {{\\scriptsize[{s.ci_lo:+.3f}, {s.ci_hi:+.3f}]}}", f"{s.p_adj:.3g}" + ('$^*$' if s.significant else '')]
        lines.append(' & '.join(cells) + ' \\\\')
    lines += ['\\bottomrule', '\\end{tabular}', '\\end{table}', '']
    return '\n'.join(lines)

# %%
ec = cfg.evaluate
tex = latex_table(found, ec)
print(tex)

# %%
test_eq(tex_escape('policy@v_2 50%'), r'policy@v\_2 50\%')
test_eq(tex.count('\\\\'), 4)  # header + 3 controllers
assert 'policy@v0002' in tex and '$^*$' in tex  # the better controller is significantly better than greedy
test_eq(latex_table(found, ec), tex)  # deterministic

# %% [markdown]
# ## Training runs from TensorBoard
# `read_scalars` reads every run directory holding TensorBoard event files (10_train writes one per run) with
# tensorboard's `EventAccumulator`: {run: {tag: (steps, values)}}.

# %%
#| export
def read_scalars(log_dir:str|Path) -> dict:
    "Scalars of every TensorBoard run under `log_dir`: {run (relative dir): {tag: (steps, values)}}, sorted."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    root = Path(log_dir)
    if not root.is_dir(): return {}
    runs = sorted({p.parent for p in root.rglob('events.out.tfevents.*')})
    out = {}
    for d in runs:
        acc = EventAccumulator(str(d), size_guidance={'scalars': 0}); acc.Reload()
        tags = {}
        for t in sorted(acc.Tags().get('scalars', [])):
            last = {}
            for e in acc.Scalars(t): last[int(e.step)] = float(e.value)  # a resumed run rewrites steps: keep the last value
            st = sorted(last); tags[t] = (np.array(st), np.array([last[s] for s in st]))
        if tags: out[str(d.relative_to(root)) if d != root else '.'] = tags
    return out

# %% [markdown]
# Two small runs written with the same `SummaryWriter` 10_train uses:

# %%
from torch.utils.tensorboard import SummaryWriter
for run, scale in (('ckpt-a', 1.0), ('ckpt-b', 0.7)):
    w = SummaryWriter(str(tmp/'tb'/run))
    for s in range(1, 41):
        w.add_scalar('loss/total', scale * (2.0 / s**0.5 + 0.3), s); w.add_scalar('loss/value', scale / s, s)
        w.add_scalar('train/lr', 1e-3 * min(1, s / 5), s)
    w.close()
sc = read_scalars(tmp/'tb')
test_eq(list(sc), ['ckpt-a', 'ckpt-b'])
test_eq(sorted(sc['ckpt-a']), ['loss/total', 'loss/value', 'train/lr'])
test_eq(len(sc['ckpt-b']['loss/value'][0]), 40)
test_close(sc['ckpt-b']['loss/value'][1][-1], 0.7 / 40, eps=1e-6)
test_eq(read_scalars(tmp/'none'), {})
{r: {t: len(v[0]) for t, v in d.items()} for r, d in sc.items()}

# %%
#| export
_FIRST = ('loss/total', 'loss/policy', 'loss/value')

def _tag_order(scalars:dict) -> list:
    "Tags with the main losses first, then the other losses, then the rest."
    tags = {t for d in scalars.values() for t in d}
    return sorted(tags, key=lambda t: (_FIRST.index(t) if t in _FIRST else len(_FIRST), not t.startswith('loss/'), t))

def plot_training(scalars:dict, max_tags:int=6):
    "One panel per scalar tag (losses first), one line per run."
    from matplotlib.figure import Figure
    tags = [t for t in _tag_order(scalars) if any(np.any(d[t][1] != 0) for d in scalars.values() if t in d)][:max_tags]
    if not tags: raise ReportError("no non-zero scalars to plot; train a network first (rc train).")
    cols = min(3, len(tags)); rows = math.ceil(len(tags) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), layout='constrained')
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, t in zip(axes, tags):
        for i, (run, d) in enumerate(scalars.items()):
            if t in d: ax.plot(*d[t], color=f"C{i % 10}", lw=1.2, label=run)
        ax.set_title(t); ax.set_xlabel('step')
        if t.startswith('loss/') and all(np.all(d[t][1] > 0) for d in scalars.values() if t in d): ax.set_yscale('log')
    for ax in axes[len(tags):]: ax.set_visible(False)
    axes[0].legend(fontsize=7)
    return fig

# %%
test_eq(_tag_order(sc), ['loss/total', 'loss/value', 'train/lr'])
plot_training(sc)

# %% [markdown]
# ## Promotion cycles
# Each cycle report (12_promotion) holds both controllers' summaries and the decision with its numbers.
# `cycle_rows` flattens them; `plot_cycles` shows the champion's and the challenger's mean reward per
# cycle, the challenger's paired CI, and which cycles promoted.

# %%
#| export
def cycle_rows(reports:list) -> list:
    "One dict per cycle report: cycle, champion, challenger, rewards, Δ with CI, corrected p, decision, promoted version."
    rows = []
    for r in reports:
        d = r.get('decision', {}); m = d.get('metrics', {}); ci = m.get('reward_ci') or [math.nan, math.nan]
        num = lambda k: math.nan if m.get(k) is None else float(m[k])
        rows.append(dict(cycle=r.get('cycle'), champion=d.get('champion', ''), challenger=d.get('challenger', ''),
                         reward_champion=num('reward_champion'), reward_challenger=num('reward_challenger'),
                         delta=num('reward_delta'), ci_lo=math.nan if ci[0] is None else float(ci[0]),
                         ci_hi=math.nan if ci[1] is None else float(ci[1]), p_adj=num('p_adj'),
                         n=m.get('n'), trajectories=len(r.get('trajectory_ids', [])),
                         accepted=bool(d.get('accepted')), promoted=r.get('promoted_version') or ''))
    return rows

def plot_cycles(reports:list):
    "Mean reward of champion and challenger per cycle; filled markers = promoted."
    from matplotlib.figure import Figure
    rows = cycle_rows(reports)
    if not rows: raise ReportError("no cycle reports to plot; run rc cycle first.")
    fig = Figure(figsize=(max(4, 1 + 0.6 * len(rows)), 3.4), layout='constrained'); ax = fig.subplots()
    x = np.array([r['cycle'] for r in rows])
    ax.plot(x, [r['reward_champion'] for r in rows], 's--', color='C0', label='champion')
    ch = np.array([r['reward_challenger'] for r in rows]); lo = np.array([r['ci_lo'] for r in rows]); hi = np.array([r['ci_hi'] for r in rows])
    base = np.array([r['reward_champion'] for r in rows])
    ax.errorbar(x, ch, yerr=[np.nan_to_num(ch - (base + lo)), np.nan_to_num((base + hi) - ch)], fmt='none', ecolor='C1', capsize=3)
    acc = np.array([r['accepted'] for r in rows])
    ax.plot(x[~acc], ch[~acc], 'o', mfc='white', color='C1', label='challenger (rejected)')
    ax.plot(x[acc], ch[acc], 'o', color='C1', label='challenger (promoted)')
    ax.set_xticks(x); ax.set_xlabel('cycle'); ax.set_ylabel('mean reward'); ax.legend(fontsize=7)
    ax.set_title('promotion cycles (challenger with the paired CI of its gain)')
    return fig

# %% [markdown]
# Two cycle reports built by 12_promotion's own `make_report`/`write_report` from the demo results:

# %%
from research_controller.promotion import PromotionPolicy, make_report, write_report as write_cycle_report
pol = PromotionPolicy.from_config(cfg)
for champ, chal in ((demo[0], demo[1]), (demo[0], demo[2])):
    dec = pol.evaluate(champ, chal)
    rep = make_report(champ, chal, dec, started_at='2026-01-01T00:00:00+00:00', finished_at='2026-01-01T00:10:00+00:00',
                      trajectory_ids=['ep-1', 'ep-2'], n_samples=64, promoted_version=chal.version if dec.accepted else None, cfg=cfg)
    write_cycle_report(rep, run_path(cfg, cfg.promotion.reports_dir))
from research_controller.promotion import load_reports
reports = load_reports(run_path(cfg, cfg.promotion.reports_dir))
rows = cycle_rows(reports)
test_eq([(r['cycle'], r['accepted'], r['promoted']) for r in rows], [(1, False, ''), (2, True, 'v0002')])
assert rows[1]['delta'] > 0 > rows[0]['delta']
plot_cycles(reports)

# %% [markdown]
# ## `write_report`
# Everything together: `results.md`, `results.tex`, and each figure as PNG and PDF under `figures/`. Figures
# are saved without timestamps, so they too are reproducible. The Markdown ends with the inputs and their
# sha256, so a table can always be traced to the stored runs it came from.

# %%
#| export
def _save_fig(fig, path:Path) -> list:
    "Save `fig` as PNG and PDF next to each other, atomically and without timestamps."
    out = []
    for ext, md in (('png', {'Software': None}), ('pdf', {'Creator': None, 'Producer': None, 'CreationDate': None})):
        out.append(atomic_write(path.with_suffix('.' + ext), lambda t: fig.savefig(t, format=ext, dpi=110, metadata=md)))
    return out

def _fmt(x, spec='.3f') -> str: return '—' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

def _md_training(scalars:dict) -> str:
    tags = _tag_order(scalars)
    rows = ['| run | steps | ' + ' | '.join(f"last {t}" for t in tags) + ' |', '|---|---:|' + '---:|' * len(tags)]
    for run, d in scalars.items():
        steps = max(int(v[0][-1]) for v in d.values())
        rows.append(f"| {run} | {steps} | " + ' | '.join(_fmt(float(d[t][1][-1]), '.4g') if t in d else '—' for t in tags) + ' |')
    return '\n'.join(rows)

def _md_cycles(rows:list) -> str:
    out = ['| cycle | champion | challenger | n | trajectories | reward champion | reward challenger | Δ [CI] | p (corrected) | decision | promoted |',
           '|---:|---|---|---:|---:|---:|---:|---|---:|---|---|']
    for r in rows:
        out.append(f"| {r['cycle']} | {r['champion']} | {r['challenger']} | {r['n'] if r['n'] is not None else '—'} | {r['trajectories']} | "
                   f"{_fmt(r['reward_champion'])} | {_fmt(r['reward_challenger'])} | {_fmt(r['delta'], '+.3f')} "
                   f"[{_fmt(r['ci_lo'], '+.3f')}, {_fmt(r['ci_hi'], '+.3f')}] | {_fmt(r['p_adj'], '.3g')} | "
                   f"{'accepted' if r['accepted'] else 'rejected'} | {r['promoted'] or '—'} |")
    return '\n'.join(out)

def _tex_cycles(rows:list) -> str:
    lines = ['\\begin{table}[t]', '\\centering', '\\small', '\\caption{Promotion cycles: mean reward of champion and challenger on the benchmark, '
             'the paired gain with its bootstrap CI and corrected $p$, and the decision.}', '\\label{tab:cycles}',
             '\\begin{tabular}{rllrrrrl}', '\\toprule',
             'cycle & champion & challenger & champion & challenger & $\\Delta$ & $p$ & decision \\\\', '\\midrule']
    for r in rows:
        lines.append(f"{r['cycle']} & {tex_escape(r['champion'])} & {tex_escape(r['challenger'])} & {_fmt(r['reward_champion'])} & "
                     f"{_fmt(r['reward_challenger'])} & {_fmt(r['delta'], '+.3f')} {{\\scriptsize[{_fmt(r['ci_lo'], '+.3f')}, {_fmt(r['ci_hi'], '+.3f')}]}} & "
                     f"{_fmt(r['p_adj'], '.3g')} & {'promoted ' + tex_escape(r['promoted']) if r['accepted'] else 'rejected'} \\\\")
    lines += ['\\bottomrule', '\\end{tabular}', '\\end{table}', '']
    return '\n'.join(lines)

# %%
#| export
def write_report(cfg:Config, # where the runs are (`paths.runs_dir`, `evaluate`, `train.log_dir`, `promotion.reports_dir`)
                 out_dir:str|Path|None=None, # None = runs/report
                 figures:bool=True, # also write PNG/PDF figures
                ) -> dict:
    "Write results.md, results.tex and figures from the stored evaluation results, training runs and cycle reports."
    runs = Path(cfg.paths.runs_dir)
    out = Path(out_dir) if out_dir else run_path(cfg, 'report')
    found = find_eval_results(cfg, with_paths=True)
    results = [r for _, r in found]
    scalars = read_scalars(run_path(cfg, cfg.train.log_dir))
    rdir = run_path(cfg, cfg.promotion.reports_dir)
    from research_controller.promotion import load_reports
    reports = load_reports(rdir) if rdir.is_dir() else []
    if not (results or scalars or reports):
        raise ReportError(f"nothing to report under {str(runs)!r}: no evaluation results in {str(run_path(cfg, cfg.evaluate.out_dir))!r}, "
                          f"no TensorBoard runs in {str(run_path(cfg, cfg.train.log_dir))!r}, no cycle reports in {str(rdir)!r}. "
                          f"Run `rc evaluate --compare`, `rc train` or `rc cycle` first (or pass --set paths.runs_dir=...).")
    ec = cfg.evaluate
    md, tex, figs = ['# research_controller results', ''], [], {}
    fig = lambda name, make: figs.__setitem__(name, _save_fig(make(), out/'figures'/name)) if figures else None
    img = lambda name, alt: f"![{alt}](figures/{name}.png)" if figures else ''
    if results:
        ref = results[_reference(results)]
        md += [f"## Benchmark: suite `{ref.suite}` [{ref.suite_hash[:12]}], {ref.token_budget} tokens per item", '',
               f"Every controller ran on the same items at the same total token budget; differences are paired, relative to `{ref.label}`.", '',
               compare_table(results, ec, _reference(results)).rstrip(), '']
        tex.append(latex_table(results, ec))
        fig('metric_bars', lambda: plot_metric_bars(results, ec)); fig('reward_terms', lambda: plot_reward_terms(results))
        fig('tokens_vs_score', lambda: plot_tokens_vs_score(results, ec))
        md += [img('metric_bars', 'means with bootstrap CIs'), '', img('reward_terms', 'reward terms'), '',
               img('tokens_vs_score', 'tokens vs reward'), '']
    if scalars:
        md += ['## Training runs', '', _md_training(scalars), '']
        fig('training_curves', lambda: plot_training(scalars)); md += [img('training_curves', 'training curves'), '']
    if reports:
        rows = cycle_rows(reports)
        md += ['## Promotion cycles', '', _md_cycles(rows), '']
        tex.append(_tex_cycles(rows))
        fig('cycles', lambda: plot_cycles(reports)); md += [img('cycles', 'promotion cycles'), '']
    inputs = [p for p, _ in found]
    inputs += sorted(run_path(cfg, cfg.train.log_dir).rglob('events.out.tfevents.*')) if scalars else []
    inputs += sorted(rdir.glob('cycle-*.json')) if reports else []
    rel = lambda p: str(Path(p).relative_to(runs)) if Path(p).is_relative_to(runs) else str(p)
    md += ['## Inputs', '', '| file | sha256 |', '|---|---|', *[f"| {rel(p)} | {sha256_file(p)[:16]} |" for p in inputs], '']
    res = {'markdown': atomic_write_text(out/'results.md', '\n'.join(l for l in md) + '\n'),
           'latex': atomic_write_text(out/'results.tex', '\n'.join(tex) if tex else '% no tables: no evaluation results or cycle reports\n'),
           'figures': {k: [str(p) for p in v] for k, v in figs.items()}, 'inputs': [rel(p) for p in inputs]}
    return res

# %%
paths = write_report(cfg)
print(Path(paths['markdown']).read_text()[:1500])

# %%
test_eq(sorted(paths['figures']), ['cycles', 'metric_bars', 'reward_terms', 'tokens_vs_score', 'training_curves'])
assert all(Path(p).stat().st_size > 1000 for v in paths['figures'].values() for p in v)
text = Path(paths['markdown']).read_text()
for s in ('## Benchmark', '## Training runs', '## Promotion cycles', 'policy@v0002', 'ckpt-b', 'cycle-00002.json'): assert s in text, s
# the same stored runs give byte-identical tables and figures
snap = {str(p): Path(p).read_bytes() for p in [paths['markdown'], paths['latex'], *[p for v in paths['figures'].values() for p in v]]}
paths2 = write_report(cfg, out_dir=tmp/'report2')
test_eq(Path(paths2['markdown']).read_bytes(), snap[str(paths['markdown'])])
test_eq(Path(paths2['latex']).read_bytes(), snap[str(paths['latex'])])
test_eq(Path(paths2['figures']['metric_bars'][0]).read_bytes(), snap[paths['figures']['metric_bars'][0]])
test_eq(Path(paths2['figures']['cycles'][1]).read_bytes(), snap[paths['figures']['cycles'][1]])
paths['inputs']

# %% [markdown]
# A changed input changes the report; no inputs at all is a clear error.

# %%
demo[2].records[0].reward += 1.0; demo[2].save(tmp/'eval'/'demo'/'results'/'policy@v0002.json')
test_ne = lambda a, b: test_eq(a != b, True)
test_ne(Path(write_report(cfg, out_dir=tmp/'report3', figures=False)['markdown']).read_bytes(), snap[str(paths['markdown'])])
test_fail(lambda: write_report(load_config(overrides=[f'paths.runs_dir={tmp}/empty'])), contains='nothing to report')

# %% [markdown]
# ## Looking at one search tree
# `tree_dict` turns a `research_controller.mcts.Node` (e.g. `mcts.root` after a search) into plain nested
# dicts: per child the action, visits, mean value Q, prior and, through `describe(state)`, the text of the
# chunk that action added. Only visited (or expanded) children are kept.

# %%
#| export
def tree_dict(node, # a research_controller.mcts.Node
              action_names:Sequence[str]=ACTION_NAMES, # names of the action indices
              describe:Callable|None=None, # state -> short text (the chunk); None = no text
              max_depth:int=6, # deeper nodes are cut
              _action=None, _n=None, _q=None, _p=None, _depth=0) -> dict:
    "Plain nested dict of an MCTS (sub)tree: action, visits N, mean value Q, prior P, tokens, text, children."
    total = int(node.N.sum()) if _n is None else int(_n)
    d = dict(action=None if _action is None else action_names[_action], N=total, Q=_q, P=_p, tokens=int(node.tokens),
             terminal=bool(node.terminal), value=float(node.tvalue if node.terminal else node.v),
             text=describe(node.state) if describe else '', children=[])
    if _depth >= max_depth: return d
    for a, c in enumerate(node.children):
        n = int(node.N[a])
        if c is None and n == 0: continue
        q = float(node.W[a] / n) if n else None
        p = None if node.P is None else float(node.P[a])
        if c is None: d['children'].append(dict(action=action_names[a], N=n, Q=q, P=p, tokens=None, terminal=False, value=None, text='', children=[]))
        else: d['children'].append(tree_dict(c, action_names, describe, max_depth, a, n, q, p, _depth + 1))
    return d

# %% [markdown]
# A real search on 05_mcts's deterministic toy tree (3 actions, depth 3), with its oracle evaluator:

# %%
from research_controller.mcts import MCTS, TreeEnv, oracle_evaluator
from research_controller.config import MCTSConfig
env = TreeEnv.random(3, 3, seed=0)
mc = MCTS(env, oracle_evaluator(env), MCTSConfig(n_sims=40, leaf_batch=4, early_stop=False), seed=0)
sr = mc.search(env.root())
tree = tree_dict(mc.root, ['a', 'b', 'c'], describe=lambda s: ''.join('abc'[i] for i in s))
test_eq(tree['N'], int(sr.visits.sum()))
test_eq([c['N'] for c in tree['children']], [int(v) for v in sr.visits if v > 0])
test_close(np.array([c['Q'] for c in tree['children']]), sr.q[sr.visits > 0], eps=1e-5)
test_eq(tree['children'][0]['children'][0]['text'], 'aa')
[(c['action'], c['N'], round(c['Q'], 3)) for c in tree['children']]

# %% [markdown]
# `plot_tree` draws it: depth left to right, edge width by visits, each node labelled with its action, visits,
# Q and prior. The most visited path is drawn in orange. `max_children` keeps only the most visited children.

# %%
#| export
def _layout(t:dict, max_depth:int, max_children:int, depth:int=0, pos=None, y=None):
    "Assign (depth, y) to each node: leaves get consecutive rows, parents the mean of their children."
    pos = {} if pos is None else pos; y = [0] if y is None else y
    kids = sorted(t['children'], key=lambda c: -c['N'])[:max_children] if depth < max_depth else []
    if not kids: pos[id(t)] = (depth, y[0]); y[0] += 1
    else:
        for c in kids: _layout(c, max_depth, max_children, depth + 1, pos, y)
        pos[id(t)] = (depth, float(np.mean([pos[id(c)][1] for c in kids])))
    t.setdefault('_kids', None); t['_kids'] = kids
    return pos

def _label(t:dict, root:bool=False) -> str:
    head = 'root' if root else t['action']
    q = '' if t['Q'] is None else f" Q={t['Q']:+.2f}"
    p = '' if t['P'] is None else f" P={t['P']:.2f}"
    txt = (t.get('text') or '').replace('\n', ' ')
    return f"{head} N={t['N']}{q}{p}" + (f"\n{txt[:24]!r}" if txt else '')

def plot_tree(tree:dict, # from `tree_dict`
              max_depth:int=3, max_children:int=4, ax=None, title:str='MCTS tree'):
    "Static matplotlib rendering of a search tree (for docs and reports)."
    from matplotlib.figure import Figure
    pos = _layout(tree, max_depth, max_children)
    n_rows = max(p[1] for p in pos.values()) + 1; depth = max(p[0] for p in pos.values())
    fig = None
    if ax is None:
        fig = Figure(figsize=(2.6 * (depth + 1) + 1, max(2.5, 0.55 * n_rows + 1)), layout='constrained'); ax = fig.subplots()
    nmax = max(1, tree['N'])
    def best_path(t):
        out = {id(t)}
        while t['_kids']: t = t['_kids'][0]; out.add(id(t))
        return out
    hot = best_path(tree)
    def draw(t):
        x0, y0 = pos[id(t)]
        for c in t['_kids'] or []:
            x1, y1 = pos[id(c)]
            ax.plot([x0, x1], [y0, y1], color='C1' if id(c) in hot else 'C0', lw=0.6 + 5 * c['N'] / nmax, alpha=0.8, zorder=1)
            draw(c)
        ax.annotate(_label(t, t is tree), (x0, y0), fontsize=7, ha='left', va='center', xytext=(4, 0), textcoords='offset points',
                    bbox=dict(boxstyle='round,pad=0.2', fc='white', ec='C1' if id(t) in hot else '0.7', lw=0.8), zorder=2)
    draw(tree)
    ax.set_xlim(-0.2, depth + 0.9); ax.set_ylim(n_rows - 0.5, -0.5); ax.axis('off'); ax.set_title(title)
    return fig if fig is not None else ax.figure

# %%
plot_tree(tree, max_depth=2)

# %%
test_eq(tree['_kids'][0]['N'], max(c['N'] for c in tree['children']))
test_eq(len(tree['_kids']), len(tree['children']))

# %% [markdown]
# ## Replaying a macro trace
# A `GenerationResult.macro_trace` lists the decisions: action, tokens, chunk. `replay_text` rebuilds the
# visible answer after each decision: CONTINUE appends its chunk, RESAMPLE replaces the last chunk, and
# thought chunks (redacted unless asked for) never enter the visible text.

# %%
#| export
REDACTED = '[thought redacted]'

def _aname(a) -> str:
    return a if isinstance(a, str) else getattr(a, 'name', None) or ACTION_NAMES[int(a)]

def replay_text(trace:list, upto:int|None=None) -> str:
    "The visible text after decision `upto` (None = all) of a macro trace."
    chunks, in_thought = [], False
    for i, st in enumerate(trace):
        if upto is not None and i > upto: break
        a, ch = _aname(st.get('action')), st.get('chunk') or ''
        if a == 'THINK_BEGIN': in_thought = True; continue
        if a == 'THINK_END': in_thought = False; continue
        if in_thought or ch == REDACTED: continue
        if a == 'RESAMPLE' and chunks: chunks[-1] = ch
        elif a in ('CONTINUE', 'RESAMPLE'): chunks.append(ch)
    return ''.join(chunks)

# %%
demo_trace = [dict(step=0, action='CONTINUE', tokens=3, spent=3, chunk='The capital'),
              dict(step=1, action='THINK_BEGIN', tokens=1, spent=4, chunk=REDACTED),
              dict(step=2, action='CONTINUE', tokens=3, spent=7, chunk=REDACTED),
              dict(step=3, action='THINK_END', tokens=1, spent=8, chunk=REDACTED),
              dict(step=4, action='CONTINUE', tokens=3, spent=11, chunk=' of Franc'),
              dict(step=5, action='RESAMPLE', tokens=3, spent=14, chunk=' of France is Paris.'),
              dict(step=6, action='STOP', tokens=0, spent=14, chunk='')]
test_eq(replay_text(demo_trace, 0), 'The capital')
test_eq(replay_text(demo_trace, 4), 'The capital of Franc')
replay_text(demo_trace)

# %%
test_eq(replay_text(demo_trace), 'The capital of France is Paris.')
test_eq(replay_text([dict(action=3, chunk='x')]), 'x')

# %% [markdown]
# ## `TreeExplorer`
# A notebook widget with two panes. The trace pane steps through a macro trace (slider, ◀ ▶) and shows the text so
# far, the decision and its features, and, for search controllers, the root statistics of that decision's
# search (visits, Q, prior per action). The tree pane walks an MCTS tree: one button per explored child, ↑ to the
# parent, ⌂ to the root, and the current node's children as a table. Its logic is plain Python state
# (`path`, `step`), so it is tested by clicking the buttons in code.

# %%
#| export
def _table_html(rows:list, cols:list) -> str:
    head = ''.join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = ''.join('<tr>' + ''.join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + '</tr>' for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"

class TreeExplorer:
    "Interactive explorer of a macro trace and/or an MCTS tree (ipywidgets); `path` and `step` hold its state."
    def __init__(self, tree:dict|None=None, # from `tree_dict` (or an mcts Node, converted with `action_names`/`describe`)
                 trace:list|None=None, # a GenerationResult.macro_trace
                 search:list|None=None, # per-decision search summaries (GenerationResult.meta['search'] of a search controller)
                 action_names:Sequence[str]=ACTION_NAMES, describe:Callable|None=None,
                 trees:dict|None=None): # {decision index: tree} (from `search_trees`): the tree pane follows the trace pane
        conv = lambda t: t if t is None or isinstance(t, dict) else tree_dict(t, action_names, describe)
        self._tree, self.trees = conv(tree), {int(k): conv(v) for k, v in (trees or {}).items()}
        if self._tree is None and not self.trees and not trace:
            raise ValueError("TreeExplorer needs a tree (tree_dict or mcts Node), per-decision trees or a non-empty macro trace.")
        self.trace, self.search = list(trace or []), list(search or [])
        self.path, self.step, self._w = [], 0, None

    @property
    def tree(self) -> dict|None:
        "The tree shown: the current decision's search tree when `trees` was given, else `tree`."
        return self.trees.get(self.step) if self.trees else self._tree

    @property
    def node(self) -> dict|None:
        "The tree node at `path`."
        t = self.tree
        for a in self.path: t = next(c for c in t['children'] if c['action'] == a)
        return t

    def select(self, action:str):
        "Go down to the child reached by `action`."
        if self.tree is None: raise ValueError(f"no search tree at decision {self.step + 1}." if self.trees else "no tree to explore.")
        names = [c['action'] for c in self.node['children']]
        if action not in names: raise ValueError(f"no explored child {action!r} here; explored children: {names}.")
        self.path.append(action); self._refresh(); return self

    def up(self):
        "Go to the parent (no-op at the root)."
        if self.path: self.path.pop()
        self._refresh(); return self

    def top(self):
        "Go back to the root."
        self.path = []; self._refresh(); return self

    def goto(self, i:int):
        "Show decision `i` of the trace (clipped to the trace)."
        step = int(min(max(i, 0), max(len(self.trace) - 1, 0)))
        if self.trees and step != self.step: self.path = []  # another decision, another tree: start at its root
        self.step = step; self._refresh(); return self

    def _refresh(self):
        if self._w is not None: self._sync()

    def __repr__(self): return f"TreeExplorer(path={self.path}, step={self.step}/{len(self.trace)})"

# %% [markdown]
# What the panes show, as HTML strings (so they are testable without a browser):

# %%
#| export
@patch
def trace_html(self:TreeExplorer) -> str:
    "HTML of the trace pane: text so far, the decision, its features and its search statistics."
    if not self.trace: return '<i>no trace</i>'
    st = self.trace[self.step]
    feats = st.get('features') or {}
    out = [f"<b>decision {self.step + 1}/{len(self.trace)}</b>: {html.escape(_aname(st.get('action')))}, "
           f"+{st.get('tokens', '?')} tokens ({st.get('spent', '?')} spent)",
           f"<pre>{html.escape(replay_text(self.trace, self.step))}</pre>",
           f"chunk: <code>{html.escape(repr(st.get('chunk', '')))}</code>"]
    if feats: out.append(_table_html([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in feats.items()}], list(feats)))
    if self.step < len(self.search) and isinstance(self.search[self.step].get('visits'), dict):
        s = self.search[self.step]
        rows = [dict(action=a, visits=s['visits'][a], Q=s['q'].get(a), prior=s['priors'].get(a)) for a in s['visits']]
        out.append(f"search: {s.get('n_sims', '?')} sims, root value {s.get('root_value', '?')}" + _table_html(rows, ['action', 'visits', 'Q', 'prior']))
    return '<br>'.join(out)

@patch
def node_html(self:TreeExplorer) -> str:
    "HTML of the tree pane: where we are and the current node's children."
    if self.tree is None: return f'<i>no search at decision {self.step + 1}</i>' if self.trees else '<i>no tree</i>'
    t = self.node
    rows = [dict(action=c['action'], N=c['N'], Q=_fmt(c['Q'], '+.3f'), P=_fmt(c['P'], '.3f'), text=c.get('text', '')) for c in t['children']]
    where = ' → '.join([f'decision {self.step + 1}: root' if self.trees else 'root', *self.path])
    return (f"<b>{html.escape(where)}</b>: N={t['N']}, value {_fmt(t['value'], '+.3f')}, tokens {t['tokens']}"
            f"{', terminal' if t['terminal'] else ''}<br>" + (_table_html(rows, ['action', 'N', 'Q', 'P', 'text']) if rows else '<i>leaf</i>'))

# %%
ex = TreeExplorer(tree, demo_trace)
ex.select('a').select('b')
test_eq(ex.node['text'], 'ab')
test_eq(ex.up().path, ['a'])
test_fail(lambda: ex.select('zz'), contains="no explored child 'zz'")
test_eq(ex.top().path, [])
test_eq(ex.goto(99).step, len(demo_trace) - 1)
assert 'The capital of France is Paris.' in ex.trace_html()
ex.node_html()[:120]

# %% [markdown]
# The widget: buttons and a slider bound to those methods. Building it needs ipywidgets (the `[widgets]`
# or `[dev]` extra).

# %%
#| export
@patch
def _build(self:TreeExplorer):
    "Create the widgets and bind them to the explorer's methods."
    import ipywidgets as W
    self.trace_out, self.node_out = W.HTML(), W.HTML()
    self.slider = W.IntSlider(value=self.step + 1, min=1, max=max(len(self.trace), 1), description='decision', continuous_update=False)  # 1-based, as 'decision k/N'
    self.prev_btn, self.next_btn = W.Button(description='◀', layout=W.Layout(width='40px')), W.Button(description='▶', layout=W.Layout(width='40px'))
    self.slider.observe(lambda ch: self.goto(ch['new'] - 1) if ch['new'] - 1 != self.step else None, names='value')
    self.prev_btn.on_click(lambda _: self.goto(self.step - 1)); self.next_btn.on_click(lambda _: self.goto(self.step + 1))
    self.up_btn, self.top_btn = W.Button(description='↑ parent'), W.Button(description='⌂ root')
    self.up_btn.on_click(lambda _: self.up()); self.top_btn.on_click(lambda _: self.top())
    self.child_box = W.HBox()
    panes = []
    if self.trace: panes.append(W.VBox([W.HBox([self.prev_btn, self.slider, self.next_btn]), self.trace_out]))
    if self.tree is not None or self.trees: panes.append(W.VBox([W.HBox([self.up_btn, self.top_btn]), self.child_box, self.node_out]))
    self._w = W.VBox(panes) if len(panes) == 1 else W.Tab(children=panes, titles=('trace', 'tree'))
    self._refresh()

@patch
def _sync(self:TreeExplorer):
    "Bring the widgets in line with `path` and `step`."
    import ipywidgets as W
    self.trace_out.value, self.node_out.value = self.trace_html(), self.node_html()
    if self.slider.value != self.step + 1: self.slider.value = self.step + 1
    btns = []
    if self.tree is not None:
        for c in self.node['children']:
            b = W.Button(description=f"{c['action']} (N={c['N']})", tooltip=c.get('text') or '', layout=W.Layout(width='auto'))  # full label
            b.on_click(lambda _, at=tuple(self.path), a=c['action']: self._click_child(at, a)); btns.append(b)
    self.child_box.children = btns

@patch
def _click_child(self:TreeExplorer, at:tuple, action:str):
    "A child button's click: go down, unless the button is stale (made for another node, clicked while the view was redrawn)."
    if tuple(self.path) == at: self.select(action)

@patch(as_prop=True)
def widget(self:TreeExplorer):
    "The ipywidgets view (built on first use)."
    if self._w is None: self._build()
    return self._w

@patch
def _ipython_display_(self:TreeExplorer):
    from IPython.display import display
    display(self.widget)

# %% [markdown]
# Clicking in code, as a user would in the notebook (`benchmarks/widget_lab.py` does the same with real clicks in a live
# JupyterLab, in headless Chromium):

# %%
ex = TreeExplorer(tree, demo_trace)
w = ex.widget
ex.child_box.children[0].click()
ex.child_box.children[0].click()
test_eq(len(ex.path), 2)
test_eq(ex.node['text'], ''.join(ex.path))
ex.up_btn.click(); test_eq(len(ex.path), 1)
ex.top_btn.click(); test_eq(ex.path, [])
test_eq(len(ex.child_box.children), len(tree['children']))
test_eq({b.layout.width for b in ex.child_box.children}, {'auto'})  # as wide as their labels: the default width cuts 'THINK_BEGIN (N=12)'
stale = ex.child_box.children[0]; stale.click(); stale.click()  # the second click hits a button of the old view: ignored
test_eq(len(ex.path), 1); ex.top()
ex.next_btn.click(); ex.next_btn.click(); test_eq((ex.step, ex.slider.value), (2, 3))  # the slider counts from 1, as the pane does
ex.slider.value = 6; test_eq(ex.step, 5)
assert 'The capital of France is Paris.' in ex.trace_out.value and 'RESAMPLE' in ex.trace_out.value
ex.prev_btn.click(); test_eq(ex.step, 4)
ex

# %% [markdown]
# ### The trees of a real generation
# `search_trees` runs a search controller (`MCTSController`) and snapshots, through its `on_search` callbacks, the
# tree of every decision's search before the move; given those as `trees`, the tree pane follows the trace pane:
# step to decision k and it shows the search that chose decision k. Node texts come from the engine's own trace,
# so a chunk inside a thought reads `[thought redacted]` here too.

# %%
#| export
def search_trees(ctl, # a search controller with `on_search` callbacks (selfplay.MCTSController)
                 engine, prompt:str, max_new_tokens:int, seed:int=0,
                 max_depth:int=6): # deeper nodes are cut from the snapshots
    "Generate with `ctl`, keeping a `tree_dict` of each decision's search; returns (GenerationResult, {decision: tree})."
    if not hasattr(ctl, 'on_search'): raise TypeError(f"{type(ctl).__name__} does not search (no on_search callbacks); use selfplay.MCTSController.")
    def describe(s):
        tr = engine.result(s.gs).macro_trace
        return (tr[-1].get('chunk') or '') if tr else ''
    trees = {}
    def snap(i, mcts, r): trees[i] = tree_dict(mcts.root, ACTION_NAMES, describe, max_depth)
    ctl.on_search.append(snap)
    try: res = ctl.generate(engine, prompt, max_new_tokens, seed=seed)
    finally: ctl.on_search.remove(snap)
    return res, trees

# %% [markdown]
# On the tiny random model with a random network (fast; the shapes, not the choices, are the point):

# %%
from research_controller.slm import tiny_slm
from research_controller.engine import Engine
from research_controller.network import PolicyValueNet
from research_controller.macro_actions import N_ACTIONS
from research_controller.selfplay import MCTSController
import torch
tcfg = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4'])
teng = Engine(*tiny_slm(tcfg), tcfg)
torch.manual_seed(0)
tmc = MCTSController(PolicyValueNet(teng.feature_dim, N_ACTIONS, tcfg.network), tcfg, n_sims=4)
tres, ttrees = search_trees(tmc, teng, "Why is the sky blue?", 32)
searched = [i for i, t in enumerate(tres.meta['search']) if t['n_sims']]
test_eq(sorted(ttrees), searched)
test_eq([ttrees[i]['N'] for i in searched], [tres.meta['search'][i]['n_sims'] + tres.meta['search'][i]['reused_visits'] for i in searched])  # a reused subtree brings its visits
test_eq(tmc.on_search, [])  # the snapshot callback is removed again
test_fail(lambda: search_trees(object(), teng, "Hi", 8), contains='does not search')
tx = TreeExplorer(trace=tres.macro_trace, search=tres.meta['search'], trees=ttrees)
w = tx.widget
first = tx.child_box.children[0].description.split(' ')[0]
tx.child_box.children[0].click(); test_eq(tx.path, [first])
tx.next_btn.click()  # the next decision: its own tree, from its root
test_eq((tx.step, tx.path, tx.tree is ttrees.get(1)), (1, [], True))
tx.goto(len(tres.macro_trace) - 1)
assert tx.tree is not None or 'no search at decision' in tx.node_out.value
tx.goto(0); tx.node_html()[:90]
