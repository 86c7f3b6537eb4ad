"The installed replay buffer, driven as self-play drives it, through faults: killed mid-write, cut short, full disk. Nothing committed is lost; every error names its file."
import ast, errno, json, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest

from research_controller.buffer import ReplayBuffer, ReplayBufferError

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
SIGBUS = (128 + signal.SIGBUS, -signal.SIGBUS)  # 'Bus error' from a shell (135), or killed by the signal (-7)

# A self-play stand-in: appends n episodes of T positions; states of episode k are all k+1, so a zero-filled row shows.
WRITER = '''
import sys, numpy as np
from research_controller.buffer import ReplayBuffer
path, dim, capacity, T, n, pad = sys.argv[1], *map(int, sys.argv[2:])
b = ReplayBuffer(path, dim=dim, n_actions=3, capacity=capacity, dtype='float32')
for k in range(n):
    ep = (np.full((T, dim), k + 1, np.float32), np.ones((T, 3), bool), np.full((T, 3), 1/3), np.full(T, (k % 7)/7),
          dict(episode_id=f'ep{k}', controller_version='v0', slm_fingerprint='f'*16, pad='x'*pad))
    print('WRITING', k, flush=True)
    b.add_episode(*ep)
    print('COMMITTED', k, flush=True)
b.close()
'''

def writer(tmp_path, buf, dim, capacity, T, n, pad=0, **kw):
    "Start the writer script on buffer directory `buf` in a fresh interpreter."
    script = tmp_path/'writer.py'
    script.write_text(WRITER)
    args = [sys.executable, str(script), str(buf), *map(str, (dim, capacity, T, n, pad))]
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

def run_writer(tmp_path, buf, *a, **kw):
    "Run the writer to the end: (exit code, stdout lines, last stderr line)."
    p = writer(tmp_path, buf, *a, **kw)
    out, err = p.communicate(timeout=120)
    return p.returncode, out.splitlines(), (err.strip().splitlines() or [''])[-1]

def check_rows(b, rng=np.random.default_rng(0)):
    "Every row the buffer hands out holds the data of the episode it says it came from."
    s = b.sample(4000, rng)
    np.testing.assert_array_equal(s['states'], np.repeat(s['episodes'][:, None] + 1., s['states'].shape[1], 1),
                                  err_msg='a sampled row does not hold the states of its episode')
    np.testing.assert_allclose(s['values'], (s['episodes'] % 7)/7, rtol=1e-6, err_msg='a sampled row does not hold the values of its episode')
    for e in np.unique(s['episodes']): assert b.episode_meta(int(e))['episode_id'] == f'ep{e}', (e, b.episode_meta(int(e)))

def test_sigkill_mid_write_loses_only_the_uncommitted_episode(tmp_path):
    "Killed (SIGKILL) while writing into a full ring: the episode in flight is whole or gone, and only the oldest, which it was overwriting, goes with it."
    buf, T = tmp_path/'buf', 1000
    p = writer(tmp_path, buf, 256, 5*T, T, 100)  # 5 episodes fill the ring exactly: episode k takes rows (k % 5)*T ...
    for line in p.stdout:
        if line.strip() == 'WRITING 12': break
    time.sleep(0.005)  # inside add_episode, which takes about 25 ms for these 1 MB episodes
    os.kill(p.pid, signal.SIGKILL); p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr.read())
    # a line the kill cut short ('WRITING', 'WRITING 1' of 13) is not counted: that print had not returned, so add_episode had not begun
    done = [l for l in p.stdout.read().splitlines(keepends=True) if l.endswith('\n')]
    w = max(int(l.split()[1]) for l in ['WRITING 12', *done] if l.startswith('WRITING'))  # in flight when killed
    with ReplayBuffer(buf, 256, 3, capacity=5*T, dtype='float32') as b:
        serials = b.episode_serials()
        # killed before episode w started (w-5 .. w-1), while it overwrote episode w-5 (w-4 .. w-1), or after its commit (w-4 .. w)
        assert serials in (list(range(w - 5, w)), list(range(w - 4, w)), list(range(w - 4, w + 1))), (w, serials)
        assert len(b) == T*len(serials), (len(b), serials)
        check_rows(b)
        nxt = b.add_episode(np.full((5, 256), 100, np.float32), np.ones((5, 3), bool), np.full((5, 3), 1/3), np.zeros(5),
                            dict(episode_id='next', controller_version='v0', slm_fingerprint='f'*16))
        assert nxt == serials[-1] + 1, (nxt, serials)

def truncated_buffer(tmp_path, size=1000):
    "9 episodes of 10 rows (dim 4, float32: 16 bytes a row) in a ring of 100, then `truncate -s SIZE states.npy`."
    buf = tmp_path/'buf'
    rc, out, err = run_writer(tmp_path, buf, 4, 100, 10, 9)
    assert rc == 0, err
    subprocess.run(['truncate', '-s', str(size), str(buf/'states.npy')], check=True)
    return buf

@pytest.mark.parametrize('readonly', [False, True])
def test_truncated_array_is_refused_with_the_fix(tmp_path, readonly):
    buf = truncated_buffer(tmp_path)
    with pytest.raises(ReplayBufferError) as e: ReplayBuffer(buf, 4, 3, capacity=100, dtype='float32', readonly=readonly)
    msg = str(e.value)
    wanted = [f"{str(buf/'states.npy')!r} is 1000 bytes but header.json expects 1728 bytes", 'truncated', f"ReplayBuffer.repair({str(buf)!r})"]
    assert all(w in msg for w in wanted), f"message lacks {[w for w in wanted if w not in msg]}:\n{msg}"
    assert (buf/'states.npy').stat().st_size == 1000, 'the refused open changed the file'

def test_repair_as_the_message_says_keeps_the_intact_episodes(tmp_path):
    "1000 bytes = 128 header + 54 whole rows: episodes 0-4 (rows 0-49) survive, 5-8 do not."
    buf = truncated_buffer(tmp_path)
    with pytest.raises(ReplayBufferError) as e: ReplayBuffer(buf, 4, 3, capacity=100, dtype='float32')
    cmd = re.search(r'python -c "(.*?)"', str(e.value)).group(1)
    r = subprocess.run([sys.executable, '-c', cmd], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = ast.literal_eval(r.stdout.strip())
    assert (report['kept'], report['dropped'], report['rows_kept']) == ([0, 1, 2, 3, 4], [5, 6, 7, 8], 50), report
    with ReplayBuffer(buf, 4, 3, capacity=100, dtype='float32') as b:
        assert (b.episode_serials(), len(b), b.cursor) == ([0, 1, 2, 3, 4], 50, 90), b
        check_rows(b)
    assert ReplayBuffer.repair(buf)['dropped'] == [], 'a second repair dropped more'
    rc, out, err = run_writer(tmp_path, buf, 4, 100, 10, 2)  # self-play carries on in the repaired buffer
    assert rc == 0, err
    with ReplayBuffer(buf, 4, 3, capacity=100, dtype='float32', readonly=True) as b:
        assert b.episode_serials() == [1, 2, 3, 4, 9, 10], b.episode_serials()  # rows 90-99 and 0-9: episode 0 evicted

def test_repair_uses_the_log_for_rows_a_cut_episodes_file_lost(tmp_path):
    "A wrapped ring (capacity 25, episodes of 10): rows 0-4 ep 2, 5-14 ep 3, 15-19 ep 1, 20-24 ep 2; episodes.npy cut after row 17."
    buf = tmp_path/'buf'
    rc, out, err = run_writer(tmp_path, buf, 4, 25, 10, 4)
    assert rc == 0, err
    os.truncate(buf/'episodes.npy', 128 + 18*8)
    report = ReplayBuffer.repair(buf)
    assert (report['kept'], report['dropped'], report['rows_kept']) == ([3], [1, 2], 10), report
    with ReplayBuffer(buf, 4, 3, capacity=25, dtype='float32') as b:
        assert (b.episode_serials(), len(b), b.cursor) == ([3], 10, 15), b
        check_rows(b)

def test_simulated_enospc_gives_the_message_and_keeps_committed_episodes(tmp_path, monkeypatch):
    "Where no tiny file system can be mounted: a full disk simulated at creation, at a writer's open, and at a commit."
    full = OSError(errno.ENOSPC, 'No space left on device')
    def no_space(*a): raise full
    buf, ep = tmp_path/'buf', lambda k: (np.full((3, 4), k + 1, np.float32), np.ones((3, 3), bool), np.full((3, 3), 1/3), np.full(3, (k % 7)/7),
                                         dict(episode_id=f'ep{k}', controller_version='v0', slm_fingerprint='f'*16))
    with monkeypatch.context() as m:
        m.setattr(os, 'posix_fallocate', no_space, raising=False)
        with pytest.raises(ReplayBufferError, match=re.escape(f"no space left on device for {str(buf/'states.npy')!r}: need ")): ReplayBuffer(buf, 4, 3, capacity=10, dtype='float32')
    assert sorted(p.name for p in buf.iterdir() if not p.name.startswith('.')) == [], 'a failed creation left files'
    with ReplayBuffer(buf, 4, 3, capacity=10, dtype='float32') as b:
        for k in range(2): b.add_episode(*ep(k))
        log = (buf/'log.jsonl').read_bytes()
        with monkeypatch.context() as m:
            m.setattr(os, 'write', no_space)
            with pytest.raises(ReplayBufferError, match=r"log\.jsonl'.*episode 2 was not committed"): b.add_episode(*ep(2))
        assert ((buf/'log.jsonl').read_bytes(), b.episode_serials(), len(b)) == (log, [0, 1], 6)
    with monkeypatch.context() as m:
        m.setattr(os, 'posix_fallocate', no_space, raising=False)
        with pytest.raises(ReplayBufferError, match='the committed episodes are intact'): ReplayBuffer(buf, 4, 3, capacity=10, dtype='float32')
    with ReplayBuffer(buf, 4, 3, capacity=10, dtype='float32') as b:
        assert b.add_episode(*ep(2)) == 2
        check_rows(b)

@pytest.fixture
def tiny_fs(tmp_path):
    "A 2 MiB tmpfs, mounted for the test (root only); skipped where mounting is not permitted."
    d = tmp_path/'fs'; d.mkdir()
    try: r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(d)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e: pytest.skip(f'cannot run mount: {e}')
    if r.returncode: pytest.skip(f'mounting a tmpfs is not permitted here: {r.stderr.strip()}')
    yield d
    subprocess.run(['umount', '-l', str(d)], check=True)

def fill(d, leave):
    "Fill file system `d` with a ballast file until `leave` bytes are free."
    free = os.statvfs(d).f_bavail*os.statvfs(d).f_frsize
    (d/'ballast').write_bytes(bytes(max(0, free - leave)))

def legacy_buffer(d, dim, capacity):
    "A buffer as earlier versions created it: sparse array files (np.lib.format.open_memmap), a header without array sizes."
    d.mkdir()
    shapes = dict(states=('float32', (capacity, dim)), masks=('bool', (capacity, 3)), policies=('float32', (capacity, 3)),
                  values=('float32', (capacity,)), episodes=('int64', (capacity,)))
    for k, (dt, shp) in shapes.items():
        a = np.lib.format.open_memmap(d/f'{k}.npy', mode='w+', dtype=dt, shape=shp)
        if k == 'episodes': a[:] = -1
        a.flush(); del a
    (d/'log.jsonl').write_bytes(b'')
    (d/'header.json').write_text(json.dumps(dict(format='research_controller.replay/1', dim=dim, n_actions=3, capacity=capacity, dtype='float32')))

def test_full_disk_is_a_clear_error_not_sigbus(tmp_path, tiny_fs):
    "A real 2 MiB file system; the buffer's arrays need 1.1 MB (dim 64, capacity 4000)."
    # 1. creating it with 400 kB free: refused, nothing half-written
    fill(tiny_fs, 400_000)
    rc, out, err = run_writer(tmp_path, tiny_fs/'a', 64, 4000, 50, 20)
    assert rc not in SIGBUS and rc == 1, (rc, err)
    assert f"no space left on device for {str(tiny_fs/'a'/'states.npy')!r}: need " in err and 'buffer.capacity lower' in err, err
    assert sorted(p.name for p in (tiny_fs/'a').iterdir() if not p.name.startswith('.')) == [], 'a failed creation left files'
    # 2. a buffer made by an earlier version (sparse files) on that disk: earlier versions died here with 'Bus error'
    (tiny_fs/'ballast').unlink()
    legacy_buffer(tiny_fs/'legacy', 64, 4000)
    fill(tiny_fs, 100_000)
    rc, out, err = run_writer(tmp_path, tiny_fs/'legacy', 64, 4000, 50, 79)
    assert rc not in SIGBUS and rc == 1, (rc, err)
    assert f"no space left on device for {str(tiny_fs/'legacy'/'states.npy')!r}" in err and 'committed episodes are intact' in err, err
    (tiny_fs/'ballast').unlink()
    rc, out, err = run_writer(tmp_path, tiny_fs/'legacy', 64, 4000, 50, 20)  # with space it reserves its blocks and runs
    assert rc == 0, err
    with ReplayBuffer(tiny_fs/'legacy', 64, 3, capacity=4000, dtype='float32', readonly=True) as b:
        assert b.episode_serials() == list(range(20)), b.episode_serials()
    shutil.rmtree(tiny_fs/'legacy')
    # 3. the disk fills up while self-play writes (8 kB of metadata per episode): the commit that does not fit is refused
    (tiny_fs/'spare').write_bytes(bytes(200_000))
    rc, out, err = run_writer(tmp_path, tiny_fs/'b', 64, 4000, 20, 1000, 8000)
    assert rc not in SIGBUS and rc == 1, (rc, err)
    n = sum(l.startswith('COMMITTED') for l in out)
    assert n > 10 and out[-1] == f'WRITING {n}', out[-3:]
    assert f"no space left on device for {str(tiny_fs/'b'/'log.jsonl')!r}" in err and f'episode {n} was not committed' in err, err
    with ReplayBuffer(tiny_fs/'b', 64, 3, capacity=4000, dtype='float32') as b:  # the disk is still full: opening needs no space
        assert (b.episode_serials(), len(b)) == (list(range(n)), 20*n), (b.episode_serials()[-3:], n)
        check_rows(b)
        (tiny_fs/'spare').unlink()  # space again: the lost episode goes in under its serial
        assert b.add_episode(np.full((20, 64), n + 1, np.float32), np.ones((20, 3), bool), np.full((20, 3), 1/3), np.full(20, (n % 7)/7),
                             dict(episode_id=f'ep{n}', controller_version='v0', slm_fingerprint='f'*16)) == n
        check_rows(b)
