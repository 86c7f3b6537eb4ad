# %%
#| default_exp mcts

# %% [markdown]
# # MCTS
# > PUCT search over macro-actions: network priors, value-head leaves, batched leaf evaluation with virtual loss, subtree reuse and anytime stopping.

# %%
#| export
from __future__ import annotations
import json, math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
import numpy as np
from fastcore.basics import patch
from research_controller.config import MCTSConfig

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from research_controller.config import load_config, replace_config
import time

# %% [markdown]
# The search is AlphaZero's, for one player with rewards only at the end: every node stores, per
# macro-action $a$, the visit count $N(a)$, the sum of backed-up values $W(a)$ and the prior $P(a)$
# from the policy head. A simulation walks down from the root choosing
# $\arg\max_a Q(a) + c_{puct} P(a) \frac{\sqrt{1 + \sum_b N(b)}}{1 + N(a)}$ over legal actions, creates one
# new child with `env.expand`, scores it with the value head (or with the reward if it is terminal)
# and adds that value to every edge on the way back. There are no random rollouts.
#
# The search never touches the SLM itself; it talks to an **environment**:
#
# | method | returns |
# |---|---|
# | `legal_mask(s)` | `np.bool_[A]` |
# | `expand(parents, actions)` | new child states, one per (parent, action); parents are left untouched. Batched: the engine adapter runs ONE SLM forward per token for all of them |
# | `is_terminal(s)` | bool |
# | `terminal_value(s)` | reward in [-1, 1] |
# | `features(s)` | `np.float32[D]` |
# | `tokens_spent(s)` | SLM tokens generated since the episode began |
#
# and to an **evaluator** `evaluator(features[B, D], masks[B, A]) -> (priors[B, A], values[B])`
# (`research_controller.network.make_evaluator(net)` wraps the policy+value network).
# Before the SLM is wired in, everything here is checked on toy environments whose answers are known.

# %% [markdown]
# ## Toy environments
# `TreeEnv` is a deterministic tree: a state is the tuple of actions taken, leaves at `depth` carry known
# rewards, and `optimal_value` gives the exact value of every state, so the search can be checked
# against the truth.

# %%
#| export
class TreeEnv:
    "Deterministic toy tree: states are action tuples, leaves at depth `rewards.ndim` carry the known rewards."
    def __init__(self,
                 rewards, # array of shape [A]*depth: the reward of each leaf, in [-1, 1]
                 legal_fn:Callable|None=None, # path -> bool mask of the legal actions there; None = all legal
                 tokens_per_step:int=1, # tokens one expansion "spends"
                ):
        self.rewards = np.asarray(rewards, dtype=np.float64)
        self.depth, self.n_actions = self.rewards.ndim, self.rewards.shape[0]
        if self.rewards.shape != (self.n_actions,)*self.depth:
            raise ValueError(f"rewards must have shape [A]*depth, got {self.rewards.shape}")
        if np.abs(self.rewards).max() > 1: raise ValueError("rewards must lie in [-1, 1]")
        self.legal_fn, self.tokens_per_step = legal_fn, tokens_per_step
        self.dim = self.depth*self.n_actions + 1
        self.expand_calls = self.expanded = 0
        self._vstar = {}

    @classmethod
    def random(cls, branching:int, depth:int, seed:int=0, **kw):
        "A tree with uniform random rewards in [-1, 1]."
        return cls(np.random.default_rng(seed).uniform(-1, 1, (branching,)*depth), **kw)

    def root(self): return ()
    def legal_mask(self, s):
        return np.ones(self.n_actions, bool) if self.legal_fn is None else np.asarray(self.legal_fn(s), bool)
    def is_terminal(self, s): return len(s) == self.depth
    def terminal_value(self, s): return float(self.rewards[s])
    def tokens_spent(self, s): return len(s)*self.tokens_per_step
    def features(self, s):
        f = np.zeros(self.dim, np.float32)
        for i, a in enumerate(s): f[i*self.n_actions + a] = 1
        f[-1] = len(s)/self.depth
        return f
    def path_of(self, f):
        "Invert `features`: the action tuple a feature vector encodes."
        n = round(float(f[-1])*self.depth)
        return tuple(int(np.argmax(f[i*self.n_actions:(i+1)*self.n_actions])) for i in range(n))
    def expand(self, parents, actions):
        self.expand_calls += 1; self.expanded += len(parents)
        out = []
        for s, a in zip(parents, actions):
            if self.is_terminal(s): raise ValueError(f"expand called on terminal state {s}")
            if not self.legal_mask(s)[a]: raise ValueError(f"expand called with illegal action {a} at {s}")
            out.append(s + (int(a),))
        return out
    def optimal_value(self, s):
        "Exact value of `s` under optimal play."
        if self.is_terminal(s): return self.terminal_value(s)
        if s not in self._vstar:
            m = self.legal_mask(s)
            self._vstar[s] = max(self.optimal_value(s + (a,)) for a in range(self.n_actions) if m[a])
        return self._vstar[s]
    def best_actions(self, s):
        "The legal actions that reach the optimal value from `s`."
        m = self.legal_mask(s)
        v = {a: self.optimal_value(s + (a,)) for a in range(self.n_actions) if m[a]}
        return sorted(a for a in v if np.isclose(v[a], max(v.values())))
    def __repr__(self): return f"TreeEnv(branching={self.n_actions}, depth={self.depth})"

# %% [markdown]
# The small tree of the issue: branching 2, depth 3. The left subtree is safe (mean 0.24), the right one
# holds the single best leaf (0.9) among three losses, so a search that only follows averages is trapped.

# %%
trap = TreeEnv(np.array([0.2, 0.3, 0.25, 0.2, -1, -1, -1, 0.9]).reshape(2, 2, 2))
test_eq(trap.optimal_value(()), 0.9)
test_eq(trap.best_actions(()), [1])
test_eq(trap.path_of(trap.features((1, 0))), (1, 0))
test_fail(lambda: trap.expand([(0, 0, 0)], [0]), contains='terminal')
trap, trap.expand([(), (1,)], [1, 1]), trap.terminal_value((1, 1, 1))

# %% [markdown]
# The evaluators for the checks: uniform priors with zero value (what an untrained network knows), and
# an oracle whose value head is exact.

# %%
#| export
def uniform_evaluator(features:np.ndarray, masks:np.ndarray):
    "Evaluator with uniform priors over legal actions and value 0 (for tests and untrained baselines)."
    m = np.asarray(masks, np.float32)
    return m/np.maximum(m.sum(1, keepdims=True), 1), np.zeros(len(m), np.float32)

def oracle_evaluator(env:TreeEnv):
    "Evaluator for a `TreeEnv` with uniform priors and the exact optimal value."
    def f(features, masks):
        p, _ = uniform_evaluator(features, masks)
        return p, np.array([env.optimal_value(env.path_of(x)) for x in features], np.float32)
    return f

# %%
p, v = uniform_evaluator(np.zeros((2, 3)), np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool))
test_eq(p.tolist(), [[.5, .5, 0, 0], [.25, .25, .25, .25]])
oracle_evaluator(trap)(np.stack([trap.features(()), trap.features((0,))]), np.ones((2, 2), bool))[1]

# %% [markdown]
# `TokenCostEnv` stands in for the SLM when measuring throughput: every non-final action decodes
# `tokens_per_step` tokens, each token being one forward pass of a small SmolLM2-shaped stack
# (pre-norm, a projection + output matrix, a gated MLP per layer) **for the whole batch of leaves at once**,
# exactly how the engine adapter runs `expand`. Like a real decoder, a forward costs a fixed per-call part
# (operator dispatch, reading the weights) plus a small per-row part, so batching leaves pays off the way
# it does for the SLM. A child keeps a reference to its parent instead of copying its history (the KV-cache
# prefix sharing of the engine). The last action is STOP (ends the episode, spends nothing, illegal at the root).

# %%
#| export
class _TokState:
    __slots__ = ('h', 'depth', 'tokens', 'stopped', 'parent')
    def __init__(self, h, depth, tokens, stopped, parent): self.h, self.depth, self.tokens, self.stopped, self.parent = h, depth, tokens, stopped, parent

class TokenCostEnv:
    "Toy env whose `expand` costs like a batched SLM decode: one small decoder forward per token for all leaves."
    def __init__(self, dim:int=582, n_actions:int=5, max_depth:int=12, tokens_per_step:int=8,
                 hidden:int=128, ffn:int=384, layers:int=2, seed:int=0):
        import torch
        self.torch, self.dim, self.n_actions, self.max_depth, self.tokens_per_step = torch, dim, n_actions, max_depth, tokens_per_step
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g)/math.sqrt(s[0])
        self.layers = [(r(hidden, hidden), r(hidden, hidden), r(hidden, 2*ffn), r(ffn, hidden)) for _ in range(layers)]
        self.act_emb = torch.randn(n_actions, hidden, generator=g)
        self.proj = r(hidden, dim).numpy()
        self.hidden, self.expand_calls, self.expanded = hidden, 0, 0

    def root(self, seed:int=0):
        h = self.torch.randn(self.hidden, generator=self.torch.Generator().manual_seed(seed))
        return _TokState(h, 0, 0, False, None)
    def _forward(self, x):
        F = self.torch.nn.functional
        for a, o, u, d in self.layers:
            x = x + self.torch.tanh(F.layer_norm(x, x.shape[-1:]) @ a) @ o
            g, v = (F.layer_norm(x, x.shape[-1:]) @ u).chunk(2, -1)
            x = x + (F.silu(g)*v) @ d
        return x
    def expand(self, parents, actions):
        self.expand_calls += 1; self.expanded += len(parents)
        stop = self.n_actions - 1
        out = [None]*len(parents)
        go = [i for i, a in enumerate(actions) if a != stop]
        for i, a in enumerate(actions):
            if a == stop: p = parents[i]; out[i] = _TokState(p.h, p.depth + 1, p.tokens, True, p)
        if go:
            with self.torch.inference_mode():
                x = self.torch.stack([parents[i].h for i in go]) + self.act_emb[[actions[i] for i in go]]
                for _ in range(self.tokens_per_step): x = self._forward(x)  # one batched forward per token
                x = x/x.norm(dim=-1, keepdim=True)*math.sqrt(self.hidden)
            for j, i in enumerate(go):
                p = parents[i]; out[i] = _TokState(x[j], p.depth + 1, p.tokens + self.tokens_per_step, False, p)
        return out
    def legal_mask(self, s):
        m = np.ones(self.n_actions, bool); m[-1] = s.depth > 0
        return m
    def is_terminal(self, s): return s.stopped or s.depth >= self.max_depth
    def terminal_value(self, s): return float(np.tanh(float(s.h[:16].mean())))
    def features(self, s): return (s.h.numpy() @ self.proj).astype(np.float32)
    def tokens_spent(self, s): return s.tokens
    def __repr__(self): return f"TokenCostEnv(dim={self.dim}, n_actions={self.n_actions}, tokens_per_step={self.tokens_per_step})"

# %%
tenv = TokenCostEnv(dim=16, hidden=32, ffn=64)
s0 = tenv.root()
kids = tenv.expand([s0, s0, s0], [0, 1, 4])
test_eq([tenv.tokens_spent(k) for k in kids], [8, 8, 0])
test_eq([tenv.is_terminal(k) for k in kids], [False, False, True])
test_eq(tenv.legal_mask(s0).tolist(), [True]*4 + [False])
test_eq(s0.depth, 0)  # the parent is untouched
tenv.features(kids[0]).shape, tenv.expand_calls

# %% [markdown]
# ## The tree
# A `Node` holds one env state and its edge statistics as small arrays over the actions. `VL` counts
# simulations that passed through an edge and wait for their leaf's value (virtual visits).

# %%
#| export
class Node:
    "One search-tree node: an env state with per-action visits `N`, value sums `W`, pending virtual visits `VL` and priors `P`."
    __slots__ = ('state', 'mask', 'terminal', 'tvalue', 'P', 'v', 'N', 'W', 'VL', 'children', 'tokens')
    def __init__(self, state, n_actions:int):
        self.state, self.mask, self.terminal, self.tvalue = state, None, False, 0.0
        self.P, self.v, self.tokens = None, 0.0, 0  # priors and value once evaluated
        self.N, self.W, self.VL = np.zeros(n_actions), np.zeros(n_actions), np.zeros(n_actions)
        self.children = [None]*n_actions
    def __repr__(self):
        return f"Node(terminal={self.terminal}, N={self.N.astype(int).tolist()}, children={sum(c is not None for c in self.children)})"

# %% [markdown]
# ## Results and callbacks
# A search returns a `SearchResult`: the chosen action (most visits; ties go to the higher Q, then the
# higher prior, then the lower index), the visit distribution (the policy training target, zero on illegal
# actions), the root value (mean backed-up value at the root), per-action visits, Q (NaN where unvisited),
# the network priors, and the budget used. `to_trace()` is the JSON-ready dict for the macro_trace.

# %%
#| export
@dataclass
class SearchResult:
    "What one search decided and why."
    action: int
    policy: np.ndarray        # visit distribution over all actions (training target); 0 where illegal
    root_value: float         # mean value backed up through the root
    visits: np.ndarray        # root visits per action (includes visits kept from a reused subtree)
    q: np.ndarray             # mean value per action; NaN where unvisited
    priors: np.ndarray        # the network's root priors (before Dirichlet noise)
    n_sims_done: int          # new simulations run in this search
    tokens_spent: int         # SLM tokens spent expanding nodes in this search
    stopped_early: bool       # True when the best action could no longer be overtaken
    stop_reason: str = 'sims' # 'sims', 'tokens' (token budget) or 'decided' (early stop)
    reused_visits: int = 0    # root visits inherited from the previous decision's subtree
    legal: np.ndarray|None = None

    def to_trace(self, action_names:Sequence[str]|None=None) -> dict:
        "JSON-ready summary for the macro_trace; per-action lists, or dicts keyed by `action_names`."
        r = lambda x: round(float(x), 4)
        per = lambda xs: ({n: x for n, x in zip(action_names, xs)} if action_names else list(xs))
        return dict(action=(action_names[self.action] if action_names else self.action),
                    visits=per(int(v) for v in self.visits),
                    q=per(None if np.isnan(x) else r(x) for x in self.q),
                    priors=per(r(x) for x in self.priors), policy=per(r(x) for x in self.policy),
                    root_value=r(self.root_value), n_sims=self.n_sims_done, tokens=self.tokens_spent,
                    stopped_early=self.stopped_early, stop_reason=self.stop_reason, reused_visits=self.reused_visits)

    def __repr__(self):
        return (f"SearchResult(action={self.action}, visits={self.visits.astype(int).tolist()}, "
                f"root_value={self.root_value:.3f}, n_sims_done={self.n_sims_done}, tokens_spent={self.tokens_spent}, "
                f"stop_reason={self.stop_reason!r})")

# %% [markdown]
# Logging and instrumentation hook in as ordered callbacks, never as flags in the loop: any object with an
# `order` attribute and some of the methods below; they run sorted by `order`.

# %%
#| export
class SearchCallback:
    "Base for search callbacks; override the events you need."
    order = 0
    def on_search_begin(self, mcts, root_state): pass
    def on_leaf_batch(self, mcts, info:dict): pass  # info: leaves, terminals, collisions, sims_done, tokens_spent
    def on_search_end(self, mcts, result:SearchResult): pass

class SearchLog(SearchCallback):
    "Records every leaf batch and result (for tests, plots and debugging)."
    order = 10
    def __init__(self): self.batches, self.results = [], []
    def on_leaf_batch(self, mcts, info): self.batches.append(dict(info))
    def on_search_end(self, mcts, result): self.results.append(result)

# %% [markdown]
# ## The search
# `MCTS(env, evaluator, cfg.mcts, seed)` keeps the current tree between calls. The seed drives the only
# randomness of the search itself, the Dirichlet noise, so the same seed builds the same tree.

# %%
#| export
class MCTS:
    "PUCT Monte-Carlo tree search over macro-actions with batched leaf evaluation (AlphaZero style)."
    def __init__(self,
                 env, # legal_mask, expand, is_terminal, terminal_value, features, tokens_spent
                 evaluator:Callable, # (features[B,D], masks[B,A]) -> (priors[B,A], values[B])
                 cfg:MCTSConfig|None=None, # the `mcts` config section
                 seed:int=0, # seeds the root Dirichlet noise
                 callbacks:Sequence=(), # ordered objects with on_search_begin / on_leaf_batch / on_search_end
                ):
        self.env, self.evaluator, self.cfg = env, evaluator, cfg or MCTSConfig()
        self.rng = np.random.default_rng(seed)
        self.callbacks = sorted(callbacks, key=lambda c: getattr(c, 'order', 0))
        self.root, self.n_actions = None, None

    def _cb(self, event, *args):
        for c in self.callbacks:
            f = getattr(c, event, None)
            if f is not None: f(self, *args)

    def reset(self):
        "Forget the tree."
        self.root = None

    def __repr__(self): return f"MCTS(env={self.env!r}, n_sims={self.cfg.n_sims}, leaf_batch={self.cfg.leaf_batch})"

# %% [markdown]
# `_make_node` wraps a fresh env state: it caches the token count, the terminal reward (checked to lie in
# [-1, 1]) or the legal mask (checked to allow something).

# %%
#| export
@patch
def _make_node(self:MCTS, state) -> Node:
    env = self.env
    if self.n_actions is None: self.n_actions = len(env.legal_mask(state))
    nd = Node(state, self.n_actions)
    nd.tokens = int(env.tokens_spent(state))
    if env.is_terminal(state):
        v = float(env.terminal_value(state))
        if not -1 <= v <= 1: raise ValueError(f"env.terminal_value returned {v}; rewards must be scaled into [-1, 1] by the env adapter.")
        nd.terminal, nd.tvalue = True, v
    else:
        m = np.asarray(env.legal_mask(state), bool)
        if m.shape != (self.n_actions,): raise ValueError(f"env.legal_mask returned shape {m.shape}, expected ({self.n_actions},).")
        if not m.any(): raise ValueError("env.legal_mask allows no action in a non-terminal state; make is_terminal true there.")
        nd.mask = m
    return nd

# %% [markdown]
# `_evaluate` scores a list of non-terminal nodes with ONE evaluator call: priors are restricted to the
# legal actions and renormalised (uniform if the network puts no mass on any legal action), values are
# clipped to [-1, 1]. Bad evaluator output is a clear error.

# %%
#| export
@patch
def _evaluate(self:MCTS, nodes:list):
    if not nodes: return
    feats = np.stack([np.asarray(self.env.features(n.state), np.float32) for n in nodes])
    masks = np.stack([n.mask for n in nodes])
    pri, val = self.evaluator(feats, masks)
    pri, val = np.asarray(pri, np.float64), np.asarray(val, np.float64).reshape(-1)
    if pri.shape != masks.shape or val.shape != (len(nodes),):
        raise ValueError(f"evaluator returned priors {pri.shape} and values {val.shape}; expected {masks.shape} and ({len(nodes)},).")
    if not (np.isfinite(pri).all() and np.isfinite(val).all()): raise ValueError("evaluator returned NaN or infinite priors/values.")
    pri = np.where(masks, np.maximum(pri, 0), 0)
    s = pri.sum(1, keepdims=True)
    pri = np.where(s > 0, pri/np.where(s > 0, s, 1), masks/masks.sum(1, keepdims=True))
    for n, p, v in zip(nodes, pri, np.clip(val, -1, 1)): n.P, n.v = p, float(v)

# %%
m = MCTS(trap, uniform_evaluator)
r0 = m._make_node(()); m._evaluate([r0])
test_eq((r0.P.tolist(), r0.v, r0.tokens), ([.5, .5], 0.0, 0))
test_eq(m._make_node((1, 1, 1)).tvalue, 0.9)
test_fail(lambda: MCTS(trap, lambda f, m: (np.ones((1, 3)), np.zeros(1)))._evaluate([r0]), contains='expected (1, 2)')
test_fail(lambda: MCTS(TreeEnv(np.full((2, 2), 3.0)), uniform_evaluator), contains='[-1, 1]')
r0

# %% [markdown]
# ### Selection
# `_pick` is the PUCT rule with virtual loss. A pending (virtual) visit counts as a visit that returned
# `-virtual_loss`, so the next walk of the same batch prefers another path. An unvisited edge gets the
# node's own value estimate as Q (first-play urgency = parent value): with an exact value head the search
# goes straight to the best child; with value 0 it explores in prior order.

# %%
#| export
@patch
def _pick(self:MCTS, node:Node, P:np.ndarray) -> int:
    n = node.N + node.VL
    q = np.where(n > 0, (node.W - self.cfg.virtual_loss*node.VL)/np.maximum(n, 1), node.v)
    u = self.cfg.c_puct*P*math.sqrt(1 + n.sum())/(1 + n)
    return int(np.argmax(np.where(node.mask, q + u, -np.inf)))

@patch
def _backup(self:MCTS, path:list, value:float, pending:bool=False):
    for node, a in path:
        node.N[a] += 1; node.W[a] += value
        if pending: node.VL[a] -= 1

# %% [markdown]
# ### One leaf batch
# `_run_batch` walks down up to `want` times. A walk ends at an edge with no child yet (a leaf to expand:
# virtual loss goes on its path) or at a terminal child (its reward is known, so it is backed up at once).
# A walk that reaches a leaf already in the batch is a collision and ends the batch early. Then all pending
# leaves are expanded by ONE `env.expand` call, the non-terminal children are scored by ONE evaluator call,
# and every path gets its value while its virtual loss is removed.

# %%
#| export
@patch
def _run_batch(self:MCTS, root:Node, P_root:np.ndarray, want:int) -> dict:
    pending, keys = [], set()
    sims = terminals = collisions = tokens = 0
    for _ in range(want):
        node, P, path = root, P_root, []
        while True:
            a = self._pick(node, P)
            path.append((node, a))
            child = node.children[a]
            if child is None or child.terminal: break
            node, P = child, child.P
        if child is not None:  # a terminal already in the tree
            self._backup(path, child.tvalue); sims += 1; terminals += 1
            continue
        if (id(node), a) in keys: collisions += 1; break
        keys.add((id(node), a))
        for n_, a_ in path: n_.VL[a_] += 1
        pending.append(path)
    if pending:
        kids = self.env.expand([p[-1][0].state for p in pending], [p[-1][1] for p in pending])
        if len(kids) != len(pending): raise ValueError(f"env.expand returned {len(kids)} states for {len(pending)} (parent, action) pairs.")
        nodes = [self._make_node(k) for k in kids]
        self._evaluate([n for n in nodes if not n.terminal])
        for path, nd in zip(pending, nodes):
            parent, a = path[-1]
            parent.children[a] = nd
            tokens += nd.tokens - parent.tokens
            terminals += nd.terminal
            self._backup(path, nd.tvalue if nd.terminal else nd.v, pending=True)
            sims += 1
    return dict(leaves=len(pending), terminals=terminals, collisions=collisions, sims=sims, tokens=tokens)

# %% [markdown]
# ### The search loop
# `search` evaluates the root if needed, mixes Dirichlet noise into the root priors when asked (self-play),
# then runs leaf batches until the simulation budget, the token budget (checked after each batch, so it
# may be overshot by at most one batch) or the anytime rule stops it: once the most-visited action leads the
# runner-up by more visits than simulations remain, no further simulation can change the decision.
#
# Early stopping defaults to `cfg.early_stop` **without noise only**: in self-play the whole visit
# distribution is the training target, and cutting the runner-ups' visits would bias it. With a reused
# subtree, `n_sims` counts new simulations; the visits inherited from the last decision also count towards
# the early-stop lead, which is how reuse saves SLM tokens.

# %%
#| export
@patch
def search(self:MCTS,
           root_state, # env state to decide at; the tree is reused when it is the state `advance` returned
           add_noise:bool=False, # Dirichlet noise at the root (self-play)
           n_sims:int|None=None, # new simulations; None = cfg.n_sims
           token_budget:int|None=None, # SLM tokens this search may spend; None = cfg.token_budget; 0 = unlimited
           early_stop:bool|None=None, # stop once the decision is settled; None = cfg.early_stop and not add_noise
          ) -> SearchResult:
    "Run PUCT simulations from `root_state` and return the decision."
    cfg = self.cfg
    n_sims = cfg.n_sims if n_sims is None else int(n_sims)
    if n_sims < 1: raise ValueError(f"n_sims must be >= 1, got {n_sims}.")
    token_budget = cfg.token_budget if token_budget is None else int(token_budget)
    early_stop = (cfg.early_stop and not add_noise) if early_stop is None else early_stop
    if self.root is None or self.root.state is not root_state: self.root = self._make_node(root_state)
    root = self.root
    if root.terminal: raise ValueError("search called on a terminal state; the episode is over.")
    if root.P is None: self._evaluate([root])
    P_root = root.P
    if add_noise:
        noise = np.zeros(self.n_actions)
        noise[root.mask] = self.rng.dirichlet([cfg.dirichlet_alpha]*int(root.mask.sum()))
        P_root = (1 - cfg.dirichlet_frac)*root.P + cfg.dirichlet_frac*noise
    reused = int(root.N.sum())
    self._cb('on_search_begin', root_state)
    done = tokens = 0; reason = 'sims'
    while done < n_sims:
        if early_stop and root.N.sum() > 0 and self._settled(root, n_sims - done): reason = 'decided'; break
        info = self._run_batch(root, P_root, min(cfg.leaf_batch, n_sims - done))
        done += info['sims']; tokens += info['tokens']
        self._cb('on_leaf_batch', dict(info, sims_done=done, tokens_spent=tokens))
        if token_budget and tokens >= token_budget: reason = 'tokens'; break
    res = self._result(root, done, tokens, reason, reused)
    self._cb('on_search_end', res)
    return res

@patch
def _settled(self:MCTS, root:Node, remaining:int) -> bool:
    n = np.sort(root.N[root.mask])[::-1]
    return len(n) == 1 or n[0] - n[1] > remaining

@patch
def _result(self:MCTS, root:Node, done:int, tokens:int, reason:str, reused:int) -> SearchResult:
    N, W, A = root.N.copy(), root.W, self.n_actions
    q = np.where(N > 0, W/np.maximum(N, 1), np.nan)
    rank_n = np.where(root.mask, N, -1)
    action = int(np.lexsort((np.arange(A), -root.P, -np.nan_to_num(q, nan=-2.0), -rank_n))[0])
    total = N.sum()
    return SearchResult(action=action, policy=(N/total if total else root.P.copy()).astype(np.float32),
                        root_value=float(W.sum()/total) if total else root.v, visits=N.astype(np.int64),
                        q=q.astype(np.float32), priors=root.P.astype(np.float32), n_sims_done=done,
                        tokens_spent=tokens, stopped_early=reason == 'decided', stop_reason=reason,
                        reused_visits=reused, legal=root.mask.copy())

# %% [markdown]
# Visit counts add up to the simulations run, for any batch size:

# %%
for lb in (1, 3, 8):
    for n in (1, 7, 50):
        env = TreeEnv.random(3, 4, seed=lb*n)
        cfg = replace_config(load_config(), [f'mcts.leaf_batch={lb}']).mcts
        r = MCTS(env, uniform_evaluator, cfg).search(env.root(), n_sims=n, early_stop=False)
        test_eq((r.visits.sum(), r.n_sims_done, r.reused_visits), (n, n, 0))
        test_close(r.policy.sum(), 1.0)
        test_eq(r.tokens_spent, env.expanded)  # one token per expansion in this toy
r

# %% [markdown]
# ## Checks with known answers
# **The trap tree.** Playing the whole episode (search, then `advance` into the chosen child, three times)
# reaches the best leaf 0.9 even though the left subtree has the better average. With 16 simulations per
# decision the search has not looked far enough yet and settles for 0.3, which shows the check can fail.

# %%
#| export
@patch
def advance(self:MCTS, action:int):
    "Commit to `action`: return the child state and keep its subtree as the next root (cfg.reuse_subtree)."
    root = self.root
    if root is None: raise ValueError("advance() needs a search first.")
    if not root.mask[action]: raise ValueError(f"action {action} is illegal at the root.")
    child = root.children[action]
    if child is None: child = self._make_node(self.env.expand([root.state], [action])[0])
    self.root = child if self.cfg.reuse_subtree and not child.terminal else None
    return child.state

def play_episode(mcts:MCTS, state, n_sims:int|None=None, add_noise:bool=False, max_moves:int=10_000):
    "Search and advance until a terminal state; returns (final state, list of SearchResult)."
    results = []
    for _ in range(max_moves):
        if mcts.env.is_terminal(state): break
        r = mcts.search(state, add_noise=add_noise, n_sims=n_sims); results.append(r)
        state = mcts.advance(r.action)
    return state, results

# %%
def final_leaf(n_sims, leaf_batch=1, **kw):
    cfg = replace_config(load_config(), [f'mcts.leaf_batch={leaf_batch}']).mcts
    s, rs = play_episode(MCTS(trap, uniform_evaluator, cfg), trap.root(), n_sims=n_sims, **kw)
    return s, trap.terminal_value(s)

test_eq(final_leaf(200), ((1, 1, 1), 0.9))
test_eq(final_leaf(200, leaf_batch=8), ((1, 1, 1), 0.9))
test_eq(final_leaf(16)[1] < 0.9, True)
final_leaf(200), final_leaf(16)

# %% [markdown]
# **Masking.** Action 0 at the root leads to the best leaf but is illegal: it must get no visit, no policy
# mass, no expansion (the toy env raises if asked to expand an illegal action), and the search picks the best
# legal action instead.

# %%
rw = np.array([[0.9, 0.9, 0.9], [0.1, -0.5, 0.0], [0.4, 0.3, -0.2]])
masked = TreeEnv(rw, legal_fn=lambda s: np.array([len(s) > 0, True, True]))
r = MCTS(masked, uniform_evaluator).search(masked.root(), n_sims=40)
test_eq((r.visits[0], r.policy[0], r.action), (0, 0.0, 2))
test_eq(np.isnan(r.q[0]), True)
r.visits, r.legal

# %% [markdown]
# **A perfect value function.** When the evaluator returns the exact value, one visit per root action
# already gives every action its exact Q, and the search picks an optimal action on each of 20 random trees
# (uniform priors, so only the values can guide it). An evaluator that knows nothing gets far fewer right.

# %%
def pick(env, ev, n): return MCTS(env, ev).search(env.root(), n_sims=n, early_stop=False)
for seed in range(20):
    env = TreeEnv.random(3, 4, seed=seed)
    r = pick(env, oracle_evaluator(env), 3)
    test_close(r.q, [env.optimal_value((a,)) for a in range(3)], eps=1e-6)
    test_eq(r.action in env.best_actions(()), True)
blind = [TreeEnv.random(3, 4, seed=s) for s in range(20)]
sum(pick(e, uniform_evaluator, 3).action in e.best_actions(()) for e in blind)

# %% [markdown]
# Averaging backed-up values makes a larger search dilute those exact values with its exploration of worse
# grandchildren, so agreement at mid budgets is not exact. With enough simulations
# the search converges to the optimum: with 500 simulations on depth-3 trees the perfect value function agrees
# every time, while the uninformed search still errs on some trees.

# %%
trees = [TreeEnv.random(3, 3, seed=s) for s in range(10)]
test_eq(all(pick(e, oracle_evaluator(e), 500).action in e.best_actions(()) for e in trees), True)
sum(pick(e, uniform_evaluator, 500).action in e.best_actions(()) for e in trees)

# %% [markdown]
# ## Batching, budgets, reuse
# With `leaf_batch = 8`, a 64-simulation search on a bushy tree makes about 8 `expand` calls instead of 64,
# and as many evaluator calls. `SearchLog` shows the batches.

# %%
class CountingEvaluator:
    def __init__(self, f=uniform_evaluator): self.f, self.calls, self.rows = f, 0, 0
    def __call__(self, x, m): self.calls += 1; self.rows += len(x); return self.f(x, m)

env, ev, log = TreeEnv.random(5, 6, seed=1), CountingEvaluator(), SearchLog()
r = MCTS(env, ev, load_config().mcts, callbacks=[log]).search(env.root(), n_sims=64, early_stop=False)
test_eq(sum(b['sims'] for b in log.batches), 64)
test_eq(env.expand_calls, len(log.batches))
test_eq(env.expand_calls <= 10, True)
test_eq(ev.calls, env.expand_calls + 1)  # + the root
[b['leaves'] for b in log.batches], env.expand_calls, ev.calls

# %% [markdown]
# A token budget stops the search after the batch that crosses it (here 10 tokens per expansion):

# %%
env = TreeEnv.random(5, 6, seed=2, tokens_per_step=10)
r = MCTS(env, uniform_evaluator).search(env.root(), n_sims=200, token_budget=100, early_stop=False)
test_eq(r.stop_reason, 'tokens')
test_eq(100 <= r.tokens_spent < 100 + 10*8, True)
r

# %% [markdown]
# **Anytime stop.** When the evaluator strongly prefers one action, the search stops as soon as the others
# cannot catch up, and decides exactly as the full search would.

# %%
def biased(f, m):
    p = np.where(m, 0.02, 0.0); p[:, 1] = 0.92
    return p, np.zeros(len(m))

env = TreeEnv.random(5, 6, seed=3)
full = MCTS(env, biased).search(env.root(), n_sims=128, early_stop=False)
fast = MCTS(env, biased).search(env.root(), n_sims=128, early_stop=True)
test_eq((fast.stop_reason, fast.action), ('decided', full.action))
test_eq(fast.n_sims_done < 128, True)
fast.n_sims_done, full.visits, fast.visits

# %% [markdown]
# **Subtree reuse.** After `advance`, the chosen child's subtree becomes the root: its visits come along, and
# searching from the returned state continues that tree. Searching from any other state starts afresh.

# %%
env = TreeEnv.random(3, 5, seed=4)
m = MCTS(env, uniform_evaluator)
r1 = m.search(env.root(), n_sims=40, early_stop=False)
s1 = m.advance(r1.action)
kept = int(m.root.N.sum())
test_eq(kept, r1.visits[r1.action] - 1)  # the first visit of a child created it rather than passing through
r2 = m.search(s1, n_sims=20, early_stop=False)
test_eq((r2.reused_visits, r2.visits.sum()), (kept, kept + 20))
r3 = m.search(tuple(list(s1)), n_sims=20, early_stop=False)  # equal but not the same object: a new tree
test_eq(r3.reused_visits, 0)
kept, r2

# %% [markdown]
# With `reuse_subtree = false` every decision starts from scratch:

# %%
m = MCTS(env, uniform_evaluator, replace_config(load_config(), ['mcts.reuse_subtree=false']).mcts)
r = m.search(env.root(), n_sims=40, early_stop=False)
test_eq(m.search(m.advance(r.action), n_sims=5, early_stop=False).reused_visits, 0)

# %% [markdown]
# **Seeded noise.** With Dirichlet noise the same seed gives the same tree, another seed another tree.

# %%
env = TreeEnv.random(5, 4, seed=5)
run = lambda seed: MCTS(env, uniform_evaluator, seed=seed).search(env.root(), add_noise=True, n_sims=64).visits.tolist()
test_eq(run(0), run(0))
test_eq(run(0) != run(1), True)
run(0), run(1)

# %% [markdown]
# Callbacks run in `order`, whatever order they were given in:

# %%
class Tag(SearchCallback):
    def __init__(self, order, out): self.order, self.out = order, out
    def on_search_end(self, mcts, result): self.out.append(self.order)

seen = []
MCTS(trap, uniform_evaluator, callbacks=[Tag(5, seen), Tag(-1, seen), Tag(2, seen)]).search(trap.root(), n_sims=4)
test_eq(seen, [-1, 2, 5])

# %% [markdown]
# ## Choosing the move in self-play
# For the first `cfg.temperature_moves` decisions of a self-play episode the move is sampled from
# $N(a)^{1/T}$; afterwards (and always outside self-play) it is the most visited action.

# %%
#| export
def visit_policy(visits:np.ndarray, temperature:float) -> np.ndarray:
    "Visit counts sharpened by `1/temperature` and normalised; temperature 0 = one-hot on the most visited."
    v = np.asarray(visits, np.float64)
    if v.sum() <= 0: raise ValueError("visit_policy needs at least one visit.")
    if temperature <= 0:
        p = np.zeros_like(v); p[int(np.argmax(v))] = 1; return p
    x = np.where(v > 0, np.log(np.maximum(v, 1e-300))/temperature, -np.inf)
    x = np.exp(x - x.max())
    return x/x.sum()

def select_action(result:SearchResult, move:int, cfg:MCTSConfig, rng:np.random.Generator) -> int:
    "Self-play move: sampled from visits at `cfg.temperature` for the first `cfg.temperature_moves` moves, else `result.action`."
    if move < cfg.temperature_moves and cfg.temperature > 0:
        p = visit_policy(result.visits, cfg.temperature)
        return int(rng.choice(len(p), p=p))
    return result.action

# %%
test_close(visit_policy([1, 3, 0], 1.0), [.25, .75, 0])
test_close(visit_policy([1, 3, 0], 0.5), [.1, .9, 0])
test_eq(visit_policy([1, 3, 3], 0).tolist(), [0, 1, 0])
mc = load_config().mcts
rng = np.random.default_rng(0)
res = SearchResult(action=1, policy=np.array([.5, .5]), root_value=0., visits=np.array([5, 5]), q=np.zeros(2),
                   priors=np.array([.5, .5]), n_sims_done=10, tokens_spent=0, stopped_early=False)
picks = [select_action(res, 0, mc, rng) for _ in range(200)]
test_eq(0 < sum(picks) < 200, True)  # sampled
test_eq({select_action(res, mc.temperature_moves, mc, rng) for _ in range(20)}, {1})  # argmax after the opening
sum(picks)

# %% [markdown]
# The trace is plain JSON:

# %%
r = MCTS(masked, uniform_evaluator).search(masked.root(), n_sims=12)
tr = r.to_trace(['A', 'B', 'C'])
test_eq(json.loads(json.dumps(tr)), tr)
test_eq(tr['q']['A'], None)
tr

# %% [markdown]
# Where the visits went, next to the priors they started from:

# %%
import matplotlib.pyplot as plt
env = TreeEnv.random(5, 4, seed=7)
r = MCTS(env, oracle_evaluator(env)).search(env.root(), n_sims=64, early_stop=False)
fig, ax = plt.subplots(figsize=(5, 2.5))
x = np.arange(env.n_actions)
ax.bar(x - 0.2, r.priors, 0.4, label='prior'); ax.bar(x + 0.2, r.policy, 0.4, label='visit share')
ax.set_xticks(x); ax.set_xlabel('action'); ax.legend(); ax.set_title(f'optimal: {env.best_actions(())}, chosen: {r.action}')
plt.show()

# %% [markdown]
# ## Cost per simulation
# On the token-cost toy (a real batched decoder forward per token) the search's cost per simulation must
# not grow with the number of simulations (no copying of states or caches), and batching 8 leaves must at
# least halve the cost of sequential expansion. Timings are noisy on a shared machine; the benchmark
# `benchmarks/mcts_throughput.py` reports them properly. The cell is `slow`.

# %%
#| slow
def sims_per_s(n_sims, leaf_batch, reps=3):
    cfg = replace_config(load_config(), [f'mcts.leaf_batch={leaf_batch}']).mcts
    env = TokenCostEnv(dim=582, hidden=256, ffn=768, layers=4, tokens_per_step=4)
    best = 0
    for i in range(reps):
        m = MCTS(env, uniform_evaluator, cfg)
        t = time.perf_counter(); r = m.search(env.root(seed=i), n_sims=n_sims, early_stop=False)
        best = max(best, r.n_sims_done/(time.perf_counter() - t))
    return best

batched, seq = sims_per_s(64, 8), sims_per_s(64, 1)
print(f"batched {batched:.0f} sims/s, sequential {seq:.0f} sims/s, speed-up {batched/seq:.2f}x")
test_eq(batched/seq >= 2, True)
