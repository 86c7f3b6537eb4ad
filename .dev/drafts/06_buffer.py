# %%
#| default_exp buffer

# %% [markdown]
# # Replay buffer
# > A ring of self-play positions on disk that survives a killed process and reopens intact.

# %%
#| export
from __future__ import annotations
import json, math, os
from pathlib import Path
from typing import Any
import numpy as np
from filelock import FileLock, Timeout
from fastcore.basics import patch
from research_controller.config import Config, atomic_write_bytes, atomic_write_text, run_path

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from research_controller.config import load_config
import subprocess, signal, sys, tempfile, textwrap, time

# %% [markdown]
# Each position is one controller decision: the state vector, the legal mask, the visit-count policy
# (policy target) and the value target. Positions live in memory-mapped `.npy` files, one per field, used as
# a ring of `capacity` rows; a row also stores the serial number of the episode it came from.
# Episode metadata (episode id, controller version, SLM fingerprint, reward terms, ...) goes to an append-only
# JSONL log, one line per episode. **That line is the commit marker**: an episode counts only once its line is
# in the log, so a process killed mid-episode loses that episode and nothing else.
#
# The write order makes this hold:
# 1. mark the rows about to be overwritten as empty (serial -1),
# 2. write the arrays,
# 3. stamp the rows with the episode's serial,
# 4. flush, then append the log line (flushed and fsynced).
#
# On reopening, rows whose serial has no log line are treated as empty. Serials only grow, so "has a log line"
# is simply `serial <= last committed serial`.

# %%
#| export
class ReplayBufferError(ValueError):
    "A replay buffer that cannot be opened or written as asked; the message says why and how to fix it."

FORMAT = 'research_controller.replay/1'
REQUIRED_META = ('episode_id', 'controller_version', 'slm_fingerprint')
_FIELDS = ('states', 'masks', 'policies', 'values', 'episodes')

# %% [markdown]
# ## Opening and creating
# The header is written last when a buffer is created, so a directory without one is (re)initialised.
# Reopening checks the header against what the caller asks for: a buffer made for another feature dimension,
# action set, capacity or dtype is a clear error, never silently reinterpreted bytes. A writer holds a file
# lock (released by the OS even on `kill -9`); readers (the trainer, while self-play writes) take no lock.

# %%
#| export
class ReplayBuffer:
    "Ring buffer of self-play positions: memory-mapped arrays plus a JSONL log of committed episodes."
    def __init__(self,
                 path:str|Path, # directory of the buffer (created if missing)
                 dim:int, # state-vector size (582 for the default SLM)
                 n_actions:int, # number of macro-actions
                 capacity:int=50000, # positions kept; the oldest are overwritten
                 dtype:str='float16', # storage dtype of state vectors: float16 or float32
                 readonly:bool=False, # open for sampling only (no lock; `refresh()` picks up new episodes)
                 sampling:str='uniform', # default of `sample(by=...)`: uniform or recency
                 half_life:int=5000, # recency sampling: weight halves every this-many positions back
                 compact_slack:int=1000, # the writer compacts the log on open when it holds this many more lines than twice the live episodes
                ):
        if dtype not in ('float16', 'float32'): raise ReplayBufferError(f"dtype {dtype!r} is not supported; use 'float16' or 'float32' (buffer.dtype).")
        if sampling not in ('uniform', 'recency'): raise ReplayBufferError(f"sampling {sampling!r} must be 'uniform' or 'recency' (buffer.sampling).")
        for k, v in dict(dim=dim, n_actions=n_actions, capacity=capacity, half_life=half_life).items():
            if int(v) < 1: raise ReplayBufferError(f"{k} must be >= 1, got {v}.")
        self.path, self.readonly, self.sampling, self.half_life = Path(path), readonly, sampling, int(half_life)
        self.dim, self.n_actions, self.capacity, self.dtype = int(dim), int(n_actions), int(capacity), dtype
        self._lock, self.compact_slack = None, compact_slack
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.path/'.lock'))
            try: self._lock.acquire(timeout=0)
            except Timeout: raise ReplayBufferError(f"replay buffer {str(self.path)!r} is already open for writing by another process; "
                                                    "open it with readonly=True to sample, or use another buffer.path.") from None
        if not (self.path/'header.json').exists():
            if readonly: raise ReplayBufferError(f"no replay buffer at {str(self.path)!r} (header.json missing); create it with a writer first.")
            self._create()
        self._check_header()
        mode = 'r' if readonly else 'r+'
        try: self._arr = {k: np.load(self.path/f'{k}.npy', mmap_mode=mode) for k in _FIELDS}
        except (OSError, ValueError) as e: raise ReplayBufferError(f"replay buffer {str(self.path)!r} has an unreadable array file ({e}); it is corrupt, start a new buffer.path.") from None
        exp = dict(states=(self.capacity, self.dim), masks=(self.capacity, self.n_actions), policies=(self.capacity, self.n_actions),
                   values=(self.capacity,), episodes=(self.capacity,))
        for k, shp in exp.items():
            if self._arr[k].shape != shp: raise ReplayBufferError(f"replay buffer {str(self.path)!r}: {k}.npy has shape {self._arr[k].shape}, header says {shp}; the buffer is corrupt, start a new buffer.path.")
        self._log_offset, self._records = 0, {}
        self._last_serial, self._total = -1, 0
        self._load_log()
        if not readonly: self._recover()

    @classmethod
    def from_config(cls, cfg:Config, dim:int, n_actions:int, readonly:bool=False):
        "The buffer at `cfg.buffer.path` (under `paths.runs_dir`) with the configured capacity, dtype and sampling."
        b = cfg.buffer
        return cls(run_path(cfg, b.path), dim, n_actions, b.capacity, b.dtype, readonly, b.sampling, b.recency_half_life)

    def __len__(self): return int(self._valid().sum())
    def __repr__(self):
        return (f"ReplayBuffer(len={len(self)}, capacity={self.capacity}, dim={self.dim}, n_actions={self.n_actions}, "
                f"dtype={self.dtype}, episodes={len(self.episode_serials())}, cursor={self.cursor})")
    def __enter__(self): return self
    def __exit__(self, *a): self.close()

    @property
    def cursor(self) -> int:
        "Row the next position goes to."
        return self._total % self.capacity

    def close(self):
        "Flush, release the memory maps and the writer lock."
        if getattr(self, '_arr', None) and not self.readonly:
            for a in self._arr.values(): a.flush()
        self._arr = {}
        if self._lock is not None: self._lock.release(); self._lock = None

# %% [markdown]
# Creation writes zeroed arrays, empty rows (serial -1), an empty log, and the header last, atomically.

# %%
#| export
@patch
def _create(self:ReplayBuffer):
    c, open_mm = self.capacity, np.lib.format.open_memmap
    specs = dict(states=(self.dtype, (c, self.dim)), masks=(np.bool_, (c, self.n_actions)),
                 policies=(np.float32, (c, self.n_actions)), values=(np.float32, (c,)), episodes=(np.int64, (c,)))
    for k, (dt, shp) in specs.items():
        a = open_mm(self.path/f'{k}.npy', mode='w+', dtype=dt, shape=shp)
        if k == 'episodes': a[:] = -1
        a.flush(); del a
    (self.path/'log.jsonl').write_bytes(b'')
    hdr = dict(format=FORMAT, dim=self.dim, n_actions=self.n_actions, capacity=self.capacity, dtype=self.dtype)
    atomic_write_text(self.path/'header.json', json.dumps(hdr, indent=1))

@patch
def _check_header(self:ReplayBuffer):
    try: hdr = json.loads((self.path/'header.json').read_text())
    except (OSError, ValueError) as e: raise ReplayBufferError(f"replay buffer header {str(self.path/'header.json')!r} is unreadable ({e}); start a new buffer.path.") from None
    if hdr.get('format') != FORMAT: raise ReplayBufferError(f"{str(self.path)!r} is not a {FORMAT} buffer (format={hdr.get('format')!r}); use another buffer.path.")
    fix = {'dim': 'the feature dimension of the SLM it was filled with', 'n_actions': 'the macro-action set it was filled with',
           'capacity': 'buffer.capacity', 'dtype': 'buffer.dtype'}
    for k, why in fix.items():
        if hdr[k] != getattr(self, k):
            raise ReplayBufferError(f"replay buffer {str(self.path)!r} was created with {k}={hdr[k]!r} but {k}={getattr(self, k)!r} was requested. "
                                    f"Open it with {k}={hdr[k]!r} ({why}) or point buffer.path at a new directory.")

# %% [markdown]
# ## The log
# `_load_log` reads the log from where it stopped last time. Only the last line can be torn (a crash during
# the append); it is ignored, and a writer truncates it away. A bad line anywhere else is corruption.

# %%
#| export
@patch
def _load_log(self:ReplayBuffer):
    p = self.path/'log.jsonl'
    with open(p, 'rb') as f:
        f.seek(self._log_offset); data = f.read()
    pos = 0
    while pos < len(data):
        nl = data.find(b'\n', pos)
        line = data[pos:] if nl < 0 else data[pos:nl]
        try: rec = json.loads(line) if nl >= 0 else None
        except ValueError: rec = None
        if rec is None:
            if nl >= 0 and data.find(b'\n', nl + 1) >= 0:
                raise ReplayBufferError(f"replay buffer log {str(p)!r} is corrupt at byte {self._log_offset + pos}; it cannot be repaired automatically, start a new buffer.path.")
            if not self.readonly:  # a torn last line from a crash: cut it off
                with open(p, 'r+b') as f: f.truncate(self._log_offset + pos)
            break
        self._records[rec['serial']] = rec
        self._last_serial, self._total = rec['serial'], rec['end']
        pos = nl + 1
    self._log_offset += pos

@patch
def _recover(self:ReplayBuffer):
    "Writer on open: rows of an episode that never committed become empty; a log of mostly evicted episodes is compacted."
    ep = self._arr['episodes']
    bad = ep > self._last_serial
    if bad.any(): ep[bad] = -1; ep.flush()
    keep = set(self.episode_serials()) | {self._last_serial}
    n_lines = len(self._records)
    self._records = {k: v for k, v in self._records.items() if k in keep}
    if n_lines > 2*len(self._records) + self.compact_slack: self._compact()

@patch
def _compact(self:ReplayBuffer):
    "Rewrite the log with only the live episodes (atomic: temp file, then rename)."
    data = b''.join((json.dumps(self._records[k], sort_keys=True) + '\n').encode() for k in sorted(self._records))
    atomic_write_bytes(self.path/'log.jsonl', data)
    self._log_offset = len(data)

@patch
def refresh(self:ReplayBuffer):
    "Pick up episodes committed since opening (readers sampling while another process writes)."
    self._load_log()

@patch
def _valid(self:ReplayBuffer) -> np.ndarray:
    ep = self._arr['episodes']
    return (ep >= 0) & (ep <= self._last_serial)

@patch
def episode_serials(self:ReplayBuffer) -> list:
    "Serials of the episodes with at least one position still in the ring."
    ep = self._arr['episodes']
    return np.unique(ep[self._valid()]).tolist()

@patch
def episode_meta(self:ReplayBuffer, serial:int) -> dict:
    "Metadata stored with episode `serial` (episode id, controller version, SLM fingerprint, reward terms, ...)."
    if serial not in self._records: raise KeyError(f"no committed episode with serial {serial}.")
    return self._records[serial]['meta']

# %% [markdown]
# ## Adding episodes
# `add_episode` validates everything before touching the disk, then follows the write order above. `meta`
# must name the episode, the controller version and the SLM fingerprint, and be JSON-serialisable.

# %%
#| export
@patch
def add_episode(self:ReplayBuffer,
                states:np.ndarray, # [T, dim] state vectors
                masks:np.ndarray, # [T, n_actions] legal masks
                policies:np.ndarray, # [T, n_actions] visit-count policies (sum to 1, 0 where illegal)
                values:np.ndarray, # [T] value targets in [-1, 1]
                meta:dict, # episode_id, controller_version, slm_fingerprint, reward_terms, ... (JSON)
               ) -> int:
    "Append one finished episode atomically; returns its serial."
    if self.readonly: raise ReplayBufferError("this replay buffer was opened readonly; open it without readonly=True to add episodes.")
    states, masks = np.asarray(states), np.asarray(masks, bool)
    policies, values = np.asarray(policies, np.float32), np.asarray(values, np.float32).reshape(-1)
    T = len(values)
    for k, a, shp in (('states', states, (T, self.dim)), ('masks', masks, (T, self.n_actions)), ('policies', policies, (T, self.n_actions))):
        if a.shape != shp: raise ReplayBufferError(f"{k} has shape {a.shape}, expected {shp} (T={T} from values, dim={self.dim}, n_actions={self.n_actions}).")
    if T < 1: raise ReplayBufferError("an episode needs at least one position.")
    if T > self.capacity: raise ReplayBufferError(f"episode of {T} positions does not fit a buffer of capacity {self.capacity}; raise buffer.capacity.")
    if not (np.isfinite(states).all() and np.isfinite(policies).all() and np.isfinite(values).all()): raise ReplayBufferError("states, policies and values must be finite.")
    if np.abs(values).max() > 1 + 1e-6: raise ReplayBufferError("value targets must lie in [-1, 1].")
    if (policies < 0).any() or not np.allclose(policies.sum(1), 1, atol=1e-3): raise ReplayBufferError("each policy target must be a distribution (non-negative, summing to 1).")
    if (policies[~masks] > 0).any(): raise ReplayBufferError("a policy target puts mass on an illegal action.")
    if not isinstance(meta, dict) or (miss := [k for k in REQUIRED_META if k not in meta]):
        raise ReplayBufferError(f"meta must be a dict with keys {list(REQUIRED_META)}; missing {miss if isinstance(meta, dict) else list(REQUIRED_META)}.")
    try: meta_json = json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e: raise ReplayBufferError(f"meta must be JSON-serialisable without NaN ({e}).") from None
    serial, start = self._last_serial + 1, self.cursor
    idx = (start + np.arange(T)) % self.capacity
    a = self._arr
    evicted = np.unique(a['episodes'][idx]); evicted = evicted[evicted >= 0]
    a['episodes'][idx] = -1; a['episodes'].flush()      # 1. the rows about to change are empty
    a['states'][idx] = states.astype(self.dtype)      # 2. the data
    a['masks'][idx] = masks; a['policies'][idx] = policies; a['values'][idx] = np.clip(values, -1, 1)
    a['episodes'][idx] = serial                        # 3. stamped
    for x in a.values(): x.flush()
    self._commit(dict(serial=serial, start=int(start), length=T, end=self._total + T, meta=meta_json))  # 4. committed
    for e in evicted:  # forget the metadata of episodes that left the ring entirely
        if not (a['episodes'] == e).any(): self._records.pop(int(e), None)
    return serial

@patch
def _commit(self:ReplayBuffer, rec:dict):
    line = (json.dumps(rec, sort_keys=True) + '\n').encode()
    with open(self.path/'log.jsonl', 'ab') as f:
        f.write(line); f.flush(); os.fsync(f.fileno())
    self._log_offset += len(line)
    self._records[rec['serial']] = rec
    self._last_serial, self._total = rec['serial'], rec['end']

# %%
def fake_episode(T, dim=4, n_actions=3, k=0, seed=0):
    "A random but valid episode (test helper)."
    rng = np.random.default_rng(seed)
    m = np.ones((T, n_actions), bool); m[:, -1] = rng.random(T) < .5
    p = rng.random((T, n_actions))*m; p /= p.sum(1, keepdims=True)
    return (np.full((T, dim), k, np.float32), m, p, np.tanh(rng.normal(size=T)),
            dict(episode_id=f'ep{k}', controller_version='v0', slm_fingerprint='0123456789abcdef', reward_terms={'task': 0.5}))

tmp = Path(tempfile.mkdtemp())
buf = ReplayBuffer(tmp/'b', dim=4, n_actions=3, capacity=10, dtype='float32')
for k in range(3): buf.add_episode(*fake_episode(3, k=k, seed=k))
test_eq((len(buf), buf.cursor, buf.episode_serials()), (9, 9, [0, 1, 2]))
test_eq(buf.episode_meta(1)['episode_id'], 'ep1')
test_fail(lambda: buf.add_episode(*fake_episode(3, dim=5)), contains='expected (3, 4)')
test_fail(lambda: buf.add_episode(*fake_episode(3)[:4], {'episode_id': 'x'}), contains="missing ['controller_version', 'slm_fingerprint']")
bad = list(fake_episode(2)); bad[2] = np.array([[1., 0, 0], [0, 0, 2]])
test_fail(lambda: buf.add_episode(*bad), contains='distribution')
test_eq(len(buf), 9)  # rejected episodes wrote nothing
buf

# %% [markdown]
# The ring wraps: a 4-position episode on a 9/10-full buffer takes the free row and overwrites all three rows of the oldest
# episode.

# %%
buf.add_episode(*fake_episode(4, k=3))
test_eq((len(buf), buf.cursor, buf.episode_serials()), (10, 3, [1, 2, 3]))
test_eq(buf._arr['episodes'].tolist(), [3, 3, 3, 1, 1, 1, 2, 2, 2, 3])
buf

# %% [markdown]
# ## Sampling
# `sample(n, rng, by)` draws positions with replacement, uniformly or weighted by recency
# ($2^{-\text{age}/\text{half\_life}}$, age in positions). It returns float32 state vectors and the episode
# serial of each row (for `episode_meta`). A row that a concurrent writer changes while it is being copied
# is detected (its serial changed) and drawn again.

# %%
#| export
@patch
def _draw(self:ReplayBuffer, n, rng, by):
    valid = np.flatnonzero(self._valid())
    if not len(valid): raise ReplayBufferError("the replay buffer is empty; run self-play first.")
    if by == 'uniform': return valid[rng.integers(0, len(valid), n)]
    w = 0.5**(((self.cursor - 1 - valid) % self.capacity)/self.half_life)
    return rng.choice(valid, size=n, p=w/w.sum())

@patch
def _copy(self:ReplayBuffer, idx):
    a = self._arr
    ser = np.array(a['episodes'][idx])
    return dict(states=np.asarray(a['states'][idx], np.float32), masks=np.array(a['masks'][idx]),
                policies=np.array(a['policies'][idx]), values=np.array(a['values'][idx]), episodes=ser, idx=idx)

@patch
def _stable(self:ReplayBuffer, b):
    "Rows whose serial was valid before the copy and unchanged after it."
    ser = b['episodes']
    return (ser >= 0) & (ser <= self._last_serial) & (np.array(self._arr['episodes'][b['idx']]) == ser)

# %%
#| export
@patch
def sample(self:ReplayBuffer,
           n:int, # positions to draw (with replacement)
           rng:np.random.Generator|None=None, # randomness; None = a fresh unseeded generator
           by:str|None=None, # 'uniform' or 'recency'; None = the buffer's default (buffer.sampling)
          ) -> dict:
    "A batch: states [n,dim] float32, masks, policies, values, episodes (serials), idx (rows)."
    rng = rng if rng is not None else np.random.default_rng()
    by = by or self.sampling
    if by not in ('uniform', 'recency'): raise ReplayBufferError(f"by={by!r} must be 'uniform' or 'recency'.")
    out = self._copy(self._draw(n, rng, by))
    bad = np.flatnonzero(~self._stable(out))
    for _ in range(10):
        if not len(bad): return out
        b = self._copy(self._draw(len(bad), rng, by))
        ok = self._stable(b)
        for k in out: out[k][bad[ok]] = b[k][ok]
        bad = bad[~ok]
    raise ReplayBufferError("could not sample stable rows: the writer keeps overwriting them; use a larger buffer.capacity.")

# %%
rng = np.random.default_rng(0)
b = buf.sample(2000, rng)
test_eq((b['states'].shape, b['states'].dtype, b['masks'].dtype), ((2000, 4), np.float32, np.bool_))
test_eq(set(b['episodes'].tolist()), {1, 2, 3})
test_eq((b['states'][:, 0] == b['episodes']).all(), True)  # row data belongs to the serial reported
test_close((b['episodes'] == 3).mean(), 4/10, eps=0.05)  # uniform: episode 3 holds 4 of 10 rows
recent = ReplayBuffer(tmp/'r', 4, 3, capacity=100, dtype='float32', half_life=2)
for k in range(5): recent.add_episode(*fake_episode(4, k=k))
br = recent.sample(2000, rng, by='recency')
test_eq(np.bincount(br['episodes'], minlength=5)[4] > np.bincount(br['episodes'], minlength=5)[:4].sum(), True)
np.bincount(br['episodes'], minlength=5), np.bincount(recent.sample(2000, rng, by='uniform')['episodes'], minlength=5)

# %% [markdown]
# ## Reopening
# Closing and reopening restores length, cursor, serials and metadata. Asking for another shape is an error
# that names the field; a second writer is refused.

# %%
buf.close()
buf = ReplayBuffer(tmp/'b', dim=4, n_actions=3, capacity=10, dtype='float32')
test_eq((len(buf), buf.cursor, buf.episode_serials(), buf.episode_meta(3)['episode_id']), (10, 3, [1, 2, 3], 'ep3'))
test_fail(lambda: ReplayBuffer(tmp/'b', dim=4, n_actions=3, capacity=10, dtype='float32'), contains='already open for writing')
buf.close()
test_fail(lambda: ReplayBuffer(tmp/'b', dim=582, n_actions=3, capacity=10, dtype='float32'), contains="created with dim=4 but dim=582")
test_fail(lambda: ReplayBuffer(tmp/'b', dim=4, n_actions=5, capacity=10, dtype='float32'), contains="n_actions=3")
test_fail(lambda: ReplayBuffer(tmp/'b', dim=4, n_actions=3, capacity=10, dtype='float16'), contains="buffer.dtype")
try: ReplayBuffer(tmp/'b', dim=582, n_actions=3, capacity=10, dtype='float32')
except ReplayBufferError as e: print(str(e).replace(str(tmp), '<tmp>'))

# %% [markdown]
# A reader (the trainer) samples while the writer (self-play) keeps adding; `refresh()` shows it the new
# episodes.

# %%
w = ReplayBuffer(tmp/'b', dim=4, n_actions=3, capacity=10, dtype='float32')
r = ReplayBuffer(tmp/'b', dim=4, n_actions=3, capacity=10, dtype='float32', readonly=True)
w.add_episode(*fake_episode(2, k=4))
test_eq(r.episode_serials(), [1, 2, 3])  # not refreshed yet: the new episode is invisible
r.refresh()
test_eq((len(r), r.episode_serials()), (len(w), [1, 2, 3, 4]))
test_fail(lambda: r.add_episode(*fake_episode(2)), contains='readonly')
r.close(); w.close()

# %% [markdown]
# ## Crash safety
# A child process opens the buffer, commits three episodes, then starts a fourth that wraps around the ring.
# It stops right before the commit; the parent kills it with `SIGKILL`. On reopening, the three committed
# episodes are there except the rows the in-flight episode was already overwriting (the oldest, which it was
# evicting anyway); nothing of the in-flight episode is visible, and the next episode goes where it would have.

# %%
crash_dir = tmp/'crash'
child = textwrap.dedent(f"""
    import sys, time, numpy as np
    from research_controller.buffer import ReplayBuffer
    b = ReplayBuffer({str(crash_dir)!r}, dim=4, n_actions=3, capacity=10, dtype='float32')
    meta = lambda k: dict(episode_id=f'ep{{k}}', controller_version='v0', slm_fingerprint='f'*16)
    ep = lambda k, T: (np.full((T, 4), k, np.float32), np.ones((T, 3), bool), np.full((T, 3), 1/3), np.zeros(T), meta(k))
    for k in range(3): b.add_episode(*ep(k, 3))
    def hang(rec): print('WRITTEN', flush=True); time.sleep(60)
    b._commit = hang
    b.add_episode(*ep(3, 4))
""")
p = subprocess.Popen([sys.executable, '-c', child], stdout=subprocess.PIPE, text=True)
test_eq(p.stdout.readline().strip(), 'WRITTEN')
os.kill(p.pid, signal.SIGKILL); p.wait()
test_eq(p.returncode, -signal.SIGKILL)
with ReplayBuffer(crash_dir, dim=4, n_actions=3, capacity=10, dtype='float32') as cb:
    test_eq((cb.episode_serials(), len(cb), cb.cursor), ([1, 2], 6, 9))
    test_eq(cb._arr['episodes'].tolist(), [-1, -1, -1, 1, 1, 1, 2, 2, 2, -1])
    test_eq(set(cb.sample(500, rng)['states'][:, 0].tolist()), {1.0, 2.0})
    test_eq(cb.add_episode(*fake_episode(2, k=9)), 3)  # the serial of the lost episode is reused
    test_eq(cb.cursor, 1)
    print(cb)

# %% [markdown]
# A log line torn by a crash during the append itself (a power cut) is dropped when the buffer reopens;
# a damaged line in the middle of the log is reported, not guessed around.

# %%
with open(crash_dir/'log.jsonl', 'ab') as f: f.write(b'{"serial": 4, "sta')
with ReplayBuffer(crash_dir, dim=4, n_actions=3, capacity=10, dtype='float32') as cb:
    test_eq((cb.episode_serials(), len(cb)), ([1, 2, 3], 8))
test_eq((crash_dir/'log.jsonl').read_bytes().endswith(b'}\n'), True)
lines = (crash_dir/'log.jsonl').read_bytes().split(b'\n')
(crash_dir/'log.jsonl').write_bytes(b'\n'.join([lines[0][:20]] + lines[1:]))
test_fail(lambda: ReplayBuffer(crash_dir, dim=4, n_actions=3, capacity=10, dtype='float32'), contains='corrupt at byte 0')

# %% [markdown]
# The log keeps one line per episode, so on a long run it would mostly describe evicted episodes; the writer
# compacts it when it opens a buffer whose log has many more lines than live episodes (here with a small slack).

# %%
with ReplayBuffer(tmp/'c', 4, 3, capacity=4, dtype='float32', compact_slack=5) as cb:
    for k in range(20): cb.add_episode(*fake_episode(1, k=k))
    test_eq(len(cb._records), 4)  # evicted episodes' metadata is dropped from memory at once
test_eq(len((tmp/'c'/'log.jsonl').read_text().splitlines()), 20)
with ReplayBuffer(tmp/'c', 4, 3, capacity=4, dtype='float32', compact_slack=5) as cb:
    test_eq((cb.episode_serials(), cb.cursor, len(cb)), ([16, 17, 18, 19], 0, 4))
    test_eq(cb.add_episode(*fake_episode(1, k=20)), 20)
test_eq(len((tmp/'c'/'log.jsonl').read_text().splitlines()), 5)
with ReplayBuffer(tmp/'c', 4, 3, capacity=4, dtype='float32') as cb:
    test_eq((cb.episode_serials(), cb.cursor, cb.episode_meta(20)['episode_id']), ([17, 18, 19, 20], 1, 'ep20'))

# %% [markdown]
# From the config: the buffer lives at `buffer.path` under `paths.runs_dir`, with its capacity, dtype and
# default sampling.

# %%
cfg = load_config(overrides=[f'paths.runs_dir={tmp}', 'buffer.capacity=64', 'buffer.sampling=recency'])
with ReplayBuffer.from_config(cfg, dim=582, n_actions=5) as fb:
    test_eq((fb.capacity, fb.dtype, fb.sampling, fb.path), (64, 'float16', 'recency', tmp/'buffer'))
    fb.add_episode(*fake_episode(5, dim=582, n_actions=5))
    test_eq(fb._arr['states'].dtype, np.float16)
    print(fb)

# %%
import shutil; shutil.rmtree(tmp)
