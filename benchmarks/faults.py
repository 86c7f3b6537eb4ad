"""Fault probe of the installed package, driven as a user drives it: bad config through `rc`, kill -9 and cut files
in the replay buffer, corrupt registry files through `rc status/versions/rollback`, and raw bad HTTP requests to a
real server. Prints tried / held / failed per group; every failure is listed with what was seen.

    python benchmarks/faults.py                 # all groups (about 2-4 minutes on 2 cores)
    python benchmarks/faults.py --groups http   # one group
    python benchmarks/faults.py --kills 20      # more kill -9 trials

"Held" means: the fault gave a clear one-line error naming the file or field (no traceback, the documented exit
code), or a correct result; and nothing committed was lost. The fast, deterministic versions of these checks are
tests in tests/; this script repeats them in bulk and at random moments. Results: benchmarks/results/faults.json.
"""
from research_controller.config import atomic_write_json
import argparse, http.client, json, os, random, shutil, signal, socket, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RC = Path(sys.executable).with_name('rc')
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
       'TOKENIZERS_PARALLELISM': 'false', 'WANDB_MODE': 'offline', 'OMP_NUM_THREADS': '1'}

class Group:
    "Counts of one fault group and the failures seen."
    def __init__(self, name): self.name, self.tried, self.held, self.failures = name, 0, 0, []
    def check(self, what:str, ok:bool, seen=''):
        self.tried += 1
        if ok: self.held += 1
        else: self.failures.append(f"{what}: {seen}"[:400])
    def row(self): return dict(group=self.name, tried=self.tried, held=self.held, failed=self.tried - self.held, failures=self.failures)

def rc(args, cwd, timeout=180):
    "Run the installed `rc`: (exit code, stdout, stderr)."
    r = subprocess.run([str(RC), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr

def clean_error(code, err, want_code=None, names=()):
    "A refusal as the README promises: non-zero (or the wanted) exit code, no traceback, the file or field named."
    return (code != 0 if want_code is None else code == want_code) and 'Traceback' not in err and all(n in err for n in names)

# ---------------------------------------------------------------- config
CONFIG_CASES = [
    (['--set', 'paths.runs_dir='], {}, ['paths.runs_dir']),
    (['--set', 'selfplay.tasks=[squad,nosuch]'], {}, ['selfplay.tasks']),
    (['--set', 'mcts.n_sims=-3'], {}, ['mcts.n_sims']),
    (['--set', 'mcts.n_sims=many'], {}, ['mcts.n_sims']),
    (['--set', 'nosuch.key=1'], {}, ['nosuch']),
    (['--set', 'mcts.c_puct'], {}, ['mcts.c_puct']),
    (['--config', 'missing.yaml'], {}, ['missing.yaml']),
    (['--config', 'dup.yaml'], {'dup.yaml': b"mcts:\n  n_sims: 8\n  n_sims: 32\n"}, ['mcts.n_sims', 'twice']),
    (['--config', 'tab.yaml'], {'tab.yaml': b"mcts:\n\tn_sims: 8\n"}, ['tab.yaml', 'line 2']),
    (['--config', 'latin1.yaml'], {'latin1.yaml': b"slm:\n  source: caf\xe9\n"}, ['latin1.yaml', 'UTF-8']),
    (['--config', 'list.yaml'], {'list.yaml': b"- 1\n- 2\n"}, ['list.yaml']),
    (['--config', 'empty_tasks.yaml'], {'empty_tasks.yaml': b"evaluate:\n  tasks: []\n"}, ['evaluate.tasks']),
]

def probe_config(g:Group, tmp:Path, **_):
    for args, files, names in CONFIG_CASES:
        d = Path(tempfile.mkdtemp(dir=tmp))
        for n, b in files.items(): (d/n).write_bytes(b)
        code, out, err = rc(['status', *args], d)
        g.check(f"rc status {' '.join(args)}", clean_error(code, err, 2, names) and len(err.strip().splitlines()) == 1 and not (d/'runs').exists(),
                f"exit {code}, stderr {err.strip()[-300:]!r}")

# ---------------------------------------------------------------- buffer
WRITER = '''
import sys, numpy as np
from research_controller.buffer import ReplayBuffer
path, n = sys.argv[1], int(sys.argv[2])
b = ReplayBuffer(path, dim=64, n_actions=3, capacity=4000, dtype='float32')
for k in range(n):
    T = 20 + k % 30
    b.add_episode(np.full((T, 64), k + 1, np.float32), np.ones((T, 3), bool), np.full((T, 3), 1/3), np.full(T, (k % 7)/7),
                  dict(episode_id=f'ep{k}', controller_version='v0', slm_fingerprint='f'*16))
    print('COMMITTED', k, flush=True)
'''

def buffer_consistent(path:Path):
    "(ok, why): every row handed out holds the data of its episode; the episodes are consecutive."
    import numpy as np
    from research_controller.buffer import ReplayBuffer
    with ReplayBuffer(path, 64, 3, capacity=4000, dtype='float32', readonly=True) as b:
        ser = b.episode_serials()
        if ser and ser != list(range(ser[0], ser[-1] + 1)): return False, f"serials not consecutive: {ser[:5]}...{ser[-5:]}", ser
        if len(b):
            s = b.sample(2000, np.random.default_rng(0))
            if not np.array_equal(s['states'][:, 0], s['episodes'] + 1.0): return False, "a sampled row holds another episode's states", ser
        return True, '', ser

def probe_buffer(g:Group, tmp:Path, kills:int=10, **_):
    from research_controller.buffer import ReplayBuffer, ReplayBufferError
    script = tmp/'writer.py'; script.write_text(WRITER)
    rng = random.Random(0)
    for trial in range(kills):
        buf = tmp/f'kill{trial}'
        p = subprocess.Popen([sys.executable, str(script), str(buf), '100000'], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        committed, wait = -1, rng.uniform(0.3, 2.0); t0 = time.time()
        while time.time() - t0 < wait:
            line = p.stdout.readline()
            if line.startswith('COMMITTED'): committed = int(line.split()[1])
        os.kill(p.pid, signal.SIGKILL); p.wait(timeout=30)
        for line in p.stdout.read().splitlines():
            if line.startswith('COMMITTED'): committed = int(line.split()[1])
        try:
            ok, why, ser = buffer_consistent(buf)
            ok = ok and (not ser or ser[-1] in (committed, committed + 1))  # the last committed one is there (or the one in flight finished)
            g.check(f"kill -9 after {wait:.2f} s (last committed episode {committed})", ok, why or f"serials end at {ser[-1] if ser else None}")
        except Exception as e: g.check(f"kill -9 trial {trial}", False, f"reopen failed: {type(e).__name__}: {e}")
    # cut each array file short: refused with its name; repair keeps only whole episodes
    src = tmp/'whole'
    subprocess.run([sys.executable, str(script), str(src), '40'], env=ENV, capture_output=True, check=True, timeout=120)
    for name in ('states', 'masks', 'policies', 'values', 'episodes'):
        buf = tmp/f'cut-{name}'; shutil.copytree(src, buf)
        f = buf/f'{name}.npy'; os.truncate(f, f.stat().st_size // 3)
        try: ReplayBuffer(buf, 64, 3, capacity=4000, dtype='float32'); g.check(f"{name}.npy cut to a third", False, "opened without complaint")
        except ReplayBufferError as e: g.check(f"{name}.npy cut to a third: refused", str(f) in str(e) and 'repair' in str(e), str(e)[:200])
        try:
            rep = ReplayBuffer.repair(buf); ok, why, ser = buffer_consistent(buf)
            g.check(f"{name}.npy cut: repair", ok and len(rep['kept']) > 0 and len(rep['kept']) + len(rep['dropped']) == 40, why or str(rep)[:200])
        except Exception as e: g.check(f"{name}.npy cut: repair", False, f"{type(e).__name__}: {e}")
    # garbled header / log
    for name, junk in (('header.json', b'{"format": "research_contr'), ('log.jsonl', b'\x00\x01garbage\n')):
        buf = tmp/f'bad-{name}'; shutil.copytree(src, buf); (buf/name).write_bytes(junk)
        try: ReplayBuffer(buf, 64, 3, capacity=4000, dtype='float32', readonly=True); g.check(f"garbled {name}", False, "opened without complaint")
        except ReplayBufferError as e: g.check(f"garbled {name}: refused", name in str(e), str(e)[:200])
        except Exception as e: g.check(f"garbled {name}: refused", False, f"{type(e).__name__}: {e}")

# ---------------------------------------------------------------- registry
def make_registry(root:Path):
    from research_controller.registry import ControllerRegistry
    reg = ControllerRegistry(root, slm_fingerprint='0123456789abcdef', feature_dim=24)
    for i in (1, 2):
        ck = root.parent.parent/f"ck{i}.pt"; ck.write_bytes(bytes([i]) * 256)
        reg.promote(reg.register(ck, dict(slm_fingerprint='0123456789abcdef', feature_dim=24), who='probe'), who='probe', why=f"cycle {i}")
    return reg

def _garble(p): p.write_text('{"version": "v00')
def _flip(p): b = p.read_bytes(); p.write_bytes(b[:-1] + bytes([b[-1] ^ 1]))
def _tear(p): p.write_bytes(p.read_bytes() + b'{"seq": 9, "ev')
REGISTRY_CASES = [  # (what, damage(root), commands with the exit codes they may give, names the message must carry)
    ('garbled active.json', lambda r: _garble(r/'active.json'), [(['status'], (4,)), (['versions'], (4,)), (['rollback', 'v0002', '--why', 'repair'], (0,))], ['active.json']),
    ('active.json deleted', lambda r: (r/'active.json').unlink(), [(['status'], (0,)), (['rollback', 'v0001', '--why', 'x'], (0,))], []),
    ('history.jsonl deleted', lambda r: (r/'history.jsonl').unlink(), [(['status'], (4,)), (['rollback', 'v0001', '--why', 'x'], (4,))], ['history.jsonl']),
    ('bad meta.json of v0001', lambda r: (r/'versions'/'v0001'/'meta.json').write_text('{oops'), [(['versions'], (4,)), (['status'], (4,))], ['v0001']),
    ('checkpoint bit flipped', lambda r: _flip(r/'versions'/'v0002'/'checkpoint.pt'), [(['status'], (4,)), (['rollback', 'v0002', '--why', 'x'], (4,))], ['v0002']),
    ('torn history line', lambda r: _tear(r/'history.jsonl'), [(['status'], (0,)), (['versions'], (0,))], []),
    ('unknown version', lambda r: None, [(['rollback', 'v0042', '--why', 'x'], (4,)), (['rollback', 'latest', '--why', 'x'], (2, 4))], []),
]

def probe_registry(g:Group, tmp:Path, **_):
    for what, damage, cmds, names in REGISTRY_CASES:
        d = Path(tempfile.mkdtemp(dir=tmp)); root = d/'runs'/'registry'
        make_registry(root); damage(root)
        for args, codes in cmds:
            code, out, err = rc([*args, '--set', f'paths.runs_dir={d/"runs"}'], d)
            named = all(n in err + out for n in names) if code else True
            g.check(f"{what}: rc {' '.join(args)}", code in codes and 'Traceback' not in err and named,
                    f"exit {code} (want {codes}), stderr {err.strip()[-250:]!r}")

# ---------------------------------------------------------------- http
def _raw(port, data:bytes, timeout=30) -> int:
    "Send raw request bytes; the status code of the answer (0 when the server closed without one)."
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as s:
        try: s.sendall(data)
        except (BrokenPipeError, ConnectionResetError): pass
        r = http.client.HTTPResponse(s)
        try: r.begin(); return r.status
        except (http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine): return 0

def _post(path, body:bytes, ctype='application/json', extra=b''):
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n".encode()
            + extra + b"\r\n" + body)

def http_cases(max_chars:int, limit:int) -> list:
    ok = json.dumps({'prompt': 'Hi', 'max_new_tokens': 4}).encode()
    cases = [('valid request', _post('/generate', ok))]
    bodies = {'not JSON': b'hello', 'invalid UTF-8': b'{"prompt": "\xff\xfe"}', 'deep JSON': b'[' * 9000 + b']' * 9000,
              'JSON list': b'[1, 2]', 'JSON string': b'"prompt"', 'truncated JSON': b'{"prompt": "Hi"', 'trailing junk': ok + b'xyz',
              'no prompt': b'{}', 'empty prompt': b'{"prompt": ""}', 'blank prompt': b'{"prompt": "   "}', 'NUL in prompt': b'{"prompt": "a\\u0000b"}',
              'prompt a number': b'{"prompt": 5}', 'prompt a list': b'{"prompt": ["a"]}', 'prompt too long': json.dumps({'prompt': 'x' * (max_chars * 2)}).encode(),
              'budget 0': b'{"prompt": "Hi", "max_new_tokens": 0}', 'budget negative': b'{"prompt": "Hi", "max_new_tokens": -5}',
              'budget huge': b'{"prompt": "Hi", "max_new_tokens": 10000000}', 'budget a string': b'{"prompt": "Hi", "max_new_tokens": "8"}',
              'budget a float': b'{"prompt": "Hi", "max_new_tokens": 4.5}', 'budget true': b'{"prompt": "Hi", "max_new_tokens": true}',
              'seed a string': b'{"prompt": "Hi", "seed": "x"}', 'unknown field': b'{"prompt": "Hi", "temperature": 9}',
              'unknown controller': b'{"prompt": "Hi", "controller": "nosuch"}', 'controller a number': b'{"prompt": "Hi", "controller": 3}',
              'NaN in JSON': b'{"prompt": "Hi", "seed": NaN}', 'huge number': b'{"prompt": "Hi", "seed": 1' + b'0' * 5000 + b'}',
              'duplicate keys': b'{"prompt": "Hi", "prompt": "Ho"}', 'empty body': b''}
    for name, b in bodies.items():
        cases.append((name, _post('/generate', b)))
        cases.append((f"{name} (stream)", _post('/generate/stream', b)))
    cases += [('wrong content type', _post('/generate', ok, 'text/plain')),
              ('lying Content-Length (short)', _post('/generate', ok)[:-len(ok)] .replace(f"Content-Length: {len(ok)}".encode(), b"Content-Length: 5") + ok),
              ('oversized Content-Length', _post('/generate', b'{}').replace(b'Content-Length: 2', f"Content-Length: {limit * 10}".encode())),
              ('GET on /generate', b"GET /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
              ('unknown route', b"GET /nosuch HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
              ('garbage request line', b"\x16\x03\x01 junk\r\n\r\n")]
    return cases

def probe_http(g:Group, tmp:Path, **_):
    import torch
    from research_controller.config import load_config
    from research_controller.controllers import make_controller
    from research_controller.engine import Engine
    from research_controller.serve import OUTCOMES, ServerThread, StaticResolver, body_limit, create_app
    from research_controller.slm import tiny_slm
    torch.set_num_threads(1)
    cfg = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4', 'serve.max_concurrency=2'])
    model, tok = tiny_slm(cfg)
    app = create_app(cfg, engine=Engine(model, tok, cfg), resolver=StaticResolver({'greedy': make_controller('greedy', cfg)}))
    limit = body_limit(cfg)
    with ServerThread(app) as srv:
        for name, data in http_cases(cfg.serve.max_prompt_chars, limit):
            try: st = _raw(srv.port, data)
            except Exception as e: st = f"{type(e).__name__}: {e}"
            want_ok = name == 'valid request'
            g.check(f"{name}", isinstance(st, int) and st < 500 and ((st == 200) == want_ok or st == 0 and 'garbage' in name), f"status {st}")
        # chunked oversize body: 413 long before the end
        with socket.create_connection(('127.0.0.1', srv.port), timeout=30) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece, sent, status = b'x' * 65536, 0, None
            try:
                while sent < 100 * 2**20:
                    s.sendall(b'%x\r\n' % len(piece) + piece + b'\r\n'); sent += len(piece)
                    s.setblocking(False)
                    try:
                        if s.recv(1, socket.MSG_PEEK): break
                    except BlockingIOError: pass
                    finally: s.setblocking(True)
            except (BrokenPipeError, ConnectionResetError): pass
            r = http.client.HTTPResponse(s)
            try: r.begin(); status = r.status
            except Exception as e: status = f"{type(e).__name__}"
        g.check("100 MB chunked body: 413 long before its end", status == 413 and sent < 16 * 2**20, f"status {status} after {sent / 2**20:.1f} MB")
        conn = http.client.HTTPConnection('127.0.0.1', srv.port, timeout=30); conn.request('GET', '/health'); h = json.loads(conn.getresponse().read())
        counts = h.get('stats', {})
        total, outcomes = counts.get('requests'), sum(int(counts.get(k, 0)) for k in OUTCOMES)
        g.check("every generation request in exactly one /health outcome", isinstance(total, int) and outcomes == total, f"requests {total}, outcomes {outcomes}: {h}")

GROUPS = {'config': probe_config, 'buffer': probe_buffer, 'registry': probe_registry, 'http': probe_http}

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--groups', nargs='*', default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument('--kills', type=int, default=10, help="kill -9 trials of a buffer writer")
    ap.add_argument('--out', default=str(ROOT/'benchmarks'/'results'/'faults.json'))
    a = ap.parse_args(argv)
    if not RC.exists(): sys.exit(f"no installed rc command next to {sys.executable}; pip install -e . first")
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as d:
        for name in a.groups:
            g, t = Group(name), time.time()
            try: GROUPS[name](g, Path(tempfile.mkdtemp(dir=d)), kills=a.kills)
            except Exception as e: g.check(f"{name} probe itself", False, f"{type(e).__name__}: {e}")
            rows.append({**g.row(), 'seconds': round(time.time() - t, 1)})
            print(f"{name:9s} tried {g.tried:3d}  held {g.held:3d}  failed {g.tried - g.held:3d}   ({time.time() - t:.0f} s)", flush=True)
            for f in g.failures: print(f"    FAILED {f}")
    res = dict(groups=rows, tried=sum(r['tried'] for r in rows), held=sum(r['held'] for r in rows), seconds=round(time.time() - t0, 1))
    atomic_write_json(a.out, res)
    print(f"total     tried {res['tried']:3d}  held {res['held']:3d}  failed {res['tried'] - res['held']:3d}   -> {a.out}")
    return 0 if res['tried'] == res['held'] else 1

if __name__ == '__main__': sys.exit(main())
