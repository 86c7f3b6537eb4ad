# %%
#| default_exp train

# %% [markdown]
# # Training
# > Fit the policy/value network on replay-buffer positions: AdamW with warm-up and a schedule, gradient clipping, optional AMP, TensorBoard/W&B logging, atomic checkpoints and bit-identical resume after a crash.

# %%
#| export
from __future__ import annotations
import hashlib, json, logging, math, os, time, warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from fastcore.basics import patch
from research_controller.config import Config, ConfigError, atomic_write, config_hash, config_to_dict, load_config, run_path
from research_controller.macro_actions import ACTION_NAMES, N_ACTIONS
from research_controller.buffer import FORMAT as BUFFER_FORMAT, ReplayBuffer, ReplayBufferError
from research_controller.network import PolicyValueNet, CheckpointError, load_checkpoint, loss, save_checkpoint
from research_controller.selfplay import default_buffer_path

log = logging.getLogger(__name__)

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import shutil, tempfile
from research_controller.config import replace_config
from research_controller.network import synthetic_batch
torch.set_num_threads(1)  # the test machine's cores are shared

# %% [markdown]
# Training reads the positions self-play committed to the replay buffer and fits the network of
# `07_network` to them: the policy head to the visit distributions, the value head to the final rewards. This
# notebook builds it in steps: the data (a snapshot of the buffer and a resumable sampler), the
# learning-rate schedule, the training loop with its checkpoints and logging callbacks, the resume check, and
# at the end the smoke run on the default SLM (self-play, then training).
#
# The tests use a small buffer with learnable targets: positions drawn like `network.synthetic_batch`
# (targets are a fixed random function of the features), stored as episodes with real metadata.

# %%
def make_buffer(path, n_episodes=24, T=8, dim=64, seed=0, fingerprint='f'*16):
    "A replay buffer of synthetic episodes (learnable targets) for the checks below."
    b = synthetic_batch(n_episodes*T, dim=dim, seed=seed)
    with ReplayBuffer(path, dim, N_ACTIONS, capacity=4096, dtype='float32') as rb:
        for e in range(n_episodes):
            s = slice(e*T, (e + 1)*T)
            rb.add_episode(b['states'][s], b['masks'][s], b['policies'][s], b['values'][s],
                           dict(episode_id=f'ep{e}', controller_version='uniform', slm_fingerprint=fingerprint))
    return path

tmp = Path(tempfile.mkdtemp())
bp = make_buffer(tmp/'buf')
cfg0 = load_config(overrides=['network.hidden=32', 'network.dropout=0.1', 'train.batch_size=32', 'train.steps=40',
                              'train.warmup_steps=5', 'train.checkpoint_every=10', 'train.lr=0.01', f'paths.runs_dir={tmp}/runs'])
bp

# %% [markdown]
# ## Data
# `open_buffer` opens an existing buffer read-only, taking its dimensions from its header, so the trainer needs
# no SLM. `BufferData` is a snapshot of the positions to train on (all of them, or those of the given
# episodes): training on a fixed snapshot is what makes a resumed run see exactly the data the crashed one saw,
# even if self-play keeps writing. Its `digest` identifies it.

# %%
#| export
def open_buffer(path:str|Path) -> ReplayBuffer:
    "Open an existing replay buffer read-only with the dimensions in its header."
    path = Path(path)
    hp = path/'header.json'
    if not hp.exists(): raise ReplayBufferError(f"no replay buffer at {str(path)!r} (header.json missing); run self-play first (rc selfplay) or pass buffer_path.")
    try: h = json.loads(hp.read_text())
    except ValueError as e: raise ReplayBufferError(f"replay buffer header {str(hp)!r} is unreadable ({e}); start a new buffer.") from None
    if h.get('format') != BUFFER_FORMAT: raise ReplayBufferError(f"{str(path)!r} is not a {BUFFER_FORMAT} buffer.")
    return ReplayBuffer(path, h['dim'], h['n_actions'], h['capacity'], h['dtype'], readonly=True)

class BufferData(Dataset):
    "In-memory snapshot of replay-buffer positions; indexed by an array of positions, returns a batch dict of tensors."
    def __init__(self, buf:ReplayBuffer, episode_ids:Sequence|None=None):
        serials = buf.episode_serials()
        metas = {s: buf.episode_meta(s) for s in serials}
        if episode_ids is not None:
            want = set(episode_ids)
            keep = [s for s in serials if s in want or metas[s]['episode_id'] in want]
            found = {x for s in keep for x in (s, metas[s]['episode_id'])}
            miss = [e for e in episode_ids if e not in found]
            if miss: raise ReplayBufferError(f"episode_ids {miss[:5]} are not in the buffer {str(buf.path)!r} (evicted, or from another buffer).")
            serials = keep
        if not serials: raise ReplayBufferError(f"the replay buffer {str(buf.path)!r} holds no episodes to train on; run self-play first.")
        fps = sorted({metas[s]['slm_fingerprint'] for s in serials})
        if len(fps) > 1: raise ReplayBufferError(f"the positions come from {len(fps)} different SLMs {fps}; train on one SLM's episodes (episode_ids=...).")
        valid = np.flatnonzero(buf._valid())
        rows = valid[np.isin(np.asarray(buf._arr['episodes'])[valid], serials)]
        d = buf._copy(rows)
        self.states, self.masks = torch.from_numpy(d['states']), torch.from_numpy(d['masks'])
        self.policies, self.values = torch.from_numpy(d['policies']), torch.from_numpy(d['values'])
        self.rows, self.serials = rows, d['episodes']
        self.age = (buf.cursor - 1 - rows) % buf.capacity  # 0 = the newest position
        self.dim, self.n_actions, self.slm_fingerprint = buf.dim, buf.n_actions, fps[0]
        self.episodes, self.buffer_path = len(serials), str(buf.path)
        h = hashlib.sha256(np.ascontiguousarray(rows, np.int64).tobytes()); h.update(np.ascontiguousarray(self.serials, np.int64).tobytes())
        self.digest = h.hexdigest()[:16]

    def __len__(self): return len(self.rows)
    def __getitem__(self, idx):
        idx = torch.as_tensor(idx)
        return dict(states=self.states[idx], masks=self.masks[idx], policies=self.policies[idx], values=self.values[idx])
    def __repr__(self): return f"BufferData(positions={len(self)}, episodes={self.episodes}, dim={self.dim}, digest={self.digest!r})"

# %%
with open_buffer(bp) as rb: data = BufferData(rb)
test_eq((len(data), data.episodes, data.dim), (24*8, 24, 64))
test_eq(data[np.array([0, 5])]['states'].shape, (2, 64))
with open_buffer(bp) as rb: sub = BufferData(rb, episode_ids=['ep0', 'ep3', 5])
test_eq((len(sub), sub.episodes), (24, 3))
with open_buffer(bp) as rb: test_fail(lambda: BufferData(rb, episode_ids=['nope']), contains="['nope'] are not in the buffer")
test_fail(lambda: open_buffer(tmp/'missing'), contains='run self-play first')
data

# %% [markdown]
# `StepSampler` decides which positions step `k` trains on from `(seed, k)` alone, so the data order of any
# step can be recomputed after a crash with no sampler state to save beyond the step number. Positions are
# drawn uniformly, or with `buffer.sampling = 'recency'` weighted by `0.5 ** (age / buffer.recency_half_life)`.

# %%
#| export
class StepSampler(Sampler):
    "Yields one index array per step in `[start, stop)`; the batch of step k depends only on (seed, k)."
    def __init__(self, n:int, batch_size:int, seed:int, start:int, stop:int, weights:np.ndarray|None=None):
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.p = None if weights is None else np.asarray(weights, np.float64)/np.sum(weights)
    def batch(self, k:int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, k])
        return rng.choice(self.n, self.batch_size, p=self.p) if self.p is not None else rng.integers(0, self.n, self.batch_size)
    def __iter__(self):
        for k in range(self.start, self.stop): yield self.batch(k)
    def __len__(self): return max(0, self.stop - self.start)

def make_loader(data:BufferData, cfg:Config, start:int, stop:int) -> DataLoader:
    "DataLoader over `data` yielding the batches of steps `[start, stop)`."
    w = 0.5**(data.age/cfg.buffer.recency_half_life) if cfg.buffer.sampling == 'recency' else None
    # its own generator: a DataLoader iterator otherwise draws a base seed from the global torch RNG, which would shift
    # the dropout stream of a resumed run
    return DataLoader(data, sampler=StepSampler(len(data), cfg.train.batch_size, cfg.train.seed, start, stop, w), batch_size=None,
                      generator=torch.Generator().manual_seed(cfg.train.seed))

# %%
full = [b['states'] for b in make_loader(data, cfg0, 0, 6)]
tail = [b['states'] for b in make_loader(data, cfg0, 3, 6)]
test_eq(len(full), 6)
for a, b in zip(full[3:], tail): test_eq(torch.equal(a, b), True)  # step 3 onwards, recomputed
test_eq(torch.equal(full[0], full[1]), False)
rec = make_loader(data, replace_config(cfg0, ['buffer.sampling=recency', 'buffer.recency_half_life=8']), 0, 20).sampler
np.mean([data.age[rec.batch(k)].mean() for k in range(20)]), data.age.mean()  # recency sampling favours new positions

# %% [markdown]
# ## Learning-rate schedule
# Linear warm-up over `train.warmup_steps`, then `cosine` (to 0 at the last step), `linear` (to 0) or `constant`.

# %%
#| export
def lr_factor(step:int, steps:int, warmup:int, schedule:str) -> float:
    "Multiplier of `train.lr` at optimiser step `step` (0-based) of `steps`."
    if warmup and step < warmup: return (step + 1)/warmup
    if schedule == 'constant': return 1.0
    t = (step - warmup)/max(1, steps - warmup)
    if schedule == 'cosine': return 0.5*(1 + math.cos(math.pi*min(t, 1.0)))
    if schedule == 'linear': return max(0.0, 1 - t)
    raise ConfigError(f"train.schedule = {schedule!r} is not one of ['cosine', 'constant', 'linear'].")

# %%
test_close([lr_factor(s, 10, 2, 'cosine') for s in (0, 1, 2, 7)], [0.5, 1.0, 1.0, 0.5*(1 + math.cos(math.pi*5/8))])
test_eq([lr_factor(s, 10, 0, 'linear') for s in (0, 5)], [1.0, 0.5])
test_fail(lambda: lr_factor(5, 10, 0, 'step'), contains="train.schedule = 'step'")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(5, 2))
for sch in ('cosine', 'linear', 'constant'): ax.plot([lr_factor(s, 200, 20, sch) for s in range(200)], label=sch)
ax.set_xlabel('step'); ax.set_ylabel('lr / train.lr'); ax.legend(); plt.show()

# %% [markdown]
# ## Logging callbacks
# Logging hooks in as ordered callbacks (`order`, `before_fit`, `after_step`, `after_fit`). `TensorBoardLogger`
# writes every loss part, the learning rate and the gradient norm to `run_path(cfg, train.log_dir)/<run>`
# (`purge_step` drops events a crashed run logged past its last checkpoint). `WandbLogger` does the same to
# Weights & Biases (offline unless `WANDB_MODE` says otherwise); wandb is an optional dependency.

# %%
#| export
class TrainCallback:
    "Base for training callbacks; override the events you need."
    order = 0
    def before_fit(self, tr:'Trainer'): pass
    def after_step(self, tr:'Trainer', rec:dict): pass
    def after_fit(self, tr:'Trainer'): pass

class TensorBoardLogger(TrainCallback):
    "Scalars of every step to TensorBoard."
    order = 10
    def before_fit(self, tr):
        from torch.utils.tensorboard import SummaryWriter
        tr.log_dir.mkdir(parents=True, exist_ok=True)
        self.w = SummaryWriter(str(tr.log_dir), purge_step=tr.step if tr.step else None)
    def after_step(self, tr, rec):
        for k, v in rec.items():
            if k != 'step': self.w.add_scalar(f"{'loss/' if k in LOSS_KEYS else 'train/'}{k}", v, rec['step'])
    def after_fit(self, tr): self.w.flush(); self.w.close()

WANDB_HINT = "pip install 'research_controller[wandb]' (or pip install wandb==0.31.0)"

class WandbLogger(TrainCallback):
    "Scalars of every step to Weights & Biases (WANDB_MODE=offline by default)."
    order = 20
    def before_fit(self, tr):
        try: import wandb
        except ImportError: raise ImportError(f"train.wandb=true needs wandb, which is not installed. Fix: {WANDB_HINT}, or set train.wandb=false.") from None
        os.environ.setdefault('WANDB_MODE', 'offline')
        self.wandb = wandb
        self.run = wandb.init(project=tr.cfg.train.wandb_project, config=config_to_dict(tr.cfg), dir=str(tr.out_dir),
                              id=f"{tr.out_dir.name}-{tr.run_id}", resume='allow', reinit=True)
    def after_step(self, tr, rec): self.run.log({k: v for k, v in rec.items() if k != 'step'}, step=rec['step'])
    def after_fit(self, tr): self.run.finish()

LOSS_KEYS = ('total', 'policy', 'policy_kl', 'value', 'ponder', 'l2', 'steps')

# %% [markdown]
# ## The trainer
# `Trainer` holds everything one training run needs. Its full state (network, optimiser, scheduler, AMP
# scaler, torch RNG, step, loss history, the data digest) goes into `train_state.pt` next to the checkpoints,
# written atomically every `train.checkpoint_every` steps together with a plain network checkpoint
# (`network.save_checkpoint`, `step_NNNNNN.pt`). A fresh `Trainer` on the same directory resumes from that state
# when it belongs to the same run (same data, network, training settings and target steps); a stale state from
# another run is ignored with a warning.

# %%
#| export
@dataclass
class TrainResult:
    "What a training run produced."
    checkpoint: str      # the final checkpoint (network.save_checkpoint format)
    steps: int           # optimiser steps done in total
    losses: list         # one dict per step: step, total, policy, policy_kl, value, ponder, l2, steps, lr, grad_norm
    samples: int         # positions seen (steps x batch size)
    seconds: float       # wall time of this call
    log_dir: str         # TensorBoard directory
    resumed_from: int = 0  # step the run resumed from (0 = fresh)
    positions: int = 0   # positions in the training snapshot
    def __repr__(self):
        first, last = (self.losses[0]['total'], self.losses[-1]['total']) if self.losses else (float('nan'),)*2
        return (f"TrainResult(steps={self.steps}, resumed_from={self.resumed_from}, loss {first:.3f} -> {last:.3f}, "
                f"checkpoint={Path(self.checkpoint).name!r})")

def _atomic_torch_save(obj, path:Path): atomic_write(path, lambda t: torch.save(obj, t))

# %%
#| export
class Trainer:
    "One training run: data snapshot, network, AdamW + schedule, AMP, callbacks, checkpoints, resume."
    def __init__(self, cfg:Config, data:BufferData, out_dir:str|Path, steps:int, init_checkpoint:str|Path|None=None,
                 callbacks:Sequence=(), device:str|None=None):
        tc = self.cfg_t = cfg.train
        self.cfg, self.data, self.out_dir, self.steps = cfg, data, Path(out_dir), int(steps)
        if self.steps < 1: raise ValueError(f"steps must be >= 1, got {steps} (train.steps).")
        self.device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        self.amp = bool(tc.amp and self.device.type == 'cuda')
        if tc.amp and not self.amp: warnings.warn("train.amp=true has no effect without CUDA; training in float32.")
        torch.manual_seed(tc.seed)
        if init_checkpoint is not None:
            self.net, info = load_checkpoint(init_checkpoint, feature_dim=data.dim, action_names=ACTION_NAMES, slm_fingerprint=data.slm_fingerprint)
        else: self.net = PolicyValueNet(data.dim, data.n_actions, cfg.network)
        self.net.to(self.device)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, self.steps, tc.warmup_steps, tc.schedule))
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp)
        self.init_checkpoint = str(init_checkpoint) if init_checkpoint else None
        self.step, self.losses, self.resumed_from = 0, [], 0
        self.run_id = hashlib.sha256(json.dumps([data.digest, config_to_dict(cfg.train), config_to_dict(self.net.cfg), self.steps,
                                                 self.init_checkpoint], sort_keys=True).encode()).hexdigest()[:12]
        self.log_dir = run_path(cfg, tc.log_dir)/f"{self.out_dir.name}-{self.run_id}"
        cbs = [TensorBoardLogger()] + ([WandbLogger()] if tc.wandb else []) + list(callbacks)
        self.callbacks = sorted(cbs, key=lambda c: getattr(c, 'order', 0))

    @property
    def state_path(self) -> Path: return self.out_dir/'train_state.pt'
    def __repr__(self): return f"Trainer(step={self.step}/{self.steps}, body={self.net.cfg.body!r}, device={self.device.type}, data={self.data!r})"

    def _cb(self, event, *a):
        for c in self.callbacks:
            f = getattr(c, event, None)
            if f is not None: f(self, *a)

# %% [markdown]
# Saving and loading the full state. The state file is written before the step's network checkpoint, both
# atomically, so a crash at any instant leaves a consistent pair.

# %%
#| export
@patch
def save_state(self:Trainer):
    "Write the resumable state and a network checkpoint for the current step (atomic)."
    self.out_dir.mkdir(parents=True, exist_ok=True)
    st = dict(run_id=self.run_id, step=self.step, net=self.net.state_dict(), opt=self.opt.state_dict(), sched=self.sched.state_dict(),
              scaler=self.scaler.state_dict(), rng=torch.get_rng_state(),
              cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], losses=self.losses)
    _atomic_torch_save(st, self.state_path)
    return self.save_checkpoint(self.out_dir/f'step_{self.step:06d}.pt')

@patch
def save_checkpoint(self:Trainer, path:Path) -> Path:
    "A `network.save_checkpoint` file of the current network with the run's provenance."
    extra = dict(step=self.step, steps=self.steps, run_id=self.run_id, data_digest=self.data.digest, buffer=self.data.buffer_path,
                 episodes=self.data.episodes, positions=len(self.data), init_checkpoint=self.init_checkpoint,
                 loss=self.losses[-1]['total'] if self.losses else None)
    return save_checkpoint(self.net, path, self.data.slm_fingerprint, ACTION_NAMES, self.cfg, extra=extra)

@patch
def try_resume(self:Trainer) -> bool:
    "Load `train_state.pt` if it belongs to this run; returns whether it did."
    if not self.state_path.exists(): return False
    try: st = torch.load(self.state_path, map_location=self.device, weights_only=True)
    except Exception as e:
        warnings.warn(f"ignoring unreadable {str(self.state_path)!r} ({type(e).__name__}); training from step 0."); return False
    if st.get('run_id') != self.run_id:
        warnings.warn(f"ignoring {str(self.state_path)!r}: it belongs to another run (other data, settings or steps); training from step 0.")
        return False
    self.net.load_state_dict(st['net']); self.opt.load_state_dict(st['opt']); self.sched.load_state_dict(st['sched'])
    self.scaler.load_state_dict(st['scaler']); torch.set_rng_state(st['rng'].cpu())
    if st['cuda_rng'] and torch.cuda.is_available(): torch.cuda.set_rng_state_all([r.cpu() for r in st['cuda_rng']])
    self.step, self.losses, self.resumed_from = int(st['step']), list(st['losses']), int(st['step'])
    return True

# %% [markdown]
# One optimiser step: the loss of `network.loss` (policy cross-entropy to the visit distribution, value MSE
# weighted by `train.value_weight`, ponder cost for the recursive body), under autocast when AMP is on,
# gradient clipping at `train.grad_clip`, then the scheduler. The record also has `policy_kl`, the cross-entropy
# minus the entropy of the visit targets: soft targets put a floor under the cross-entropy, the KL goes to 0.

# %%
#| export
@patch
def train_step(self:Trainer, batch:dict) -> dict:
    "One optimiser step on `batch`; returns its record (loss parts, lr, grad_norm)."
    tc = self.cfg_t
    self.net.train()
    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
    lr = self.opt.param_groups[0]['lr']
    with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
        total, parts = loss(self.net, batch, value_weight=tc.value_weight)
    if not math.isfinite(parts['total']): raise FloatingPointError(f"training loss became {parts['total']} at step {self.step + 1}; lower train.lr.")
    self.opt.zero_grad(set_to_none=True)
    self.scaler.scale(total).backward()
    self.scaler.unscale_(self.opt)
    gn = torch.nn.utils.clip_grad_norm_(self.net.parameters(), tc.grad_clip if tc.grad_clip else float('inf'))
    self.scaler.step(self.opt); self.scaler.update(); self.sched.step()
    self.step += 1
    pi = batch['policies'].float()
    h = float(-(pi*torch.log(pi.clamp_min(1e-12))).sum(-1).mean())  # target entropy: the floor of the policy cross-entropy
    rec = dict(step=self.step, **parts, policy_kl=parts['policy'] - h, lr=float(lr), grad_norm=float(gn))
    self.losses.append(rec)
    return rec

# %% [markdown]
# `fit` runs the remaining steps with a progress bar, saving every `train.checkpoint_every` steps and at the end.

# %%
#| export
@patch
def fit(self:Trainer, progress:bool=True) -> Path:
    "Train from the current step to `steps`; returns the final checkpoint path."
    tc = self.cfg_t
    self._cb('before_fit')
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=self.steps, initial=self.step, desc='train', unit='step')
    try:
        for batch in make_loader(self.data, self.cfg, self.step, self.steps):
            rec = self.train_step(batch)
            if self.step % tc.checkpoint_every == 0 or self.step == self.steps: self.save_state()
            self._cb('after_step', rec)
            if bar is not None: bar.update(1); bar.set_postfix(loss=f"{rec['total']:.4f}")
    finally:
        if bar is not None: bar.close()
    final = self.save_checkpoint(self.out_dir/'final.pt')
    self._cb('after_fit')
    return final

# %% [markdown]
# ## `train`
# The entry point `rc train` calls: snapshot the buffer (default: where `run_selfplay` writes), build or load
# the network (`init_checkpoint` continues from a champion), resume when `resume` and the directory holds this
# run's state, fit, and return a `TrainResult`.

# %%
#| export
def train(cfg:Config, # the config (`train`, `network`, `buffer`, `paths`)
          buffer_path:str|Path|None=None, # replay buffer; None = selfplay.default_buffer_path(cfg)
          init_checkpoint:str|Path|None=None, # start from this network instead of a fresh one
          out_dir:str|Path|None=None, # checkpoints and train_state.pt; None = run_path(cfg, train.checkpoint_dir)
          steps:int|None=None, # optimiser steps in total; None = train.steps
          resume:bool=True, # continue from out_dir/train_state.pt when it belongs to this run
          progress:bool=True, # show a tqdm bar
          episode_ids:Sequence|None=None, # train only on these episodes (ids or buffer serials); None = all
          callbacks:Sequence=(), # extra TrainCallback objects (ordered)
          device:str|None=None, # None = cuda when available, else cpu
         ) -> TrainResult:
    "Train the policy/value network on replay-buffer positions; checkpoints, logs and resumes."
    t0 = time.perf_counter()
    with open_buffer(buffer_path if buffer_path is not None else default_buffer_path(cfg)) as buf:
        if buf.n_actions != N_ACTIONS: raise ReplayBufferError(f"the buffer has {buf.n_actions} actions, this version has {N_ACTIONS}; train on a buffer of this action set.")
        data = BufferData(buf, episode_ids)
    tr = Trainer(cfg, data, out_dir if out_dir is not None else run_path(cfg, cfg.train.checkpoint_dir),
                 cfg.train.steps if steps is None else steps, init_checkpoint, callbacks, device)
    if resume: tr.try_resume()
    final = tr.fit(progress)
    return TrainResult(str(final), tr.step, tr.losses, tr.step*cfg.train.batch_size, time.perf_counter() - t0, str(tr.log_dir),
                       tr.resumed_from, len(data))

# %%
res = train(cfg0, bp, out_dir=tmp/'run1', progress=False)
L = [r['total'] for r in res.losses]
test_eq((res.steps, len(res.losses), res.samples), (40, 40, 40*32))
test_eq(np.mean(L[-5:]) < 0.8*np.mean(L[:5]), True)  # the loss falls
test_eq(all(r['policy_kl'] <= r['policy'] + 1e-6 for r in res.losses), True)
test_eq(sorted(p.name for p in (tmp/'run1').glob('*.pt')), ['final.pt', 'step_000010.pt', 'step_000020.pt', 'step_000030.pt', 'step_000040.pt', 'train_state.pt'])
res

# %% [markdown]
# The checkpoint reloads into the same network, with its provenance:

# %%
net, info = load_checkpoint(res.checkpoint, feature_dim=64, action_names=ACTION_NAMES, slm_fingerprint='f'*16)
b = data[np.arange(16)]
tr_net = Trainer(cfg0, data, tmp/'run1', 40); tr_net.try_resume()
with torch.no_grad():
    test_close(net(b['states'], b['masks'])[1], tr_net.net.eval()(b['states'], b['masks'])[1], eps=1e-6)
test_eq((info['extra']['step'], info['extra']['positions'], info['extra']['data_digest']), (40, 192, data.digest))
test_fail(lambda: load_checkpoint(res.checkpoint, slm_fingerprint='0'*16), contains='slm_fingerprint')
info['extra']

# %% [markdown]
# The loss curve:

# %%
#| export
def plot_losses(losses:list, ax=None, smooth:int=5):
    "Plot total, policy (cross-entropy and KL to the targets) and value loss per step (moving average over `smooth` steps)."
    import matplotlib.pyplot as plt
    if ax is None: _, ax = plt.subplots(figsize=(6, 2.8))
    steps = np.array([r['step'] for r in losses])
    k = max(1, min(smooth, len(losses)))
    for key in ('total', 'policy', 'policy_kl', 'value'):
        y = np.convolve([r[key] for r in losses], np.ones(k)/k, mode='valid')
        ax.plot(steps[k - 1:], y, label=key)
    ax.set_xlabel('step'); ax.set_ylabel('loss'); ax.legend(fontsize=8); ax.set_title('training loss')
    ax.figure.tight_layout()
    return ax

# %%
plot_losses(res.losses); plt.show()

# %% [markdown]
# TensorBoard got every step:

# %%
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(res.log_dir); ea.Reload()
test_eq(len(ea.Scalars('loss/total')), 40)
test_close(ea.Scalars('loss/total')[-1].value, L[-1], eps=1e-5)
sorted(ea.Tags()['scalars'])

# %% [markdown]
# ## Resuming after a crash gives identical results
# A callback kills the run right after the checkpoint of step 20 (an exception stands in for the crash). A new
# call on the same directory resumes from step 20 and must end with exactly the weights of an uninterrupted
# 40-step run: optimiser moments, schedule position, dropout RNG (dropout is on here) and data order are all
# restored. Both bodies are checked.

# %%
class Crash(TrainCallback):
    order = 100
    def __init__(self, at): self.at = at
    def after_step(self, tr, rec):
        if rec['step'] == self.at: raise KeyboardInterrupt(f"simulated crash at step {self.at}")

def weights(path): return load_checkpoint(path)[0].state_dict()

for body in ('mlp', 'recursive'):
    c = replace_config(cfg0, [f'network.body={body}', 'network.recursive_steps=3'])
    straight = train(c, bp, out_dir=tmp/f'{body}-straight', progress=False)
    try: train(c, bp, out_dir=tmp/f'{body}-crash', progress=False, callbacks=[Crash(20)])
    except KeyboardInterrupt: pass
    shutil.copytree(tmp/f'{body}-crash', tmp/f'{body}-norng')
    resumed = train(c, bp, out_dir=tmp/f'{body}-crash', progress=False)
    test_eq(resumed.resumed_from, 20)
    wa, wb = weights(straight.checkpoint), weights(resumed.checkpoint)
    test_eq(all(torch.equal(wa[k], wb[k]) for k in wa), True)
    test_eq([r['total'] for r in resumed.losses], [r['total'] for r in straight.losses])
    # the check can fail: resuming without the saved RNG state draws other dropout masks, hence other weights
    tr = Trainer(c, data, tmp/f'{body}-norng', 40); tr.try_resume(); torch.manual_seed(999)
    wc = load_checkpoint(tr.fit(progress=False))[0].state_dict()
    test_eq(all(torch.equal(wa[k], wc[k]) for k in wa), False)
print(straight, resumed)

# %% [markdown]
# A state written by another run (here: other steps) is not resumed:

# %%
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    other = train(cfg0, bp, out_dir=tmp/'run1', steps=30, progress=False)
test_eq((other.resumed_from, other.steps), (0, 30))
test_eq(any('another run' in str(x.message) for x in w), True)
other

# %% [markdown]
# Training on selected episodes only, and the errors for what cannot work:

# %%
part = train(cfg0, bp, out_dir=tmp/'part', steps=5, progress=False, episode_ids=['ep1', 'ep2'])
test_eq(part.positions, 16)
try:
    import wandb; has_wandb = True
except ImportError: has_wandb = False
if not has_wandb:
    test_fail(lambda: train(replace_config(cfg0, ['train.wandb=true']), bp, out_dir=tmp/'wb', steps=2, progress=False), contains='pip install')
test_fail(lambda: train(cfg0, tmp/'nothing', out_dir=tmp/'x', progress=False), contains='run self-play first')
part, has_wandb

# %% [markdown]
# ## Mixed precision on CUDA
# With `train.amp = true` and a GPU the loss runs under float16 autocast with a gradient scaler; without CUDA
# the flag is ignored with a warning. (Skipped unless `nbdev-test --flags cuda`.)

# %%
#| cuda
amp = train(replace_config(cfg0, ['train.amp=true']), bp, out_dir=tmp/'amp', progress=False, device='cuda')
La = [r['total'] for r in amp.losses]
test_eq(all(math.isfinite(x) for x in La), True)
test_eq(np.mean(La[-5:]) < 0.8*np.mean(La[:5]), True)
amp

# %%
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    train(replace_config(cfg0, ['train.amp=true']), bp, out_dir=tmp/'amp-cpu', steps=2, progress=False, device='cpu')
test_eq(any('train.amp=true has no effect' in str(x.message) for x in w), True)

# %% [markdown]
# ## Smoke run on the default SLM
# The whole loop at small budgets on SmolLM2-135M-Instruct: self-play with the default reward
# (`RewardCalculator`: fluency, judge, task score, penalties) into a fresh buffer, then training on it. It
# finishes in minutes on two CPU cores; the loss falls, the checkpoint is written and reloads, and the trained
# network drives a `PolicyController`. (A `slow` cell: `nbdev-test --flags slow`.)

# %%
#| slow
from research_controller.slm import load_slm
from research_controller.engine import Engine
from research_controller.selfplay import run_selfplay, load_controller
torch.set_num_threads(2)
cfg_s = load_config(overrides=[f'paths.runs_dir={tmp}/smoke', 'selfplay.episodes=4', 'selfplay.max_new_tokens=24', 'mcts.n_sims=6',
                               'train.steps=80', 'train.batch_size=32', 'train.warmup_steps=5', 'train.checkpoint_every=20',
                               'train.lr=0.003'])
model, tok = load_slm(cfg_s)
eng_s = Engine(model, tok, cfg_s)
sp = run_selfplay(cfg_s, engine=eng_s)
test_eq((sp.episodes, sp.controller_version), (4, 'uniform'))
sp

# %% [markdown]
# Training on those positions; the loss falls and the checkpoint reloads for this SLM:

# %%
#| slow
tres = train(cfg_s)
Ls, Lk = [r['total'] for r in tres.losses], [r['policy_kl'] for r in tres.losses]
test_eq(np.mean(Ls[-10:]) < np.mean(Ls[:10]), True)  # the loss falls
net_s, info_s = load_checkpoint(tres.checkpoint, feature_dim=eng_s.feature_dim, action_names=ACTION_NAMES, slm_fingerprint=eng_s.fingerprint)
print(f"self-play: {sp} in {sp.seconds:.0f} s; training: {tres} in {tres.seconds:.0f} s")
print(f"loss {np.mean(Ls[:10]):.3f} -> {np.mean(Ls[-10:]):.3f}, policy KL {np.mean(Lk[:10]):.3f} -> {np.mean(Lk[-10:]):.3f}")
plot_losses(tres.losses); plt.show()

# %% [markdown]
# The trained network drives a `PolicyController` on the default SLM:

# %%
#| slow
ctrl = load_controller(tres.checkpoint, cfg_s)
g = ctrl.generate(eng_s, "Name three rivers in Europe.", max_new_tokens=32)
test_eq(g.tokens <= 32, True)
g.text, [e['action'] for e in g.macro_trace]
