# %%
#| default_exp network

# %% [markdown]
# # Policy+value network
# > The controller's brain: a shared body (MLP, or a tiny recursive block with adaptive halting), a policy head over the macro-actions and a value head in [-1, 1].

# %%
#| export
from __future__ import annotations
import math
from pathlib import Path
from typing import Callable, Sequence
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from fastcore.basics import patch
from research_controller.config import (Config, ConfigError, NetworkConfig, TrainConfig, atomic_write, config_hash,
                                        config_to_dict, replace_config)

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from research_controller.config import load_config
import tempfile, time
torch.set_num_threads(1)  # the test machine's cores are shared

# %% [markdown]
# The input is the state vector the engine reads from the SLM at a decision point (582 numbers for
# SmolLM2-135M: 576 hidden-state values and 6 scalar features). Its parts live on very different scales, so
# the network starts with a LayerNorm. Illegal actions get the lowest logit, hence probability 0.
#
# ## Bodies
# `MLPBody` is the plain choice: `layers` blocks of Linear, GELU and dropout.

# %%
#| export
class MLPBody(nn.Module):
    "Plain MLP body: `layers` x (Linear, GELU, Dropout)."
    def __init__(self, in_dim:int, hidden:int, layers:int, dropout:float=0.0):
        super().__init__()
        mods, d = [], in_dim
        for _ in range(layers): mods += [nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout)]; d = hidden
        self.net = nn.Sequential(*mods)
    def forward(self, x): return self.net(x)

# %% [markdown]
# `RecursiveBody` is the small recursive alternative in the spirit of TRM/HRM: the input is embedded once
# as $e$, and ONE tiny residual block is applied again and again, $z_{t+1} = z_t + f(\mathrm{LN}(z_t) + e)$,
# re-injecting the input at every step. The same few weights buy as much depth as a decision needs. After each
# step a halting head gives $\lambda_t = \sigma(w^\top z_t + b)$, the probability of stopping there.

# %%
#| export
class RecursiveBody(nn.Module):
    "Tiny residual block applied up to `steps` times with the input re-injected; a halting head scores each step."
    def __init__(self, in_dim:int, hidden:int, layers:int, dropout:float=0.0, steps:int=6):
        super().__init__()
        self.embed, self.norm = nn.Linear(in_dim, hidden), nn.LayerNorm(hidden)
        mods = []
        for i in range(layers): mods += [nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout)]
        mods[-2] = nn.Identity()  # the block ends linear, so the residual update can take any sign
        self.block = nn.Sequential(*mods)
        self.halt = nn.Linear(hidden, 1)
        nn.init.zeros_(self.halt.weight)
        nn.init.constant_(self.halt.bias, -math.log(max(steps - 1, 1)))  # start at lambda = 1/steps: every step keeps some mass
        self.steps = steps
    def step(self, z, e):
        z = z + self.block(self.norm(z) + e)
        return z, torch.sigmoid(self.halt(z)).squeeze(-1)

# %% [markdown]
# ## Halting, deep supervision and the ponder cost
# Over the steps, the halting probabilities define a distribution over *where* the recursion stops
# (PonderNet's formulation, truncated at `recursive_steps`, whose last step takes the remaining mass):
# $p_t = \lambda_t \prod_{j<t}(1 - \lambda_j)$. At inference the recursion stops at the first step whose
# cumulative halting probability reaches `halt_threshold` (ACT's rule) and the heads read that step; a batch
# stops computing once all its rows have halted.
#
# **Training (my choice, and why).** The heads read *every* step, and the task loss is the expected loss
# under the halting distribution, mixed with an even share over all steps:
# $L = \sum_t w_t L_t$ with $w_t = (1 - \beta)\,p_t + \beta / T$, $\beta$ = `deep_supervision`.
# - Every step gets a direct loss (deep supervision), so the output at whichever step the recursion halts
#   on is itself a trained prediction: halting early at inference is safe, and gradients reach the shared
#   block at every depth without flowing only through the last step.
# - The halting head learns where to stop through the same sum: moving mass $p_t$ towards steps whose loss is
#   lower lowers $L$ (PonderNet). ACT's alternative (one loss on a $p$-weighted mixture of states) gives
#   the halting head only an indirect signal and leaves intermediate steps untrained.
# - The $\beta/T$ share keeps steps the halting distribution currently ignores from going stale.
# - The ponder cost is the expected number of steps $\sum_t t\,p_t$, weighted by `ponder_cost`: it pushes
#   towards stopping earlier unless later steps pay for themselves in loss.

# %%
#| export
class PolicyValueNet(nn.Module):
    "Policy+value network over macro-actions: LayerNorm, shared body (mlp | recursive), policy and value heads."
    def __init__(self,
                 in_dim:int, # state-vector size (582 for SmolLM2-135M)
                 n_actions:int, # number of macro-actions
                 cfg:NetworkConfig|None=None, # the `network` config section
                ):
        super().__init__()
        cfg = cfg or NetworkConfig()
        self.in_dim, self.n_actions, self.cfg = int(in_dim), int(n_actions), cfg
        self.norm = nn.LayerNorm(self.in_dim)
        if cfg.body == 'mlp': self.body = MLPBody(self.in_dim, cfg.hidden, cfg.layers, cfg.dropout)
        elif cfg.body == 'recursive': self.body = RecursiveBody(self.in_dim, cfg.hidden, cfg.layers, cfg.dropout, cfg.recursive_steps)
        else: raise ConfigError(f"network.body = {cfg.body!r} is not one of ['mlp', 'recursive'].")
        self.policy_head, self.value_head = nn.Linear(cfg.hidden, n_actions), nn.Linear(cfg.hidden, 1)

    def heads(self, h, mask=None):
        "Masked policy logits and tanh value from body features `h`."
        logits = self.policy_head(h)
        if mask is not None: logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        return logits, torch.tanh(self.value_head(h)).squeeze(-1)

    def extra_repr(self): return f"in_dim={self.in_dim}, n_actions={self.n_actions}, body={self.cfg.body!r}"

# %% [markdown]
# `forward(x, mask)` returns `(logits, value, aux)`. For the recursive body, `aux` holds the per-step logits,
# values and halting distribution (used by the loss), the step each row halted on, and the expected number of
# steps. `all_steps` (default: in training mode) runs every step; otherwise the batch exits early.

# %%
#| export
@patch
def forward(self:PolicyValueNet,
            x:torch.Tensor, # [B, in_dim] state vectors
            mask:torch.Tensor|None=None, # [B, n_actions] bool, True = legal
            all_steps:bool|None=None, # recursive body: run every step (default: when training)
           ):
    "Policy logits [B,A] (illegal = lowest value), value [B] in [-1, 1], aux dict."
    if x.ndim != 2 or x.shape[1] != self.in_dim:
        raise ValueError(f"expected features of shape [B, {self.in_dim}], got {tuple(x.shape)}; this network was built for feature_dim={self.in_dim}.")
    if mask is not None:
        mask = mask.bool()
        if mask.shape != (x.shape[0], self.n_actions): raise ValueError(f"mask must have shape [B, {self.n_actions}], got {tuple(mask.shape)}.")
        if not mask.any(-1).all(): raise ValueError("a mask row allows no action; terminal states must not be evaluated.")
    x = self.norm(x)
    B = x.shape[0]
    if self.cfg.body == 'mlp':
        logits, v = self.heads(self.body(x), mask)
        return logits, v, dict(halt_step=torch.ones(B, dtype=torch.long, device=x.device))
    all_steps = self.training if all_steps is None else all_steps
    T, thr = self.cfg.recursive_steps, self.cfg.halt_threshold
    e = self.body.embed(x); z = e
    alive = torch.ones(B, device=x.device, dtype=x.dtype)  # prod_{j<t} (1 - lambda_j)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    halt_step = torch.full((B,), T, dtype=torch.long, device=x.device)
    out_l = out_v = None
    step_l, step_v, ps = [], [], []
    for t in range(T):
        z, lam = self.body.step(z, e)
        if t == T - 1: lam = torch.ones_like(lam)  # the last step takes the remaining mass
        l_t, v_t = self.heads(z, mask)
        p_t = alive*lam
        alive = alive*(1 - lam)
        newly = ~done & (1 - alive >= thr)
        out_l = l_t if out_l is None else torch.where(newly[:, None], l_t, out_l)
        out_v = v_t if out_v is None else torch.where(newly, v_t, out_v)
        halt_step = torch.where(newly, torch.full_like(halt_step, t + 1), halt_step)
        done = done | newly
        step_l.append(l_t); step_v.append(v_t); ps.append(p_t)
        if not all_steps and bool(done.all()): break
    p = torch.stack(ps)
    steps = torch.arange(1, len(ps) + 1, device=x.device, dtype=p.dtype)[:, None]
    return out_l, out_v, dict(step_logits=torch.stack(step_l), step_values=torch.stack(step_v), halt_p=p,
                              halt_step=halt_step, expected_steps=(p*steps).sum(0))

# %%
cfg = load_config()
torch.manual_seed(0)
x, m = torch.randn(4, 582), torch.ones(4, 5, dtype=torch.bool)
m[0, 2:] = False
mlp = PolicyValueNet(582, 5, cfg.network)
logits, v, aux = mlp(x, m)
test_eq((logits.shape, v.shape), ((4, 5), (4,)))
test_eq(torch.softmax(logits, -1)[0, 2:].sum().item(), 0.0)
test_eq(bool((v.abs() <= 1).all()), True)
test_fail(lambda: mlp(torch.randn(4, 100), m), contains='feature_dim=582')
test_fail(lambda: mlp(x, torch.zeros(4, 5, dtype=torch.bool)), contains='allows no action')
mlp

# %%
rec = PolicyValueNet(582, 5, replace_config(cfg, ['network.body=recursive']).network)
logits, v, aux = rec(x, m, all_steps=True)
test_eq((aux['step_logits'].shape, aux['halt_p'].shape), ((6, 4, 5), (6, 4)))
test_close(aux['halt_p'].sum(0), torch.ones(4))  # a distribution over the stopping step
lam = 1/6  # initial halting head: lambda = 1/steps everywhere, so p_t = lam (1 - lam)^(t-1), the last step takes the rest
test_close(aux['halt_p'][:, 0], torch.tensor([lam*(1 - lam)**t for t in range(5)] + [(1 - lam)**5]), eps=1e-5)
aux['halt_step'], aux['expected_steps'].detach()

# %% [markdown]
# A halting head that has learned to stop early makes inference cheaper: the batch leaves the loop as soon as
# every row's cumulative halting probability reaches the threshold.

# %%
rec.eval()
with torch.no_grad(): rec.body.halt.bias.fill_(6.0)  # lambda ~ 0.998: halt at once
_, _, a = rec(x, m)
test_eq((a['step_logits'].shape[0], a['halt_step'].tolist()), (1, [1, 1, 1, 1]))
with torch.no_grad(): nn.init.normal_(rec.body.halt.weight, std=0.3); rec.body.halt.bias.fill_(2.0)  # rows halt at different steps
xs = torch.randn(64, 582); ms = torch.ones(64, 5, dtype=torch.bool)
l_all, v_all, a_all = rec(xs, ms, all_steps=True)
l_ex, v_ex, a_ex = rec(xs, ms)  # early exit: same answer as running every step
test_close(l_ex, l_all, eps=1e-5); test_close(v_ex, v_all, eps=1e-6)
test_eq(a_ex['halt_step'].tolist(), a_all['halt_step'].tolist())
test_eq(len(set(a_all['halt_step'].tolist())) > 1 and a_ex['step_logits'].shape[0] == a_all['halt_step'].max().item(), True)
rec = PolicyValueNet(582, 5, replace_config(cfg, ['network.body=recursive']).network)  # back to a fresh one
torch.bincount(a_all['halt_step'], minlength=7)[1:]

# %% [markdown]
# ## Loss
# `loss(net, batch)` is policy cross-entropy to the visit-count distribution, plus `value_weight` times
# the value MSE, plus `l2` times the squared norm of the weight matrices (leave it 0 when the optimiser
# already decays weights, as AdamW does with `train.weight_decay`), plus, for the recursive body, the ponder
# cost. A batch is a dict as `ReplayBuffer.sample` returns it (numpy or torch).

# %%
#| export
def _to_torch(batch:dict, device) -> tuple:
    t = lambda k, dt: torch.as_tensor(np.asarray(batch[k]) if not torch.is_tensor(batch[k]) else batch[k], device=device).to(dt)
    return t('states', torch.float32), t('masks', torch.bool), t('policies', torch.float32), t('values', torch.float32)

def _ce(logits, mask, target):
    "Cross-entropy of masked `logits` to distribution `target` (0 on illegal actions), per row."
    logp = F.log_softmax(logits.float(), -1)
    return -torch.where(mask, target*logp, torch.zeros_like(logp)).sum(-1)

def loss(net:PolicyValueNet,
         batch:dict, # states [B,D], masks [B,A], policies [B,A], values [B]
         value_weight:float=1.0, # weight of the value MSE (train.value_weight)
         l2:float=0.0, # explicit L2 on weight matrices; 0 when the optimiser decays weights
        ) -> tuple:
    "Training loss and a dict of its parts (floats)."
    dev = next(net.parameters()).device
    x, m, pi, z = _to_torch(batch, dev)
    logits, v, aux = net(x, m, all_steps=True)
    if 'halt_p' in aux:
        T = aux['halt_p'].shape[0]
        w = (1 - net.cfg.deep_supervision)*aux['halt_p'] + net.cfg.deep_supervision/T  # [T, B]
        ce = _ce(aux['step_logits'], m.expand(T, *m.shape), pi.expand(T, *pi.shape))  # [T, B]
        pol, val = (w*ce).sum(0).mean(), (w*(aux['step_values'] - z)**2).sum(0).mean()
        ponder = aux['expected_steps'].mean()
    else:
        pol, val, ponder = _ce(logits, m, pi).mean(), ((v - z)**2).mean(), torch.zeros((), device=dev)
    sq = sum((p**2).sum() for p in net.parameters() if p.ndim >= 2) if l2 else torch.zeros((), device=dev)
    total = pol + value_weight*val + net.cfg.ponder_cost*ponder + l2*sq
    f = lambda t: float(t.detach())
    parts = dict(total=f(total), policy=f(pol), value=f(val), ponder=f(ponder), l2=f(l2*sq), steps=f(aux['halt_step'].float().mean()))
    return total, parts

# %% [markdown]
# A synthetic teacher checks that the loss can fall: targets are a fixed random function of the input
# (masked softmax policy, tanh value), with random legal masks.

# %%
#| export
def synthetic_batch(n:int, dim:int=582, n_actions:int=5, seed:int=0, teacher_seed:int=1234) -> dict:
    "A batch whose targets are a fixed random function of the features (for tests and benchmarks)."
    rng, t = np.random.default_rng(seed), np.random.default_rng(teacher_seed)
    Wp, wv = t.normal(size=(dim, n_actions))/math.sqrt(dim)*3, t.normal(size=dim)/math.sqrt(dim)*2
    x = rng.normal(size=(n, dim)).astype(np.float32)
    m = rng.random((n, n_actions)) < 0.8; m[np.arange(n), rng.integers(0, n_actions, n)] = True
    lg = np.where(m, x @ Wp, -np.inf); p = np.exp(lg - lg.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    return dict(states=x, masks=m, policies=p.astype(np.float32), values=np.tanh(x @ wv).astype(np.float32))

# %%
b = synthetic_batch(8)
total, parts = loss(mlp.train(), b)
test_eq(set(parts), {'total', 'policy', 'value', 'ponder', 'l2', 'steps'})
test_close(parts['total'], parts['policy'] + parts['value'], eps=1e-5)
rec.train()
t2, p2 = loss(rec, b, l2=1e-4)
test_close(p2['total'], p2['policy'] + p2['value'] + 0.01*p2['ponder'] + p2['l2'], eps=1e-4)
test_eq(p2['ponder'] > 1, True)
total.backward()
parts, p2

# %% [markdown]
# ## A few optimiser steps
# The full training loop (data loading from the buffer, schedule, TensorBoard, checkpoints) is the `train`
# notebook's job. `fit_steps` is the minimal loop: AdamW with `train.lr`, `train.weight_decay`,
# `train.grad_clip` and `train.value_weight`, constant learning rate.

# %%
#| export
def fit_steps(net:PolicyValueNet,
              batch_fn:Callable, # step -> batch dict
              steps:int, # optimiser steps
              cfg:TrainConfig|None=None, # the `train` section (lr, weight_decay, grad_clip, value_weight)
              progress:bool=False, # show a tqdm bar
             ) -> list:
    "Run `steps` AdamW steps on `batch_fn(step)` batches; returns the loss parts of every step."
    cfg = cfg or TrainConfig()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net.train(); hist = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc='fit')
    for s in it:
        total, parts = loss(net, batch_fn(s), value_weight=cfg.value_weight)
        opt.zero_grad(set_to_none=True); total.backward()
        if cfg.grad_clip: torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step(); hist.append(parts)
    return hist

# %% [markdown]
# Both bodies learn the synthetic teacher: the loss on a held-out batch falls well below its start. This
# teacher is a linear function of the input, so one step of the recursive block is enough, and the halting
# head learns that: the recursion that started at 6 steps ends up stopping after about one.

# %%
def held_out(net, b):
    net.eval()
    with torch.no_grad(): return loss(net, b)[1]

train_cfg = replace_config(cfg, ['train.lr=0.003']).train
test_b, curves = synthetic_batch(512, seed=99), {}
for body in ('mlp', 'recursive'):
    torch.manual_seed(0)
    net = PolicyValueNet(582, 5, replace_config(cfg, [f'network.body={body}', 'network.hidden=128']).network)
    before = held_out(net, test_b)
    hist = fit_steps(net, lambda s: synthetic_batch(64, seed=s), 100, train_cfg)
    after = held_out(net, test_b)
    curves[body] = [h['total'] for h in hist]
    test_eq(after['policy'] < 0.8*before['policy'] and after['value'] < 0.8*before['value'], True)
    if body == 'recursive': test_eq(after['steps'] < 3, True)
    print(f"{body:9}: policy {before['policy']:.3f} -> {after['policy']:.3f}, value {before['value']:.3f} -> {after['value']:.3f}, steps {after['steps']:.2f}")

# %%
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(5, 2.5))
for k, c in curves.items(): ax.plot(c, label=k)
ax.set_xlabel('optimiser step'); ax.set_ylabel('training loss'); ax.legend(); ax.set_title('synthetic teacher')
plt.show()

# %% [markdown]
# ## The evaluator for MCTS
# `make_evaluator(net)` adapts the network to the search's evaluator contract: numpy features and masks in,
# numpy priors (softmax of the masked logits) and values out, in eval mode without gradients.

# %%
#| export
def make_evaluator(net:PolicyValueNet, device:str|torch.device|None=None) -> Callable:
    "MCTS evaluator `(features[B,D], masks[B,A]) -> (priors[B,A], values[B])` backed by `net`."
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    def evaluate(features, masks):
        x = torch.as_tensor(np.asarray(features, np.float32), device=dev)
        m = torch.as_tensor(np.asarray(masks, bool), device=dev)
        was = net.training; net.eval()
        try:
            with torch.inference_mode(): logits, v, _ = net(x, m)
        finally: net.train(was)
        return torch.softmax(logits.float(), -1).cpu().numpy(), v.float().cpu().numpy()
    return evaluate

# %%
from research_controller.mcts import MCTS, TreeEnv
ev = make_evaluator(net.train())
pri, val = ev(test_b['states'][:3], test_b['masks'][:3])
test_close(pri.sum(1), np.ones(3), eps=1e-5)
test_eq(bool((pri[~test_b['masks'][:3]] == 0).all()), True)
test_eq(net.training, True)  # the evaluator leaves the training mode as it found it
env = TreeEnv.random(5, 3, seed=0)
small = PolicyValueNet(env.dim, 5, cfg.network)
MCTS(env, make_evaluator(small)).search(env.root(), n_sims=16)

# %% [markdown]
# ## Checkpoints
# A checkpoint records what the weights mean: the network config, the feature dimension, the action names in
# order, the SLM fingerprint, and optionally the whole config. It is written atomically (temp file, then
# rename). Loading checks it against what the caller has and fails with an error naming the field and the fix;
# a truncated or corrupt file is an error too, never half-loaded weights.

# %%
#| export
class CheckpointError(ValueError):
    "A checkpoint that cannot be used here; the message names the field and the fix."

CKPT_FORMAT = 'research_controller.policy_value/1'

def save_checkpoint(net:PolicyValueNet,
                    path:str|Path, # file to write (parent directories are created)
                    slm_fingerprint:str, # `model_fingerprint(model)` of the SLM the features came from
                    action_names:Sequence[str], # names of the actions, in index order
                    config:Config|None=None, # the whole config, recorded for provenance
                    extra:dict|None=None, # anything else (step, metrics); plain types only
                   ) -> Path:
    "Write `net` with everything needed to check it on load; atomic."
    if len(action_names) != net.n_actions: raise CheckpointError(f"{len(action_names)} action names given for a network with {net.n_actions} actions.")
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    blob = dict(format=CKPT_FORMAT, state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()},
                in_dim=net.in_dim, n_actions=net.n_actions, action_names=[str(a) for a in action_names],
                network=config_to_dict(net.cfg), slm_fingerprint=str(slm_fingerprint),
                config=config_to_dict(config) if config is not None else None,
                config_hash=config_hash(config) if config is not None else None, extra=extra or {},
                torch_version=str(torch.__version__))
    return atomic_write(path, lambda t: torch.save(blob, t))

# %%
#| export
def load_checkpoint(path:str|Path,
                    feature_dim:int|None=None, # the engine's feature dimension; None = do not check
                    action_names:Sequence[str]|None=None, # the engine's action names in order; None = do not check
                    slm_fingerprint:str|None=None, # the loaded SLM's fingerprint; None = do not check
                    map_location:str|torch.device='cpu',
                   ) -> tuple:
    "Load a checkpoint as `(net, info)`, checking it matches the features, actions and SLM it will be used with."
    path = Path(path)
    if not path.exists(): raise CheckpointError(f"no checkpoint at {str(path)!r}; train one or check the path.")
    try: blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint (truncated or corrupt: {type(e).__name__}: {str(e)[:200]}); "
                              "re-save it or load another file.") from None
    if not isinstance(blob, dict) or blob.get('format') != CKPT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a {CKPT_FORMAT} checkpoint; save networks with save_checkpoint.")
    if feature_dim is not None and blob['in_dim'] != feature_dim:
        raise CheckpointError(f"checkpoint {str(path)!r} was trained on feature_dim={blob['in_dim']}, but the engine gives feature_dim={feature_dim}. "
                              "Load a checkpoint made with this SLM and feature set, or train a new controller for it.")
    if action_names is not None and list(blob['action_names']) != list(action_names):
        raise CheckpointError(f"checkpoint {str(path)!r} was trained for action_names={blob['action_names']}, but the engine has "
                              f"action_names={list(action_names)}. The policy head's outputs would mean other actions: train a new controller for this action set.")
    if slm_fingerprint is not None and blob['slm_fingerprint'] != slm_fingerprint:
        raise CheckpointError(f"checkpoint {str(path)!r} was trained with slm_fingerprint={blob['slm_fingerprint']!r}, but the loaded SLM has "
                              f"slm_fingerprint={slm_fingerprint!r}. Load the SLM it was trained with (slm.source), or train a new controller.")
    try: ncfg = replace_config(Config(), {f'network.{k}': v for k, v in blob['network'].items()}).network
    except ConfigError as e: raise CheckpointError(f"checkpoint {str(path)!r} has a network config this version cannot read: {e}") from None
    net = PolicyValueNet(blob['in_dim'], blob['n_actions'], ncfg)
    try: net.load_state_dict(blob['state_dict'])
    except RuntimeError as e: raise CheckpointError(f"checkpoint {str(path)!r} weights do not fit its recorded network config ({str(e)[:200]}); the file is corrupt.") from None
    net.to(map_location).eval()
    info = {k: blob[k] for k in ('in_dim', 'n_actions', 'action_names', 'slm_fingerprint', 'network', 'config', 'config_hash', 'extra', 'torch_version')}
    return net, info

# %%
names = ['CONTINUE', 'THINK_BEGIN', 'THINK_END', 'RESAMPLE', 'STOP']
tmp = Path(tempfile.mkdtemp())
for body in ('mlp', 'recursive'):
    n0 = PolicyValueNet(582, 5, replace_config(cfg, [f'network.body={body}', 'network.hidden=64']).network).eval()
    p = save_checkpoint(n0, tmp/f'{body}.pt', 'abcdef0123456789', names, config=cfg, extra={'step': 7})
    n1, info = load_checkpoint(p, feature_dim=582, action_names=names, slm_fingerprint='abcdef0123456789')
    with torch.no_grad(): test_close(n1(x, m)[0][m], n0(x, m)[0][m], eps=1e-6)
    test_eq((n1.cfg, info['extra'], info['config_hash']), (n0.cfg, {'step': 7}, config_hash(cfg)))
test_eq(sorted(f.name for f in tmp.iterdir()), ['mlp.pt', 'recursive.pt'])  # no temp files left behind
info['network']

# %% [markdown]
# Mismatches and damage are clear errors:

# %%
test_fail(lambda: load_checkpoint(tmp/'mlp.pt', feature_dim=100), contains='feature_dim=582, but the engine gives feature_dim=100')
test_fail(lambda: load_checkpoint(tmp/'mlp.pt', action_names=names[:4]), contains='action_names')
test_fail(lambda: load_checkpoint(tmp/'mlp.pt', slm_fingerprint='ffffffffffffffff'), contains='slm_fingerprint')
test_fail(lambda: load_checkpoint(tmp/'nope.pt'), contains='no checkpoint')
data = (tmp/'mlp.pt').read_bytes()
(tmp/'cut.pt').write_bytes(data[:len(data)//2])
test_fail(lambda: load_checkpoint(tmp/'cut.pt'), contains='truncated or corrupt')
(tmp/'junk.pt').write_bytes(b'not a checkpoint')
test_fail(lambda: load_checkpoint(tmp/'junk.pt'), contains='truncated or corrupt')
torch.save({'format': 'something else'}, tmp/'other.pt')
test_fail(lambda: load_checkpoint(tmp/'other.pt'), contains='not a research_controller.policy_value/1')
for bad in (dict(feature_dim=100), dict(action_names=names[::-1]), dict(slm_fingerprint='0'*16)):
    try: load_checkpoint(tmp/'mlp.pt', **bad)
    except CheckpointError as e: print(str(e).replace(str(tmp), '<tmp>'))

# %%
import shutil; shutil.rmtree(tmp)

# %% [markdown]
# ## Throughput
# Training samples per second of both bodies at the default size (`benchmarks/mcts_throughput.py` reports
# them with more repetitions). The cell is `slow`.

# %%
#| slow
def train_rate(body, bs=128, steps=20):
    net = PolicyValueNet(582, 5, replace_config(cfg, [f'network.body={body}']).network)
    b = synthetic_batch(bs)
    fit_steps(net, lambda s: b, 3)
    t = time.perf_counter(); fit_steps(net, lambda s: b, steps)
    return bs*steps/(time.perf_counter() - t)

for body in ('mlp', 'recursive'): print(f"{body:9}: {train_rate(body):,.0f} samples/s")
