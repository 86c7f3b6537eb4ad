"Bad config input reaches the user of the installed `rc` command as one clear message, never a traceback."
import json, os, subprocess, sys
from pathlib import Path

import pytest

from research_controller import config

RC = Path(sys.executable).with_name('rc')  # the console script installed next to this interpreter
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
       'TOKENIZERS_PARALLELISM': 'false', 'WANDB_MODE': 'offline', 'OMP_NUM_THREADS': '1'}

# (rc arguments, config files to write first {name: bytes}, substrings the message must contain)
CASES = {
    'duplicate key': (['status', '--config', 'dup.yaml'], {'dup.yaml': b"mcts:\n  n_sims: 8\n  c_puct: 1.5\n  n_sims: 32\n"},
                      ["config file 'dup.yaml'", "'mcts.n_sims' twice", "line 2 (8)", "line 4 (32)", "Delete the line"]),
    'empty path': (['status', '--set', 'paths.runs_dir='], {},
                   ["'paths.runs_dir' = ''", "must not be empty", "--set paths.runs_dir=runs"]),
    'unknown task': (['status', '--set', 'selfplay.tasks=[squad,nosuch]'], {},
                     ["'selfplay.tasks'", "unknown task(s) ['nosuch']", "'squad', 'gsm8k', 'nq_open', 'wikitext'"]),
    'tab indent': (['status', '--config', 'tab.yaml'], {'tab.yaml': b"mcts:\n\tn_sims: 8\n"},
                   ["config file 'tab.yaml' is not valid YAML at line 2, column 1", "indent with spaces"]),
    'not utf-8': (['status', '--config', 'latin1.yaml'], {'latin1.yaml': b"slm:\n  source: caf\xe9\n"},
                  ["config file 'latin1.yaml' is not UTF-8 text", "Save it as UTF-8"]),
}

@pytest.mark.parametrize('case', list(CASES))
def test_rc_refuses_bad_config(case, tmp_path):
    args, files, wanted = CASES[case]
    for name, data in files.items(): (tmp_path/name).write_bytes(data)
    assert RC.exists(), f"no installed rc command at {RC}; run `pip install -e .` in the project's environment"
    r = subprocess.run([str(RC), *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode != 0, f"rc {' '.join(args)} exited 0; stdout={r.stdout!r} stderr={err!r}"
    assert 'Traceback' not in err, f"rc {' '.join(args)} printed a traceback:\n{err}"
    assert err.startswith('rc status: error: ') and len(err.splitlines()) == 1, f"want one line 'rc status: error: ...', got:\n{err}"
    missing = [w for w in wanted if w not in err]
    assert not missing, f"message lacks {missing}:\n{err}"
    assert not (tmp_path/'runs').exists(), f"rc wrote {sorted(p.name for p in (tmp_path/'runs').iterdir())} before refusing"

def test_task_choices_match_rewards():
    from research_controller.rewards import TASKS
    assert tuple(TASKS) == config.TASK_CHOICES, f"rewards.TASKS {TASKS} != config.TASK_CHOICES {config.TASK_CHOICES}: keep the two in step"

def _old_evaluate_json(obj) -> bytes:
    "The bytes the JSON writer that lived in evaluate wrote (strict JSON: NaN/inf as null, numpy scalars as numbers, indent 1)."
    import math, numpy as np
    def j(o):
        if isinstance(o, float) and not math.isfinite(o): return None
        if isinstance(o, dict): return {k: j(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)): return [j(v) for v in o]
        if isinstance(o, np.generic): return j(o.item())
        return o
    return (json.dumps(j(obj), indent=1, ensure_ascii=False, allow_nan=False) + '\n').encode('utf-8')

def test_atomic_write_json_keeps_the_stored_format(tmp_path):
    "config's JSON writer (the one JSON writer now) writes the bytes the evaluate copy wrote, so stored files do not change."
    np = pytest.importorskip('numpy')
    obj = {'z': 1, 'name': 'café ✓', 'nan': float('nan'), 'inf': float('-inf'), 'np': [np.float32(0.25), np.int64(7), np.bool_(True)],
           'nested': {'t': (1, 2.5), 'none': None, 'empty': {}}, 'f64': np.float64(1/3)}
    a = config.atomic_write_json(tmp_path/'a.json', obj)
    assert a.read_bytes() == _old_evaluate_json(obj), f"config wrote {a.read_bytes()!r}\nthe evaluate format is {_old_evaluate_json(obj)!r}"
    assert json.loads(a.read_text(encoding='utf-8'))['nan'] is None

def test_modes_follow_the_policy(tmp_path):
    "Files and folders the writers make get FILE_MODE/DIR_MODE minus the umask, the same as plain open()/mkdir."
    old = os.umask(0o022)
    try:
        f = config.atomic_write_json(tmp_path/'registry'/'active.json', {'version': 'v1'})
        t = config.make_temp_dir(tmp_path/'registry'/'versions', prefix='.v1.')
        d = config.make_dir(tmp_path/'buffer')
    finally: os.umask(old)
    got = {p.name: oct(p.stat().st_mode & 0o777) for p in (f, f.parent, t, d)}
    want = {f.name: '0o644', f.parent.name: '0o755', t.name: '0o755', d.name: '0o755'}
    assert got == want, f"modes {got} != {want}"
