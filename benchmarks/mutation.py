"""Mutation check of the core notebooks: flip one comparison, sign, boolean or constant in an exported cell,
run that notebook's own tests, and count the mutants the tests kill.

    python benchmarks/mutation.py                       # default notebooks, 12 mutants each (seeded sample)
    python benchmarks/mutation.py --per-notebook 0      # every mutant (slow: hours for the rewards notebook)
    python benchmarks/mutation.py --notebooks 14_promotion --per-notebook 30

Each mutant is a copy of one notebook with one change, tested with `nbdev-test` in a scratch copy of the
project's nbdev config (the repository is never modified). A mutant is *killed* when the tests fail, *timed out*
when they run past --timeout (counted as killed, reported apart), and *survived* when they pass: a survivor is
either a gap in the tests or a harmless change (an equivalent mutant); the JSON lists every survivor with its
cell and line so a reader can judge which. Results: benchmarks/results/mutation.json.
"""
from research_controller.config import atomic_write_json
import argparse, ast, copy, json, os, random, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ['05_mcts', '14_promotion', '13_evaluate', '04_engine', '08_rewards']
FLIP_CMP = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
            ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
FLIP_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}

def mutation_sites(tree:ast.AST) -> list:
    "Every (node path, kind, description) this script can mutate in `tree`, in source order."
    out = []
    for node in ast.walk(tree):
        ln = getattr(node, 'lineno', 0)
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in FLIP_CMP: out.append((node, ('cmp', i), f"line {ln}: {type(op).__name__} -> {FLIP_CMP[type(op)].__name__}"))
        elif isinstance(node, ast.BinOp) and type(node.op) in FLIP_BIN:
            out.append((node, ('bin',), f"line {ln}: {type(node.op).__name__} -> {FLIP_BIN[type(node.op)].__name__}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            out.append((node, ('unary',), f"line {ln}: drop {type(node.op).__name__}"))
        elif isinstance(node, ast.BoolOp):
            out.append((node, ('bool',), f"line {ln}: {type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool) and not isinstance(getattr(node, '_parent', None), ast.keyword):
            v = node.value
            new = (not v) if isinstance(v, bool) else (1 if v == 0 else 0) if isinstance(v, int) else (v * 2 if v else 1.0)
            out.append((node, ('const', new), f"line {ln}: {v!r} -> {new!r}"))
    return out

def apply(node, how) -> None:
    "Mutate `node` in place."
    if how[0] == 'cmp': node.ops[how[1]] = FLIP_CMP[type(node.ops[how[1]])]()
    elif how[0] == 'bin': node.op = FLIP_BIN[type(node.op)]()
    elif how[0] == 'bool': node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif how[0] == 'const': node.value = how[1]
    elif how[0] == 'unary':  # -x -> x, not x -> x
        node.__class__ = ast.Call; node.func = ast.Name('(lambda v: v)', ast.Load()); node.args = [node.operand]; node.keywords = []

def mutants(nb:dict) -> list:
    "(cell index, site index, description) of every mutant of the exported code cells of `nb`."
    out = []
    for ci, c in enumerate(nb['cells']):
        src = ''.join(c['source'])
        if c['cell_type'] != 'code' or not src.lstrip().startswith('#| export'): continue
        try: tree = ast.parse(src)
        except SyntaxError: continue
        for si, (_, _, desc) in enumerate(mutation_sites(tree)): out.append((ci, si, desc))
    return out

def mutated(nb:dict, ci:int, si:int) -> dict:
    "A copy of `nb` with site `si` of cell `ci` mutated (directive lines kept, the code re-rendered by ast.unparse)."
    nb = copy.deepcopy(nb); c = nb['cells'][ci]; src = ''.join(c['source'])
    tree = ast.parse(src); node, how, _ = mutation_sites(tree)[si]
    apply(node, how)
    head = [l for l in src.splitlines() if l.startswith('#|')]
    code = ast.unparse(ast.fix_missing_locations(tree)).replace('(lambda v: v)', '')
    c['source'] = '\n'.join(head + [code])
    return nb

def scratch_project(tmp:Path) -> Path:
    "A folder with the project's nbdev config and an nbs/ folder, where mutated notebooks are tested."
    shutil.copy(ROOT/'pyproject.toml', tmp/'pyproject.toml')
    (tmp/'nbs').mkdir()
    for f in ('_quarto.yml', 'nbdev.yml'):
        if (ROOT/'nbs'/f).exists(): shutil.copy(ROOT/'nbs'/f, tmp/'nbs'/f)
    return tmp/'nbs'

def run_nb(path:Path, timeout:int) -> str:
    "'passed', 'failed' or 'timeout' for the tests of one notebook."
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
               TOKENIZERS_PARALLELISM='false', MPLBACKEND='Agg', WANDB_MODE='offline')
    try: r = subprocess.run(['nbdev-test', str(path), '--n-workers', '0'], cwd=path.parent.parent, env=env,
                            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired: return 'timeout'
    return 'passed' if r.returncode == 0 and 'Failed' not in r.stdout + r.stderr else 'failed'

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--notebooks', nargs='*', default=DEFAULT, help=f"notebook stems (default {' '.join(DEFAULT)})")
    ap.add_argument('--per-notebook', type=int, default=12, help="mutants sampled per notebook (seeded); 0 = all")
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--timeout', type=int, default=300, help="seconds per test run before a mutant counts as timed out")
    ap.add_argument('--out', default=str(ROOT/'benchmarks'/'results'/'mutation.json'))
    a = ap.parse_args(argv)
    report, t_all = {'per_notebook': {}, 'settings': vars(a)}, time.time()
    with tempfile.TemporaryDirectory() as d:
        nbs_dir = scratch_project(Path(d))
        for stem in a.notebooks:
            nb = json.loads((ROOT/'nbs'/f'{stem}.ipynb').read_text(encoding='utf-8'))
            target = nbs_dir/f'{stem}.ipynb'
            target.write_text(json.dumps(nb), encoding='utf-8')
            base = run_nb(target, a.timeout)
            if base != 'passed':
                print(f"{stem}: the unmutated notebook does not pass ({base}); skipped"); continue
            ms = mutants(nb)
            pick = ms if a.per_notebook <= 0 or a.per_notebook >= len(ms) else random.Random(a.seed).sample(ms, a.per_notebook)
            res, t0 = [], time.time()
            for k, (ci, si, desc) in enumerate(sorted(pick)):
                try: m = mutated(nb, ci, si)
                except Exception as e: res.append(dict(cell=nb['cells'][ci].get('id'), mutation=desc, outcome='invalid', why=str(e))); continue
                target.write_text(json.dumps(m), encoding='utf-8')
                out = run_nb(target, a.timeout)
                res.append(dict(cell=nb['cells'][ci].get('id'), mutation=desc, outcome=out))
                print(f"{stem} [{k + 1}/{len(pick)}] {desc}: {out}", flush=True)
            n = sum(r['outcome'] in ('failed', 'timeout', 'passed') for r in res)
            killed = sum(r['outcome'] in ('failed', 'timeout') for r in res)
            report['per_notebook'][stem] = dict(sites=len(ms), tested=n, killed=killed, timed_out=sum(r['outcome'] == 'timeout' for r in res),
                                                survived=[r for r in res if r['outcome'] == 'passed'], seconds=round(time.time() - t0, 1),
                                                results=res)
            print(f"{stem}: {killed}/{n} killed ({killed / max(n, 1):.0%}) of {len(ms)} sites, {time.time() - t0:.0f} s")
    tested = sum(v['tested'] for v in report['per_notebook'].values()); killed = sum(v['killed'] for v in report['per_notebook'].values())
    report.update(tested=tested, killed=killed, kill_share=round(killed / max(tested, 1), 4), seconds=round(time.time() - t_all, 1))
    atomic_write_json(a.out, report)
    print(f"\nkilled {killed} of {tested} mutants ({report['kill_share']:.0%}); survivors:")
    for stem, v in report['per_notebook'].items():
        for s in v['survived']: print(f"  {stem} cell {s['cell']}: {s['mutation']}")
    print(f"written {a.out}")

if __name__ == '__main__': main()
