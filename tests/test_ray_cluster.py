"""Self-play joins a running Ray cluster when an address is configured, instead of starting a private instance.

Slow (a Ray head node starts and stops; about a minute on 2 cores): runs only with RC_SLOW_TESTS=1, and only where
Ray (the optional [distributed] extra) is installed:

    RC_SLOW_TESTS=1 python -m pytest tests/test_ray_cluster.py -s

A head node (`ray start --head --block`, 2 CPUs, on 127.0.0.1 at a free port, its own temp dir, token authentication
with a token of its own) is started for the test; a driver process then plays the same self-play episodes on the tiny
model with 1 worker (address from $RAY_ADDRESS) and with 2 workers (address from `selfplay.ray_address`); the
episodes must be in the buffers, the same for both, and episodes/s of both are printed and recorded. The drivers run
in a child process because Ray reads its authentication settings once per process. The head is stopped in a finally
block by signalling the `ray start` process this test started (it stops its node); not with `ray stop`, which stops
every Ray node of the machine, other people's included.
"""
import json, os, secrets, shutil, signal, socket, subprocess, sys, tempfile, textwrap, time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get('RC_SLOW_TESTS') != '1', reason='slow: set RC_SLOW_TESTS=1 to run it')]
pytest.importorskip('ray', reason="Ray is not installed (pip install 'research_controller[distributed]')")

RAY = Path(sys.executable).with_name('ray')  # the CLI installed next to this interpreter: its workers run this environment
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false',
       'WANDB_MODE': 'offline', 'OMP_NUM_THREADS': '1', 'RAY_USAGE_STATS_ENABLED': '0',
       'RAY_AUTH_MODE': 'token', 'RAY_AUTH_TOKEN': secrets.token_hex(32)}  # this cluster admits only this test's drivers
ENV.pop('RAY_ADDRESS', None)
EPISODES = 24

DRIVER = textwrap.dedent('''
    import functools, json, os, sys, time
    import ray
    from research_controller.buffer import ReplayBuffer
    from research_controller.config import load_config, replace_config
    from research_controller.engine import Engine
    from research_controller.macro_actions import N_ACTIONS
    from research_controller.selfplay import LengthReward, run_selfplay, selfplay_items
    from research_controller.slm import tiny_slm

    addr, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4', 'selfplay.max_new_tokens=16', 'mcts.n_sims=6',
                                 'mcts.leaf_batch=3', 'selfplay.backend=ray'])
    items = selfplay_items(cfg, n, 0)
    dim = Engine(*tiny_slm(cfg, seed=0), cfg).feature_dim
    kw = dict(seed=0, progress=False, reward_fn=LengthReward(4), slm_loader=functools.partial(tiny_slm, seed=0), items=items)

    def played(path):  # (episode id, prompt id, actions, text) of the committed episodes; serials 0..n-1, every position there
        with ReplayBuffer(path, dim, N_ACTIONS, cfg.buffer.capacity, cfg.buffer.dtype, readonly=True) as rb:
            ser = rb.episode_serials()
            metas = [rb.episode_meta(s) for s in ser]
            assert ser == list(range(len(ser))), ser
            assert len(rb) == sum(len(m['actions']) for m in metas), (len(rb), [len(m['actions']) for m in metas])
            return [(m['episode_id'], m['prompt_id'], m['actions'], m['text']) for m in metas]

    res = dict(items=[it['id'] for it in items])
    for w in (1, 2):
        c = replace_config(cfg, [f'selfplay.workers={w}'])
        if w == 1: os.environ['RAY_ADDRESS'] = addr  # the address Ray itself reads
        else: os.environ.pop('RAY_ADDRESS', None); c = replace_config(c, [f'selfplay.ray_address={addr}'])  # the configured one
        t0 = time.perf_counter()
        run_selfplay(c, episodes=w, buffer_path=f'{out}/start{w}', **kw)  # start-up: the actors load the model, one episode each
        t1 = time.perf_counter()
        sm = run_selfplay(c, episodes=n, buffer_path=f'{out}/buf{w}', **kw)  # a private instance would be refused: a cluster runs here
        t2 = time.perf_counter()
        assert not ray.is_initialized(), 'self-play left its connection to the cluster open'
        res[w] = dict(episodes=sm.episodes, ids=sm.episode_ids, played=played(f'{out}/buf{w}'), seconds=t2 - t1, startup_seconds=t1 - t0)
    print('RESULT ' + json.dumps(res))
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def port_open(port:int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(('127.0.0.1', port)) == 0


@pytest.fixture
def head(tmp_path):
    "A Ray head node of 2 CPUs for this test; yields its address, stops it afterwards."
    assert RAY.exists(), f"no ray command at {RAY}; pip install ray==2.60.0 into this environment"
    port, log = free_port(), tmp_path/'ray_start.log'
    tmp = tempfile.mkdtemp(prefix='rc-ray-', dir='/tmp')  # short: Ray's socket paths under it must fit in 107 bytes
    with open(log, 'w') as out:
        p = subprocess.Popen([str(RAY), 'start', '--head', '--block', '--port', str(port), '--num-cpus', '2', '--node-ip-address', '127.0.0.1',
                              '--include-dashboard', 'false', '--disable-usage-stats', '--temp-dir', tmp],
                             stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=tmp_path, start_new_session=True)
    try:
        t0 = time.time()
        while not port_open(port):  # the head's GCS listens once it is up
            assert p.poll() is None, f"ray start exited with {p.returncode}:\n{log.read_text()}"
            assert time.time() - t0 < 120, f"the Ray head did not come up in 120 s:\n{log.read_text()}"
            time.sleep(0.5)
        yield f'127.0.0.1:{port}'
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes of its node and exits
            try: p.wait(timeout=60)
            except subprocess.TimeoutExpired: pass
        try: os.killpg(p.pid, signal.SIGKILL)  # whatever of this node's session is left (its own process group)
        except ProcessLookupError: pass
        p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def test_selfplay_joins_a_running_cluster(head, tmp_path, record_property):
    r = subprocess.run([sys.executable, '-c', DRIVER, head, str(tmp_path), str(EPISODES)], env=ENV, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    lines = [l for l in r.stdout.splitlines() if l.startswith('RESULT ')]
    assert r.returncode == 0 and lines, f"the self-play driver failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    res = json.loads(lines[-1][len('RESULT '):])
    one, two = res['1'], res['2']
    for x in (one, two):
        assert x['episodes'] == EPISODES, x['episodes']
        assert [p[0] for p in x['played']] == x['ids']  # every episode committed, in order
        assert [p[1] for p in x['played']] == res['items']
    assert two['played'] == one['played'], "1 and 2 workers on the cluster played different episodes"
    rate = {w: EPISODES/x['seconds'] for w, x in (('1', one), ('2', two))}
    for w, v in rate.items(): record_property(f'episodes_per_s_{w}_workers', round(v, 3))
    print(f"\nRay cluster {head}, {EPISODES} tiny-model episodes: {rate['1']:.2f} episodes/s with 1 worker, {rate['2']:.2f} with 2 workers "
          f"({rate['2']/rate['1']:.2f}x); actor start-up {one['startup_seconds']:.1f} s and {two['startup_seconds']:.1f} s (not counted); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
