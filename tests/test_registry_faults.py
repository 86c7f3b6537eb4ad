"Registry faults reach the user of the installed `rc` command as one clear message naming the file and the fix; the way out works and nothing written is lost."
import json, os, subprocess, sys
from pathlib import Path

import pytest

from research_controller.config import DIR_MODE, FILE_MODE
from research_controller.registry import ControllerRegistry

RC = Path(sys.executable).with_name('rc')  # the console script installed next to this interpreter
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
       'TOKENIZERS_PARALLELISM': 'false', 'WANDB_MODE': 'offline', 'OMP_NUM_THREADS': '1'}
FP = '0123456789abcdef'

def rc(tmp_path, *args, umask=None) -> subprocess.CompletedProcess:
    "Run the installed `rc` on the registry under tmp_path/runs, as a user would; never a traceback."
    assert RC.exists(), f"no installed rc command at {RC}; run `pip install -e .` in the project's environment"
    r = subprocess.run([str(RC), *args, '--set', f"paths.runs_dir={tmp_path/'runs'}"], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=120, preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    assert 'Traceback' not in r.stderr, f"rc {' '.join(args)} printed a traceback:\n{r.stderr}"
    return r

def make_registry(root:Path) -> ControllerRegistry:
    "A registry with v0001 then v0002 promoted, from tiny fake checkpoints (no SLM)."
    reg = ControllerRegistry(root, slm_fingerprint=FP, feature_dim=24)
    for i in (1, 2):
        ck = root.parent.parent/f"ck{i}.pt"; ck.write_bytes(bytes([i]) * 256)
        reg.promote(reg.register(ck, dict(slm_fingerprint=FP, feature_dim=24, notes=f"test {i}"), who='test'), who='test', why=f"cycle {i}")
    return reg

@pytest.fixture
def reg(tmp_path): return make_registry(tmp_path/'runs'/'registry')

def rows(out:str) -> dict:
    "`rc versions` table rows: version -> the rest of the line."
    return {l.split()[0]: l for l in out.split('problems:')[0].splitlines()[1:] if l.strip()}

def test_garbled_active_json_is_named_and_rollback_repairs_it(reg, tmp_path):
    ap, hp = reg.root/'active.json', reg.root/'history.jsonl'
    ap.write_text('{"version": "v00'); before = hp.read_bytes()
    s = rc(tmp_path, 'status')
    assert s.returncode == 4, f"rc status exited {s.returncode}, want 4 (registry problems):\n{s.stdout}{s.stderr}"
    for want in ('versions: v0001, v0002', f"{str(ap)!r} is unreadable (not valid JSON", "`rc rollback v0002 --why 'repair active.json'`"):
        assert want in s.stdout, f"rc status output lacks {want!r}:\n{s.stdout}"
    assert s.stderr.strip().splitlines()[-1] == f"rc status: error: 1 problem in registry {str(reg.root)!r} (listed above)", s.stderr
    v = rc(tmp_path, 'versions')
    assert (v.returncode, sorted(rows(v.stdout))) == (4, ['v0001', 'v0002']), f"exit {v.returncode}:\n{v.stdout}{v.stderr}"
    assert f"{str(ap)!r} is unreadable" in v.stdout, v.stdout
    g = rc(tmp_path, 'generate', 'hi')  # resolves the active controller before it loads the SLM
    assert g.returncode == 4 and f"rc generate: error: {str(ap)!r} is unreadable" in g.stderr, f"exit {g.returncode}:\n{g.stderr}"
    r = rc(tmp_path, 'rollback', 'v0002', '--why', 'repair active.json', '--who', 'tester')
    assert r.returncode == 0, f"rollback failed ({r.returncode}):\n{r.stderr}"
    ev = reg.history()[-1]
    assert (reg.active(), ev['event'], ev['version'], ev['who'], ev['repaired'][:26]) == ('v0002', 'rollback', 'v0002', 'tester', 'active.json was unreadable'), ev
    assert hp.read_bytes().startswith(before), "the rollback rewrote the history instead of appending to it"
    assert (rc(tmp_path, 'versions').returncode, reg.check()) == (0, [])
    ap.write_text('{"seq": 4}')  # valid JSON, no version: the same way out, back to the version before
    r = rc(tmp_path, 'rollback', 'previous', '--why', 'v0002 misbehaves')
    assert (r.returncode, reg.active(), reg.check()) == (0, 'v0001', []), f"exit {r.returncode}:\n{r.stdout}{r.stderr}"

def test_deleted_history_is_refused_not_restarted(reg, tmp_path):
    hp = reg.root/'history.jsonl'; hp.unlink()
    r = rc(tmp_path, 'rollback', 'v0001', '--why', 'x')
    assert r.returncode == 4, f"rollback with the audit trail gone exited {r.returncode}, want 4:\n{r.stdout}{r.stderr}"
    for want in (f"the audit trail {str(hp)!r} is gone", 'restore history.jsonl from a backup'):
        assert want in r.stderr, f"message lacks {want!r}:\n{r.stderr}"
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (hp.exists(), reg.active()) == (False, 'v0002'), "the refused rollback changed the registry"
    s = rc(tmp_path, 'status')
    assert s.returncode == 4 and 'is gone' in s.stdout, f"exit {s.returncode}:\n{s.stdout}"

def test_deleted_active_json_is_rebuilt_from_history(reg, tmp_path):
    ap = reg.root/'active.json'; ap.unlink()
    r = rc(tmp_path, 'rollback', 'previous', '--why', 'v0002 misbehaves')
    assert (r.returncode, reg.active()) == (0, 'v0001'), f"exit {r.returncode}:\n{r.stdout}{r.stderr}"
    ap.unlink()
    v = rc(tmp_path, 'versions')
    assert v.returncode == 0 and '*' in rows(v.stdout)['v0001'] and '*' not in rows(v.stdout)['v0002'], f"exit {v.returncode}:\n{v.stdout}"
    assert 'was missing; rebuilt it from history.jsonl event' in v.stderr, v.stderr
    assert json.loads(ap.read_text())['seq'] == reg.history()[-1]['seq'] and reg.check() == []

def test_bad_meta_json_is_marked_and_the_rest_listed(reg, tmp_path):
    (reg.root/'versions'/'v0001'/'meta.json').write_text('{"version": ')
    v = rc(tmp_path, 'versions')
    got = rows(v.stdout)
    assert v.returncode == 4 and sorted(got) == ['v0001', 'v0002'], f"exit {v.returncode}:\n{v.stdout}{v.stderr}"
    assert '(bad meta.json: not valid JSON: Expecting value' in got['v0001'] and '*' in got['v0002'], v.stdout

def test_registry_files_follow_the_mode_policy(tmp_path):
    old = os.umask(0o002)  # group-shared: every file 664 and folder 775, whichever way it was written
    try: reg = make_registry(tmp_path/'runs'/'registry')
    finally: os.umask(old)
    (reg.root/'active.json').unlink()
    for args in (['rollback', 'previous', '--why', 'x'], ['versions']):  # rewrites active.json, appends history, rebuilds active.json
        r = rc(tmp_path, *args, umask=0o002)
        assert r.returncode == 0, f"rc {' '.join(args)} exited {r.returncode}:\n{r.stderr}"
    got = {str(p.relative_to(reg.root)): oct(p.stat().st_mode & 0o777) for p in [reg.root, *reg.root.rglob('*')]}
    want = {k: oct((DIR_MODE if (reg.root/k).is_dir() else FILE_MODE) & ~0o002) for k in got}
    assert got == want, f"modes {got} != {want}"
    assert {'active.json', 'history.jsonl', 'registry.lock', 'versions/v0002/checkpoint.pt'} <= set(got), sorted(got)
