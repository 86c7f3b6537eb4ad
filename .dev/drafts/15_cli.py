# %%
#| default_exp cli

# %% [markdown]
# # CLI
# > `rc`: generate with a controller, build the fluency LM, self-play, train, evaluate, run a learning cycle, inspect and roll back versions, serve and report.

# %%
#| export
from __future__ import annotations
import argparse, contextlib, getpass, io, json, logging, math, os, sys, traceback
from pathlib import Path
from typing import Callable, Sequence
from research_controller.config import Config, ConfigError, load_config, run_path

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import json, os, re, subprocess, sys, tempfile

# %% [markdown]
# Every subcommand shares three options: `--config PATH` (a YAML file, see `configs/default.yaml`), repeatable
# `--set key=value` overrides, and `--log-level`. A mistake on the command line or in the config is one
# clear line on stderr and exit code 2, never a traceback; a failure of the work itself is one line and
# exit code 1 (the traceback is logged at `--log-level debug`).

# %%
#| export
log = logging.getLogger(__name__)

class CLIError(Exception):
    "A problem the user can fix; printed as one line, the process exits with `code`."
    def __init__(self, msg:str, code:int=2): super().__init__(msg); self.code = code

class _Parser(argparse.ArgumentParser):
    "An ArgumentParser whose errors raise `CLIError` (one line) instead of printing usage and exiting."
    def error(self, message): raise CLIError(f"{message} (see `{self.prog} --help`)")

LOG_LEVELS = ('debug', 'info', 'warning', 'error')

def _common() -> argparse.ArgumentParser:
    "The options every subcommand accepts."
    p = _Parser(add_help=False)
    g = p.add_argument_group('common options')
    g.add_argument('--config', metavar='PATH', help="YAML config file (default: the built-in defaults, = configs/default.yaml)")
    g.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help="override one config key, e.g. --set mcts.n_sims=32 (repeatable)")
    g.add_argument('--log-level', default='warning', choices=LOG_LEVELS, help="logging level on stderr (default: warning)")
    return p

# %% [markdown]
# Subcommands register themselves with `command`: a name, a one-line help, a function adding their
# arguments and the function that runs them with the parsed arguments and the loaded config.

# %%
#| export
COMMANDS = {}

def command(name:str, help:str, args:Callable|None=None):
    "Register the decorated `f(ns, cfg) -> int|None` as subcommand `name`; `args(parser)` adds its arguments."
    def deco(f):
        COMMANDS[name] = dict(help=help, args=args, run=f)
        return f
    return deco

def build_parser() -> argparse.ArgumentParser:
    "The `rc` argument parser with every registered subcommand."
    p = _Parser(prog='rc', description="research_controller: a learned controller that steers a frozen small language model.")
    sub = p.add_subparsers(dest='command', metavar='COMMAND', parser_class=_Parser)
    common = _common()
    for name, c in COMMANDS.items():
        sp = sub.add_parser(name, help=c['help'], description=c['help'], parents=[common])
        if c['args']: c['args'](sp)
    return p

# %% [markdown]
# Each command's output is printed to stdout; `out` is looked up at call time so tests can capture it.

# %%
#| export
def _print(*a, **kw): print(*a, file=sys.stdout, **kw)

def _table(rows:list, cols:list) -> str:
    "A plain fixed-width text table of `rows` (dicts) with columns `cols`."
    cells = [[str(c) for c in cols]] + [[str(r.get(c, '')) for c in cols] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    return '\n'.join('  '.join(x.ljust(w[i]) for i, x in enumerate(r)).rstrip() for r in cells)

# %%
print(_table([dict(a=1, b='xy'), dict(a=22, b='')], ['a', 'b']))
test_eq(_table([dict(a=1)], ['a', 'b']).splitlines(), ['a  b', '1'])

# %% [markdown]
# ## `rc generate`
# The answer, then the macro-actions that produced it as a table (thought chunks are shown as
# `[thought redacted]` unless `--show-thoughts`). `--json` prints the whole `GenerationResult` instead.
# `--controller` takes a baseline name (`greedy`, `sampling`, `best_of_n`, `threshold`), a registry
# version (`v3`), or `active` (the promoted controller; the threshold controller while none is).

# %%
#| export
def _action_name(a) -> str:
    from research_controller.macro_actions import ACTION_NAMES
    if isinstance(a, str): return a
    if hasattr(a, 'name'): return a.name
    return ACTION_NAMES[int(a)]

def trace_rows(trace:list, width:int=60) -> list:
    "Rows of a macro_trace for `_table`: step, action, tokens, spent and the chunk (repr, cut to `width`)."
    rows = []
    for i, st in enumerate(trace or []):
        ch = st.get('chunk', '')
        ch = repr(ch) if isinstance(ch, str) else ''
        if len(ch) > width: ch = ch[:width - 1] + '…'
        rows.append(dict(step=st.get('step', i), action=_action_name(st.get('action', '?')), tokens=st.get('tokens', ''),
                         spent=st.get('spent', ''), chunk=ch))
    return rows

# %%
print(_table(trace_rows([dict(step=0, action='CONTINUE', tokens=8, spent=8, chunk=' Paris is'),
                         dict(step=1, action=4, tokens=0, spent=8, chunk='')]), ['step', 'action', 'tokens', 'spent', 'chunk']))
test_eq(trace_rows([dict(action=1, chunk='x'*100)], width=10)[0]['chunk'], "'xxxxxxxx…")
test_eq(trace_rows([dict(action=1)])[0]['action'], 'THINK_BEGIN')

# %%
#| export
def _controller_spec(spec:str|None) -> str|None:
    "Normalise `--controller`: None/'active' mean the active version."
    return None if spec in (None, '', 'active') else spec

def run_generate(cfg:Config, prompt:str, controller:str|None=None, max_new_tokens:int|None=None, seed:int=0,
                 include_thoughts:bool=False):
    "Generate `prompt` with the controller named by `controller` (a baseline, 'vN', 'active' or None)."
    from research_controller import engine as E
    from research_controller.promotion import resolve_controller
    spec = _controller_spec(controller)
    budget = max_new_tokens or cfg.macro.max_new_tokens
    if spec in E.BASELINES:
        return E.generate_text(cfg, prompt, controller=spec, max_new_tokens=budget, seed=seed, include_thoughts=include_thoughts)
    try: ctl = resolve_controller(cfg, spec)  # the active version (threshold while none), or 'vN'
    except ValueError as e: raise CLIError(f"--controller {spec!r}: {e}") from None
    return ctl.generate(E.get_engine(cfg), prompt, budget, seed=seed, include_thoughts=include_thoughts)

def _generate_args(p):
    p.add_argument('prompt', help="the user prompt")
    p.add_argument('--controller', default='active', metavar='NAME',
                   help="greedy | sampling | best_of_n | threshold | vN (a registry version) | active (default)")
    p.add_argument('--max-new-tokens', type=int, default=None, metavar='N', help="total token budget (thoughts and resamples count); default macro.max_new_tokens")
    p.add_argument('--seed', type=int, default=0, help="generation seed (default 0)")
    p.add_argument('--json', action='store_true', help="print the GenerationResult as JSON")
    p.add_argument('--show-thoughts', action='store_true', help="include hidden thought text in the output (never in logs)")

@command('generate', "generate an answer to a prompt with a controller and show its macro-actions", _generate_args)
def _cmd_generate(ns, cfg):
    if ns.max_new_tokens is not None and ns.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be a positive integer, got {ns.max_new_tokens}.")
    if not ns.prompt.strip(): raise CLIError("the prompt is empty; pass the text to answer, e.g. rc generate \"What is 2+2?\".")
    res = run_generate(cfg, ns.prompt, ns.controller, ns.max_new_tokens, ns.seed, ns.show_thoughts)
    if ns.json:
        _print(json.dumps(res.to_dict(), ensure_ascii=False, indent=1, default=str)); return 0
    _print(res.text)
    n = len(res.macro_trace)
    _print(f"\n{n} decision{'' if n == 1 else 's'}, {res.tokens} tokens spent, {res.latency_ms:.0f} ms"
           f"{'' if not res.meta.get('controller') else ', controller ' + str(res.meta.get('controller'))}")
    _print(_table(trace_rows(res.macro_trace), ['step', 'action', 'tokens', 'spent', 'chunk']))
    if ns.show_thoughts and res.thought_text: _print(f"\nthoughts:\n{res.thought_text}")
    return 0

# %% [markdown]
# ## Building, self-play, training, evaluation, cycles
# Thin wrappers: the work lives in the notebooks that own it; the CLI only maps arguments to their calls
# and prints what came back.

# %%
#| export
def _need(module:str, name:str):
    "Import `name` from research_controller.`module`, or a one-line error saying the backend is missing."
    import importlib
    try: return getattr(importlib.import_module(f'research_controller.{module}'), name)
    except (ImportError, AttributeError) as e:
        raise CLIError(f"research_controller.{module}.{name} is not available in this installation ({e}); "
                       f"update research_controller.", code=1) from None

def _show(obj):
    "Print a result object: dataclass fields as `key: value` lines, or its repr."
    import dataclasses
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, (list, tuple)) and len(v) > 6: v = f"[{len(v)} items]"
            _print(f"{f.name}: {v}")
    else: _print(obj if isinstance(obj, str) else repr(obj))

@command('build-lm', "build the KenLM fluency model (rewards.kenlm_path) from the shipped training text")
def _cmd_build_lm(ns, cfg):
    _show(_need('rewards', 'build_lm')(cfg)); return 0

def _selfplay_args(p):
    p.add_argument('--episodes', type=int, default=None, help="episodes to play (default selfplay config)")
    p.add_argument('--checkpoint', default=None, metavar='PATH', help="network checkpoint guiding the search (default: the active version, else a fresh network)")
    p.add_argument('--buffer', default=None, metavar='PATH', help="replay buffer directory (default runs/<selfplay.out_dir>/buffer)")
    p.add_argument('--seed', type=int, default=None, help="self-play seed (default selfplay config)")
    p.add_argument('--no-progress', action='store_true', help="no progress bar")

@command('selfplay', "play self-play episodes with MCTS into the replay buffer", _selfplay_args)
def _cmd_selfplay(ns, cfg):
    if ns.episodes is not None and ns.episodes < 1: raise CLIError(f"--episodes must be a positive integer, got {ns.episodes}.")
    f = _need('selfplay', 'run_selfplay')
    _show(f(cfg, checkpoint=ns.checkpoint, episodes=ns.episodes, buffer_path=ns.buffer, seed=ns.seed, progress=not ns.no_progress)); return 0

def _train_args(p):
    p.add_argument('--buffer', default=None, metavar='PATH', help="replay buffer directory (default: the self-play buffer)")
    p.add_argument('--init', default=None, metavar='PATH', help="checkpoint to start from (default: a fresh network)")
    p.add_argument('--out-dir', default=None, metavar='PATH', help="checkpoint directory (default train.checkpoint_dir)")
    p.add_argument('--steps', type=int, default=None, help="optimiser steps (default train.steps)")
    p.add_argument('--no-resume', action='store_true', help="start over instead of resuming from the last checkpoint in --out-dir")
    p.add_argument('--no-progress', action='store_true', help="no progress bar")

@command('train', "train the policy/value network on the replay buffer", _train_args)
def _cmd_train(ns, cfg):
    if ns.steps is not None and ns.steps < 1: raise CLIError(f"--steps must be a positive integer, got {ns.steps}.")
    f = _need('train', 'train')
    _show(f(cfg, buffer_path=ns.buffer, init_checkpoint=ns.init, out_dir=ns.out_dir, steps=ns.steps,
            resume=not ns.no_resume, progress=not ns.no_progress)); return 0

def _evaluate_args(p):
    p.add_argument('--controller', action='append', default=None, metavar='NAME',
                   help="controller(s) to evaluate: baseline names, vN or active (repeatable; default: the evaluate config)")
    p.add_argument('--compare', action='store_true', help="compare the controllers pairwise at equal budget and write compare.md and plots")
    p.add_argument('--out-dir', default=None, metavar='PATH', help="where results go (default runs/<evaluate.out_dir>)")
    p.add_argument('--no-progress', action='store_true', help="no progress bar")

@command('evaluate', "run controllers on the fixed benchmark suite at equal token budget", _evaluate_args)
def _cmd_evaluate(ns, cfg):
    import inspect
    f = _need('evaluate', 'run_compare')
    kw = dict(controllers=ns.controller, compare=ns.compare, out_dir=ns.out_dir, progress=not ns.no_progress)
    params = inspect.signature(f).parameters
    kw = {k: v for k, v in kw.items() if k in params and v is not None}
    _show(f(cfg, **kw)); return 0

def _cycle_args(p):
    p.add_argument('--dry-run', action='store_true', help="decide but do not promote")

@command('cycle', "one online-learning cycle: self-play, train a challenger, benchmark it, promote it if it wins", _cycle_args)
def _cmd_cycle(ns, cfg):
    import inspect
    f = _need('promotion', 'cycle')
    rep = f(cfg, dry_run=ns.dry_run) if 'dry_run' in inspect.signature(f).parameters else f(cfg)
    _show(rep); return 0

# %% [markdown]
# ## Versions: `rc status`, `rc versions`, `rc rollback`
# These read the registry (`promotion.registry_dir`) and the cycle reports (`promotion.reports_dir`);
# a rollback needs a reason (`--why`) for the audit trail.

# %%
#| export
def _registry(cfg, must_exist:bool=True):
    from research_controller.promotion import ControllerRegistry
    root = run_path(cfg, cfg.promotion.registry_dir)
    if must_exist and not (root/'versions').is_dir(): return None
    return ControllerRegistry.from_config(cfg)

def version_rows(cfg:Config) -> list:
    "One dict per registered version: version, active marker, parent, registered_at, notes."
    reg = _registry(cfg)
    if reg is None: return []
    act = reg.active(); rows = []
    for v in reg.versions():
        m = reg.meta(v)
        rows.append(dict(version=v, active='*' if v == act else '', parent=m.get('parent_version') or '-',
                         registered=str(m.get('registered_at', ''))[:19], notes=str(m.get('notes', ''))[:50]))
    return rows

@command('versions', "list the registered controller versions (* = active)")
def _cmd_versions(ns, cfg):
    rows = version_rows(cfg)
    if not rows: _print(f"no versions registered in {run_path(cfg, cfg.promotion.registry_dir)}"); return 0
    _print(_table(rows, ['version', 'active', 'parent', 'registered', 'notes'])); return 0

@command('status', "the active version, the registered versions and the last cycle report")
def _cmd_status(ns, cfg):
    from research_controller.promotion import load_reports
    reg = _registry(cfg)
    _print(f"registry: {run_path(cfg, cfg.promotion.registry_dir)}")
    _print(f"active: {(reg.active() if reg else None) or 'none (the threshold controller answers)'}")
    _print(f"versions: {', '.join(reg.versions()) if reg and reg.versions() else 'none'}")
    if reg:
        probs = reg.check()
        if probs: _print('problems:\n  ' + '\n  '.join(probs))
    rdir = run_path(cfg, cfg.promotion.reports_dir)
    reps = load_reports(rdir) if rdir.is_dir() else []
    if not reps: _print("last report: none"); return 0
    r = reps[-1]; d = r.get('decision', {})
    _print(f"last report: cycle {r.get('cycle')} finished {r.get('finished_at')}: "
           f"{'ACCEPTED' if d.get('accepted') else 'REJECTED'} {d.get('challenger', '')} vs {d.get('champion', '')}"
           f"{', promoted ' + r['promoted_version'] if r.get('promoted_version') else ''}")
    for line in d.get('reasons', []): _print(f"  {line}")
    return 0

def _rollback_args(p):
    p.add_argument('version', help="version to make active again, e.g. v2 (or 'previous')")
    p.add_argument('--why', required=True, help="reason, recorded in the audit trail")
    p.add_argument('--who', default=None, help="who rolls back (default: the login name)")

@command('rollback', "make an earlier controller version active again (audited)", _rollback_args)
def _cmd_rollback(ns, cfg):
    from research_controller.promotion import RegistryError, version_name
    reg = _registry(cfg)
    if reg is None: raise CLIError(f"no registry at {run_path(cfg, cfg.promotion.registry_dir)}; nothing to roll back.", code=1)
    if not ns.why.strip(): raise CLIError("--why must say why you roll back (it goes into the audit trail).")
    v = None if ns.version == 'previous' else ns.version
    try:
        if v is not None: v = version_name(v)
    except RegistryError as e: raise CLIError(f"VERSION: {e}") from None
    who = ns.who or getpass.getuser()
    ev = reg.rollback(v, who=who, why=ns.why)
    _print(f"active: {ev['version']} (was {ev['previous']}), event {ev['seq']} by {who}: {ns.why}"); return 0

# %% [markdown]
# ## `rc serve` and `rc report`

# %%
#| export
def _serve_args(p):
    p.add_argument('--host', default=None, help="bind address (default serve.host)")
    p.add_argument('--port', type=int, default=None, help="TCP port (default serve.port)")

@command('serve', "serve the active controller over HTTP", _serve_args)
def _cmd_serve(ns, cfg):
    from research_controller.config import replace_config
    over = {k: v for k, v in (('serve.host', ns.host), ('serve.port', ns.port)) if v is not None}
    if over: cfg = replace_config(cfg, over)
    _need('serve', 'serve')(cfg); return 0

def _report_args(p):
    p.add_argument('--out-dir', default=None, metavar='PATH', help="where the report goes (default runs/report)")

@command('report', "write the results report (Markdown, LaTeX, figures) from the stored runs", _report_args)
def _cmd_report(ns, cfg):
    paths = _need('report', 'write_report')(cfg, out_dir=ns.out_dir)
    for k, v in paths.items():
        if isinstance(v, dict): v = ', '.join(sorted(v)) + (f" (PNG and PDF in {Path(paths['markdown']).parent/'figures'})" if v else '')
        elif isinstance(v, list): v = f"{len(v)} files"
        _print(f"{k}: {v}")
    return 0

# %% [markdown]
# ## `main`
# `main` parses, loads the config, sets up logging on stderr and runs the command; it returns the exit
# code (the console script `rc` passes it to `sys.exit`).

# %%
#| export
def _setup_logging(level:str):
    "A stderr handler on the research_controller logger at `level`; returns an undo function."
    lg = logging.getLogger('research_controller')
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter('%(levelname)s %(name)s: %(message)s'))
    old = lg.level; lg.addHandler(h); lg.setLevel(getattr(logging, level.upper()))
    def undo(): lg.removeHandler(h); lg.setLevel(old)
    return undo

def _quiet_imports():
    "Import what prints on import (transformers' W&B notice under WANDB_MODE=offline) with that print discarded."
    if os.environ.get('WANDB_MODE') != 'offline': return
    with contextlib.redirect_stdout(io.StringIO()):
        try: import transformers.integrations.integration_utils  # noqa: F401
        except Exception: pass

def main(argv:Sequence[str]|None=None) -> int:
    "Run the `rc` command line with `argv` (default `sys.argv[1:]`); returns the exit code."
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_imports()  # keep stdout clean for `--json`
    parser = build_parser()
    name = 'rc'
    try:
        try: ns = parser.parse_args(argv)
        except SystemExit as e: return int(e.code or 0)  # --help
        if ns.command is None: parser.print_help(sys.stdout); return 2
        name = f"rc {ns.command}"
        cfg = load_config(ns.config, ns.overrides)
    except (CLIError, ConfigError) as e:
        print(f"{name}: error: {e}", file=sys.stderr); return getattr(e, 'code', 2)
    undo = _setup_logging(ns.log_level)
    try: return int(COMMANDS[ns.command]['run'](ns, cfg) or 0)
    except (CLIError, ConfigError) as e:
        print(f"{name}: error: {e}", file=sys.stderr); return getattr(e, 'code', 2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr); return 130
    except Exception as e:
        log.debug("traceback:\n%s", traceback.format_exc())
        msg = ' '.join(str(e).split())
        print(f"{name}: error: {type(e).__name__}: {msg}" + ('' if ns.log_level == 'debug' else ' (rerun with --log-level debug for the traceback)'),
              file=sys.stderr)
        return 1
    finally: undo()

# %% [markdown]
# The tests run `main` in-process and capture what it prints.

# %%
#| export
def run_main(argv:Sequence[str]) -> tuple:
    "Run `main(argv)` in-process; returns (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main(argv)
    return code, out.getvalue(), err.getvalue()

# %%
code, out, err = run_main(['--help'])
test_eq(code, 0)
for c in COMMANDS: assert c in out, c
print(out)

# %% [markdown]
# Every command has `--help`, `--config` and `--set`:

# %%
for c in COMMANDS:
    code, out, err = run_main([c, '--help'])
    test_eq(code, 0)
    for opt in ('--config', '--set', '--log-level'): assert opt in out, (c, opt)
sorted(COMMANDS)

# %% [markdown]
# Mistakes are one line on stderr with exit code 2, and no traceback:

# %%
bad = [['generate'], ['nosuch'], ['generate', 'hi', '--set', 'mcts.n_sims=-3'], ['generate', 'hi', '--set', 'mcts.nsims=3'],
       ['generate', 'hi', '--config', 'no/such.yaml'], ['generate', 'hi', '--max-new-tokens', 'many'],
       ['generate', 'hi', '--max-new-tokens', '0'], ['generate', 'hi', '--controller', 'nosuch'], ['rollback', 'v1'],
       ['status', '--log-level', 'loud'], ['serve', '--port', '70000']]
for argv in bad:
    code, out, err = run_main(argv)
    test_eq(code, 2)
    test_eq(len(err.strip().splitlines()), 1)
    assert 'Traceback' not in err and err.startswith('rc'), err
    print(f"{' '.join(argv):45} -> {err.strip()}")

# %%
code, out, err = run_main(['generate', 'hi', '--set', 'mcts.nsims=3'])
assert "Did you mean 'mcts.n_sims'" in err, err
test_eq(run_main([])[0], 2)
code, out, err = run_main(['generate', 'hi', '--controller', 'v3', '--set', f'paths.runs_dir={tempfile.mkdtemp()}'])
test_eq(code, 1); assert 'no registry' in err and len(err.strip().splitlines()) == 1, err

# %% [markdown]
# ## Versions and rollback on a real registry
# A registry with two versions (checkpoints from `network.save_checkpoint`), promoted in turn; `rc rollback`
# restores the first and records who and why.

# %%
from research_controller.network import PolicyValueNet, save_checkpoint
from research_controller.promotion import ControllerRegistry
from research_controller.config import NetworkConfig

tmp = Path(tempfile.mkdtemp())
sets = ['--set', f'paths.runs_dir={tmp}']
cfg = load_config(overrides=[f'paths.runs_dir={tmp}'])
reg = ControllerRegistry.from_config(cfg)
from research_controller.macro_actions import ACTION_NAMES
import torch
for i in range(2):
    torch.manual_seed(i); ck = save_checkpoint(PolicyValueNet(16, 5, NetworkConfig(hidden=8, layers=1)), tmp/f'ck{i}.pt', '0'*16, ACTION_NAMES)
    v = reg.register(ck, dict(slm_fingerprint='0'*16, feature_dim=16, notes=f'test {i}'))
    reg.promote(v, who='test', why=f'step {i}')
code, out, err = run_main(['versions', *sets])
test_eq(code, 0)
print(out)

# %%
test_eq([(l.split()[0], '*' in l.split()) for l in out.splitlines()[1:]], [('v0001', False), ('v0002', True)])
code, out, err = run_main(['rollback', 'v1', '--why', 'regression seen in serving', '--who', 'tester', *sets])
test_eq((code, reg.active()), (0, 'v0001'))
test_eq(reg.history()[-1]['why'], 'regression seen in serving')
code, out, err = run_main(['rollback', 'v9', '--why', 'x', *sets])
test_eq(code, 1); assert 'no version v0009' in err, err
code, out, err = run_main(['status', *sets])
test_eq(code, 0); assert 'active: v0001' in out, out
print(out)

# %% [markdown]
# ## Generating with the real SLM
# `rc generate` on the default SLM (SmolLM2-135M-Instruct) with a small budget: the answer, then one row per
# macro-action.

# %%
code, out, err = run_main(['generate', 'What is the capital of France?', '--controller', 'greedy', '--max-new-tokens', '8'])
test_eq(code, 0)
print(out)

# %%
lines = out.splitlines()
head = next(i for i, l in enumerate(lines) if l.startswith('step'))
test_eq(lines[head].split(), ['step', 'action', 'tokens', 'spent', 'chunk'])
assert all(l.split()[1] in ('CONTINUE', 'THINK_BEGIN', 'THINK_END', 'RESAMPLE', 'STOP') for l in lines[head + 1:]), lines[head + 1:]
code, js, err = run_main(['generate', 'What is the capital of France?', '--controller', 'greedy', '--max-new-tokens', '8', '--json'])
res = json.loads(js)
test_eq(res['text'], '\n'.join(lines[:head]).split('\n\n')[0])
assert 0 < res['tokens'] <= 8, res['tokens']
test_eq(len(res['macro_trace']), len(lines) - head - 1)

# %% [markdown]
# Hidden thoughts never reach the logs, even at `--log-level debug` where the engine logs every decision and
# even when the thoughts are asked for on stdout (`--show-thoughts`): a threshold controller with a low entropy
# threshold thinks, and neither what it thought nor the thought tokens may appear anywhere on stderr.

# %%
think = ['generate', 'Explain why the sky is blue.', '--controller', 'threshold', '--max-new-tokens', '40', '--set',
         'baselines.threshold_think_entropy=0.5', '--set', 'baselines.threshold_varentropy=0', '--json', '--show-thoughts', '--log-level', 'debug']
code, js, err = run_main(think)
test_eq(code, 0)
res = json.loads(js)
thought = (res['thought_text'] or '').strip()
assert thought, "the threshold controller did not think; lower baselines.threshold_think_entropy in this test"
assert '[thought redacted]' in err and 'THINK_BEGIN' in err, err[:500]  # the decisions were logged ...
cfg0 = load_config()
for secret in (thought, cfg0.slm.thought_open, cfg0.slm.thought_close):
    assert secret not in err, secret  # ... but not what was thought
print(f"{len(thought)} characters of thought; {len(err.splitlines())} lines on stderr, none with thought text or tokens")

# %% [markdown]
# The installed console script, as a user runs it:

# %%
rc = Path(sys.executable).parent/'rc'
assert rc.exists(), f"{rc} is missing: install the package (pip install -e .) to get the rc console script"
env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
p = subprocess.run([str(rc), '--help'], capture_output=True, text=True, env=env, timeout=120)
test_eq(p.returncode, 0); assert 'generate' in p.stdout
p = subprocess.run([str(rc), 'generate', 'Name a colour.', '--controller', 'greedy', '--max-new-tokens', '8'],
                   capture_output=True, text=True, env=env, timeout=300)
test_eq(p.returncode, 0)
assert re.search(r'^step\s+action', p.stdout, re.M), p.stdout
p = subprocess.run([str(rc), 'generate', 'x', '--set', 'macro.chunk_tokens=0'], capture_output=True, text=True, env=env, timeout=120)
test_eq(p.returncode, 2); test_eq(len(p.stderr.strip().splitlines()), 1)
p.stderr

# %% [markdown]
# ## The whole loop from the command line (slow)
# Self-play, training, evaluation, a cycle and the report, each through `rc` with tiny budgets on the real SLM.
# It takes minutes, so it runs only with `nbdev-test --flags slow`.

# %%
#| slow
runs = Path(tempfile.mkdtemp())
tiny = ['--set', f'paths.runs_dir={runs}', '--set', 'selfplay.max_new_tokens=8', '--set', 'mcts.n_sims=2', '--set', 'train.batch_size=4',
        '--set', 'train.checkpoint_every=1', '--set', 'evaluate.per_task=2', '--set', 'evaluate.tasks=[squad,nq_open]',
        '--set', 'evaluate.token_budget=8', '--set', 'evaluate.bootstrap=100', '--set', 'promotion.min_new_trajectories=1',
        '--set', 'promotion.min_tasks=1', '--set', 'selfplay.episodes=2', '--set', 'train.steps=2', '--set', 'rewards.judge_paraphrases=1']
steps = [['selfplay', '--no-progress'], ['train', '--no-progress'],
         ['evaluate', '--compare', '--controller', 'greedy', '--controller', 'sampling', '--no-progress'],
         ['cycle'], ['status'], ['versions'], ['report']]
for argv in steps:
    code, out, err = run_main(argv + tiny)
    print(f"$ rc {' '.join(argv)} -> {code}\n{out[-800:]}")
    test_eq(code, 0)
assert (runs/'report'/'results.md').exists() and '## Promotion cycles' in (runs/'report'/'results.md').read_text()
