"The installed `rc` exits with the codes its documented table gives (nbs/17_cli.ipynb, `rc --help`), with one line on stderr and never a traceback."
import json, os, re, subprocess, sys
from pathlib import Path

import pytest
from filelock import FileLock

from research_controller import cli
from research_controller.cli import EXIT_CODES, ExitCode, cores_busy
from research_controller.registry import ControllerRegistry

RC = Path(sys.executable).with_name('rc')  # the console script installed next to this interpreter
NB = Path(__file__).resolve().parents[1]/'nbs'/'17_cli.ipynb'
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
       'TOKENIZERS_PARALLELISM': 'false', 'WANDB_MODE': 'offline', 'OMP_NUM_THREADS': '1'}
FP = '0123456789abcdef'

def rc(tmp_path, *args) -> subprocess.CompletedProcess:
    "Run the installed `rc` with its runs under tmp_path/runs, as a user would; never a traceback."
    assert RC.exists(), f"no installed rc command at {RC}; run `pip install -e .` in the project's environment"
    r = subprocess.run([str(RC), *args, '--set', f"paths.runs_dir={tmp_path/'runs'}"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert 'Traceback' not in r.stderr, f"rc {' '.join(args)} printed a traceback:\n{r.stderr}"
    return r

def errors(r) -> list:
    "The stderr lines other than the busy-cores warning a command that loads the SLM may print."
    return [l for l in r.stderr.strip().splitlines() if ': warning: the ' not in l]

@pytest.fixture
def reg(tmp_path):
    "A registry with v0001 then v0002 promoted, from tiny fake checkpoints (no SLM)."
    reg = ControllerRegistry(tmp_path/'runs'/'registry', slm_fingerprint=FP, feature_dim=24)
    for i in (1, 2):
        ck = tmp_path/f"ck{i}.pt"; ck.write_bytes(bytes([i]) * 256)
        reg.promote(reg.register(ck, dict(slm_fingerprint=FP, feature_dim=24)), who='test', why=f"cycle {i}")
    return reg

def test_the_table_is_documented_once():
    "The notebook's markdown table, `EXIT_CODES` and the `rc --help` epilog say the same."
    cells = [''.join(c['source']) for c in json.loads(NB.read_text(encoding='utf-8'))['cells'] if c['cell_type'] == 'markdown']
    table = [re.findall(r'\| *([^|]*?) *(?=\|)', l) for c in cells for l in c.splitlines() if re.match(r'\| \d+ \|', l)]
    assert [(int(c), n, m) for c, n, m in table] == [(int(c), c.name, m) for c, m in EXIT_CODES.items()], table
    assert sorted(EXIT_CODES) == sorted(ExitCode)
    r = subprocess.run([str(RC), '--help'], env=ENV, capture_output=True, text=True, timeout=60)
    flat = ' '.join(r.stdout.split())
    missing = [f"{int(c)} {c.name} {m}" for c, m in EXIT_CODES.items() if ' '.join(f"{int(c)} {c.name} {m}".split()) not in flat]
    assert r.returncode == 0 and not missing, f"rc --help lacks {missing}:\n{r.stdout}"

def test_cycle_skipped_while_another_holds_the_lock_exits_3(tmp_path):
    lock = tmp_path/'runs'/'reports'/'cycle.lock'; lock.parent.mkdir(parents=True)
    with FileLock(str(lock)):  # another cycle is running
        r = rc(tmp_path, 'cycle', '--set', 'promotion.lock_timeout_s=0.1')
    assert r.returncode == ExitCode.SKIPPED, f"exit {r.returncode}, want 3:\n{r.stdout}{r.stderr}"
    assert errors(r) == [f"rc cycle: skipped: another cycle is running (lock {str(lock)!r})."], r.stderr

def test_cycle_that_fails_exits_1(reg, tmp_path):
    (reg.root/'active.json').write_text('{"version": "v00')  # the cycle fails reading the champion, before it loads the SLM
    r = rc(tmp_path, 'cycle', '--dry-run')
    assert r.returncode == ExitCode.FAILED, f"exit {r.returncode}, want 1:\n{r.stdout}{r.stderr}"
    assert len(errors(r)) == 1 and errors(r)[0].startswith('rc cycle: error: RegistryError: ') and 'active.json' in errors(r)[0], r.stderr

def test_status_with_problems_exits_4_and_ok_exits_0(reg, tmp_path):
    assert rc(tmp_path, 'versions').returncode == ExitCode.OK
    ck = reg.root/'versions'/'v0001'/'checkpoint.pt'; ck.write_bytes(b'garbage')
    r = rc(tmp_path, 'status')
    assert r.returncode == ExitCode.REGISTRY and 'checkpoint of v0001 is corrupt' in r.stdout, f"exit {r.returncode}:\n{r.stdout}"
    assert errors(r) == [f"rc status: error: 1 problem in registry {str(reg.root)!r} (listed above)"], r.stderr

@pytest.mark.parametrize('args,code,wanted', [
    (['status', '--set', 'mcts.n_sims=-3'], ExitCode.BAD_INPUT, "'mcts.n_sims'"),
    (['cycle', '--set', 'promotion.nosuch=1'], ExitCode.BAD_INPUT, "promotion.nosuch"),
    (['rollback', 'v0001'], ExitCode.BAD_INPUT, '--why'),
    (['rollback', 'latest', '--why', 'x'], ExitCode.BAD_INPUT, "'latest' is not a version"),
    (['rollback', 'v9', '--why', 'x'], ExitCode.REGISTRY, 'no version v0009'),
])
def test_bad_input_and_refusals(reg, tmp_path, args, code, wanted):
    r = rc(tmp_path, *args)
    assert (r.returncode, len(errors(r))) == (code, 1), f"rc {' '.join(args)}: exit {r.returncode}, want {code}:\n{r.stderr}"
    assert errors(r)[0].startswith(f"rc {args[0]}: error: ") and wanted in r.stderr, r.stderr

def test_busy_cores_warning(monkeypatch):
    "The check, with the load injected; and `rc` prints it once, only for commands that load the SLM."
    assert cores_busy(load=0.5, n_cores=2, others=[]) is None
    w = cores_busy(load=2.0, n_cores=2, others=[(4242, 'rc cycle')])
    for want in ('the 2 CPU cores are busy (load 2.0; rc cycle is running as pid 4242)', '--set slm.threads=N', 'one rc job at a time'):
        assert want in w, f"warning lacks {want!r}: {w}"
    monkeypatch.setattr(os, 'getloadavg', lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(cli, '_quiet_imports', lambda: None)  # not under test here, and it takes seconds
    code, out, err = cli.run_main(['generate', ' '])  # loads the SLM: warns, then refuses the empty prompt
    warns = [l for l in err.splitlines() if 'cores are busy' in l]
    assert code == ExitCode.BAD_INPUT and len(warns) == 1 and warns[0].startswith('rc generate: warning: the '), err
    assert 'load 64.0' in warns[0], warns
    code, out, err = cli.run_main(['status', '--set', 'paths.runs_dir=/nonexistent/runs'])
    assert 'cores are busy' not in err, err
