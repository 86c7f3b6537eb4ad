# %%
#| default_exp selfplay

# %% [markdown]
# # Self-play
# > MCTS-controlled episodes on the frozen SLM that fill the replay buffer, in parallel processes or on Ray, and the controllers a trained network drives.

# %%
#| export
from __future__ import annotations
import dataclasses, hashlib, json, logging, math, multiprocessing as mp, os, queue, time, traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
import numpy as np
import torch
from fastcore.basics import patch
from research_controller.config import Config, ConfigError, config_hash, load_config, run_path
from research_controller.macro_actions import ACTION_NAMES, N_ACTIONS, Action
from research_controller.mcts import MCTS, SearchResult, select_action, uniform_evaluator
from research_controller.buffer import ReplayBuffer
from research_controller.network import CheckpointError, PolicyValueNet, load_checkpoint, make_evaluator

log = logging.getLogger(__name__)

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import functools, signal, subprocess, sys, tempfile, textwrap
from research_controller.config import replace_config
from research_controller.slm import tiny_slm
from research_controller.engine import Engine
torch.set_num_threads(1)  # the test machine's cores are shared

# %% [markdown]
# Self-play turns the search of `05_mcts` loose on the real engine of `04_engine`: at every decision point
# MCTS looks ahead over macro-actions, the move is played, and each position is stored with the visit
# distribution (the policy target) and, once the episode is over, its final reward (the value target).
# The pieces, in order:
#
# 1. `SelfPlayEnv`, the adapter that makes engine + reward an MCTS environment;
# 2. `play_episode_selfplay`, one episode with Dirichlet noise, visit-count temperature and subtree reuse;
# 3. `selfplay_items`, prompts mixed round-robin from the training split of each task;
# 4. `run_selfplay`, many episodes into the replay buffer: progress bar, seeds, worker processes, Ray;
# 5. the controllers a trained network drives: `PolicyController`, `MCTSController`, `load_controller`.
#
# Unit checks run on `tiny_slm` (a tiny random Llama with the real tokenizer) with small budgets; the
# minutes-long run on the default SLM is in `10_train`.

# %%
cfg0 = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4', 'selfplay.max_new_tokens=16',
                              'mcts.n_sims=6', 'mcts.leaf_batch=3', 'mcts.temperature_moves=2'])
tm, tt = tiny_slm(cfg0, seed=0)
eng = Engine(tm, tt, cfg0)
eng

# %% [markdown]
# ## Rewards as values
# The search needs terminal values in [-1, 1]; rewards are sums of weighted terms. `reward_bounds` gives
# the range a `RewardCalculator` total can take under the configured weights (every positive term in
# [0, 1], every penalty in [0, 1]), and `reward_to_value` maps that range linearly onto [-1, 1] (clipped).
# A reward callback may bring its own range as a `bounds` attribute.

# %%
#| export
POSITIVE_TERMS = ('w_fluency', 'w_coherence', 'w_task')
PENALTY_TERMS = ('w_length', 'w_repetition', 'w_unclosed_thought')

def reward_bounds(cfg:Config) -> tuple[float, float]:
    "The (lowest, highest) total reward the configured weights allow."
    r = cfg.rewards
    lo, hi = -sum(getattr(r, k) for k in PENALTY_TERMS), sum(getattr(r, k) for k in POSITIVE_TERMS)
    if hi <= lo: raise ConfigError(f"rewards weights give an empty reward range [{lo}, {hi}]; set some of rewards.{', rewards.'.join(POSITIVE_TERMS)} > 0.")
    return float(lo), float(hi)

def reward_to_value(total:float, bounds:tuple[float, float]) -> float:
    "Map a reward `total` in `bounds` linearly onto [-1, 1] (clipped)."
    lo, hi = bounds
    if not math.isfinite(total): raise ValueError(f"reward total {total!r} is not finite; fix the reward callback.")
    return float(np.clip(2*(total - lo)/(hi - lo) - 1, -1, 1))

# %%
b = reward_bounds(load_config())
test_eq(b, (-2.5, 4.0))
test_eq((reward_to_value(-2.5, b), reward_to_value(4.0, b), reward_to_value(9, b)), (-1.0, 1.0, 1.0))
test_fail(lambda: reward_bounds(load_config(overrides=['rewards.w_fluency=0', 'rewards.w_coherence=0', 'rewards.w_task=0',
                                                       'rewards.w_length=0', 'rewards.w_repetition=0', 'rewards.w_unclosed_thought=0'])),
          contains='empty reward range')
b, reward_to_value(0.75, b)

# %% [markdown]
# A reward callback is anything called as `reward_fn(text, item, n_tokens, unclosed_thought)` that returns a
# `RewardBreakdown` (`.total`, `.terms`) or a plain number; `RewardCalculator(cfg, model, tok).calc` is the
# default. `LengthReward` is a cheap, deterministic one for tests and benchmarks: 1 when the visible answer
# has `target` words, falling linearly to -1 at twice that distance, -1 with a thought left open. It is a
# module-level class so it can be sent to worker processes.

# %%
#| export
@dataclass
class RewardTerms:
    "A reward total with its named terms (what reward callbacks return)."
    total: float
    terms: dict = field(default_factory=dict)

class LengthReward:
    "Test/benchmark reward: 1 at `target` visible words, linearly down to -1; -1 if a thought is left open."
    bounds = (-1.0, 1.0)
    order = 0
    def __init__(self, target:int=6): self.target = int(target)
    def __call__(self, text:str, item:dict|None=None, n_tokens:int|None=None, unclosed_thought:bool=False) -> RewardTerms:
        words = len(text.split())
        length = max(-1.0, 1 - abs(words - self.target)/self.target)
        total = -1.0 if unclosed_thought else length
        return RewardTerms(total, dict(length=length, unclosed_thought=float(unclosed_thought)))
    def __repr__(self): return f"LengthReward(target={self.target})"

def _as_terms(r) -> RewardTerms:
    "Normalise a reward callback's return value."
    if isinstance(r, (int, float, np.floating)): return RewardTerms(float(r), {})
    if hasattr(r, 'total'): return RewardTerms(float(r.total), {k: float(v) for k, v in (getattr(r, 'terms', None) or {}).items()})
    raise TypeError(f"a reward callback returned {type(r).__name__}; return a number or an object with .total and .terms (RewardBreakdown).")

# %%
lr = LengthReward(4)
test_eq(lr("one two three four").total, 1.0)
test_eq(lr("one two", unclosed_thought=True).total, -1.0)
test_eq(_as_terms(0.5), RewardTerms(0.5, {}))
test_fail(lambda: _as_terms("good"), contains='.total and .terms')
lr("one two three four five six")

# %% [markdown]
# ## The environment adapter
# `SelfPlayEnv` wraps the engine for the search. Its states are small wrappers around the engine's opaque
# `GenState` that cache the feature vector: `expand` runs ONE batched decode for all the (parent, action)
# pairs of a leaf batch (`engine.expand`) and computes the children's features in ONE batch
# (`engine.features_batch`), so the network evaluator never triggers per-node work. `terminal_value` is the
# reward of the finished episode (visible text from `engine.result`, the item, the tokens spent, whether a
# thought was left open) mapped to [-1, 1]; rewards are cached per final text, so the many tree leaves
# ending in the same text are scored once.

# %%
#| export
class EnvState:
    "An MCTS state: the engine's `GenState` plus its cached feature vector."
    __slots__ = ('gs', 'feat')
    def __init__(self, gs, feat=None): self.gs, self.feat = gs, feat
    def __repr__(self): return f"EnvState({self.gs!r})"

def _engine_result(engine, gs, include_thoughts:bool=False, notes:dict|None=None):
    "`engine.result(gs)`: the visible text, trace (with the controller's `notes` per step) and counters of a state."
    return engine.result(gs, include_thoughts, notes)

def finished_key(engine, gs) -> tuple:
    "(visible text, tokens spent, thought left open) of a state: what its reward depends on (cheap: no trace, no features)."
    text = engine.tok.decode(engine.visible_ids(gs.tip), skip_special_tokens=True)  # == engine.result(gs).text
    return text, int(engine.tokens_spent(gs)), bool(engine.signals(gs)['in_thought'])

class SelfPlayEnv:
    "MCTS environment over the engine: batched expansion, cached features, terminal value = mapped reward (cached per text)."
    def __init__(self,
                 engine, # the `Engine` (SLM + tokenizer + config)
                 reward_fn:Callable|None, # (text, item, n_tokens, unclosed_thought) -> RewardBreakdown | float; None = no scoring
                 item:dict|None=None, # the task item of the episode (references for task scores)
                 bounds:tuple|None=None, # reward range mapped to [-1, 1]; None = reward_fn.bounds or reward_bounds(cfg)
                ):
        self.engine, self.reward_fn, self.item = engine, reward_fn, item
        self.bounds = tuple(bounds or getattr(reward_fn, 'bounds', None) or reward_bounds(engine.cfg))
        self.cache, self.reward_calls, self.expand_calls = {}, 0, 0

    def root(self, prompt:str|None=None, max_new_tokens:int|None=None, seed:int=0) -> EnvState:
        "A fresh state for `prompt` (default: the item's prompt)."
        prompt = prompt if prompt is not None else (self.item or {}).get('prompt')
        if not prompt: raise ValueError("SelfPlayEnv.root needs a prompt (or an item with a 'prompt').")
        return EnvState(self.engine.new_state(prompt, max_new_tokens, seed=seed))

    def legal_mask(self, s:EnvState) -> np.ndarray: return self.engine.legal_mask(s.gs)
    def is_terminal(self, s:EnvState) -> bool: return self.engine.is_done(s.gs)
    def tokens_spent(self, s:EnvState) -> int: return self.engine.tokens_spent(s.gs)
    def features(self, s:EnvState) -> np.ndarray:
        if s.feat is None: s.feat = self.engine.features(s.gs)
        return s.feat

    def expand(self, parents:Sequence[EnvState], actions:Sequence[int]) -> list[EnvState]:
        self.expand_calls += 1
        kids = [EnvState(g) for g in self.engine.expand([p.gs for p in parents], [int(a) for a in actions])]
        live = [k for k in kids if not self.engine.is_done(k.gs)]
        if live:
            for k, f in zip(live, self.engine.features_batch([k.gs for k in live])): k.feat = f
        if self.reward_fn is not None and len(live) < len(kids): self.score([k for k in kids if self.engine.is_done(k.gs)])
        return kids

    def __repr__(self): return f"SelfPlayEnv(bounds={self.bounds}, cached_rewards={len(self.cache)})"

# %% [markdown]
# The reward side: `score` rewards finished states (all the finished children of a leaf batch at once, through
# the callback's `batch` when it has one: the judge then rates them in one forward pass), `reward` looks one up
# (cached), `terminal_value` maps it.

# %%
#| export
@patch
def _key(self:SelfPlayEnv, s:EnvState) -> tuple: return finished_key(self.engine, s.gs)

@patch
def score(self:SelfPlayEnv, states:Sequence[EnvState]):
    "Reward every finished state not scored yet, in one `reward_fn.batch` call when the callback has one."
    keys = list(dict.fromkeys(k for k in map(self._key, states) if k not in self.cache))
    if not keys: return
    if self.reward_fn is None: raise ValueError("this SelfPlayEnv has no reward_fn; finished states cannot be scored.")
    batch = getattr(getattr(self.reward_fn, 'calc', self.reward_fn), 'batch', None)
    if batch is not None and len(keys) > 1:
        outs = batch([k[0] for k in keys], [self.item]*len(keys), [k[1] for k in keys], [k[2] for k in keys])
    else: outs = [self.reward_fn(k[0], self.item, k[1], k[2]) for k in keys]
    self.reward_calls += len(keys)
    for k, o in zip(keys, outs): self.cache[k] = _as_terms(o)

@patch
def reward(self:SelfPlayEnv, s:EnvState) -> RewardTerms:
    "Reward of a finished state (cached per visible text, tokens and open thought)."
    self.score([s])
    return self.cache[self._key(s)]

@patch
def terminal_value(self:SelfPlayEnv, s:EnvState) -> float:
    "The finished episode's reward mapped to [-1, 1]."
    if not self.is_terminal(s): raise ValueError("terminal_value called on a state that is not finished.")
    return reward_to_value(self.reward(s).total, self.bounds)

# %%
env = SelfPlayEnv(eng, LengthReward(4), dict(id='x', task='wikitext', prompt='Tell me about rivers.', references=[]))
s0 = env.root(max_new_tokens=16)
kids = env.expand([s0, s0, s0], [Action.CONTINUE, Action.THINK_BEGIN, Action.STOP])
test_eq([env.tokens_spent(k) for k in kids], [4, 1, 0])
test_eq([env.is_terminal(k) for k in kids], [False, False, True])
test_eq(kids[0].feat.shape, (eng.feature_dim,))  # computed in the batch
test_eq(env.tokens_spent(s0), 0)  # parents untouched
test_eq(finished_key(eng, kids[0].gs)[:2], (eng.result(kids[0].gs).text, eng.result(kids[0].gs).tokens))  # the cheap key = the result
v = env.terminal_value(kids[2]); env.terminal_value(kids[2])
test_eq((v, env.reward_calls), (0.0, 1))  # empty answer: 4 words from the target of 4 -> 0; scored once
test_fail(lambda: env.terminal_value(kids[0]), contains='not finished')
env, v

# %% [markdown]
# A callback with a `batch` method gets all the finished children of a leaf batch in one call:

# %%
class Batched(LengthReward):
    def __init__(self): super().__init__(4); self.calls = []
    def batch(self, texts, items, n_tokens, unclosed): self.calls.append(len(texts)); return [self(t) for t in texts]

bt = Batched()
env_b = SelfPlayEnv(eng, bt, dict(id='x', task='wikitext', prompt='Tell me about rivers.', references=[]))
r0 = env_b.root(max_new_tokens=16)
k1 = env_b.expand([r0], [Action.CONTINUE])[0]
done = env_b.expand([r0, k1, k1], [Action.STOP, Action.STOP, Action.STOP])
test_eq(bt.calls, [2])  # two distinct finished texts, one call
test_eq(env_b.terminal_value(done[1]), env_b.terminal_value(done[2]))
bt.calls

# %% [markdown]
# ## One self-play episode
# `play_selfplay_episode` searches at every decision with Dirichlet noise at the root, plays the move sampled
# from the visit counts at `mcts.temperature` for the first `mcts.temperature_moves` decisions (then the most
# visited), keeps the chosen subtree for the next search, and returns the positions: features, legal mask and
# visit distribution per decision, all with the final value as the value target (one player, reward only at
# the end).

# %%
#| export
@dataclass
class Episode:
    "One finished self-play episode: its positions, targets and outcome."
    states: np.ndarray       # [T, D] features at each decision
    masks: np.ndarray        # [T, A] legal actions
    policies: np.ndarray     # [T, A] visit distributions (the policy targets)
    value: float             # final reward mapped to [-1, 1] (the value target of every position)
    reward: float            # final reward total
    terms: dict              # reward terms
    actions: list            # actions played (names)
    text: str                # visible text (no thought content)
    tokens: int              # tokens of the played path
    search_tokens: int       # tokens spent by all searches of the episode
    item_id: str|None = None
    task: str|None = None
    seed: int = 0
    seconds: float = 0.0

    def __repr__(self):
        return (f"Episode(task={self.task!r}, positions={len(self.policies)}, value={self.value:.3f}, "
                f"actions={self.actions}, tokens={self.tokens}, search_tokens={self.search_tokens})")

def play_selfplay_episode(engine, # the `Engine`
                          item:dict, # task item: `prompt`, `id`, `task`, `references`
                          evaluator:Callable, # (features, masks) -> (priors, values): `make_evaluator(net)` or `uniform_evaluator`
                          reward_fn:Callable, # (text, item, n_tokens, unclosed_thought) -> RewardBreakdown | float
                          cfg:Config|None=None, # `mcts` and `selfplay` sections; None = the engine's config
                          seed:int=0, # seeds the SLM sampling, the root noise and the move sampling
                          bounds:tuple|None=None, # reward range mapped to [-1, 1]
                          callbacks:Sequence=(), # MCTS search callbacks
                         ) -> Episode:
    "Play one MCTS-controlled episode with exploration noise and return its positions and outcome."
    cfg = cfg or engine.cfg
    t0 = time.perf_counter()
    env = SelfPlayEnv(engine, reward_fn, item, bounds)
    mcts = MCTS(env, evaluator, cfg.mcts, seed=seed, callbacks=callbacks)
    rng = np.random.default_rng([seed, 1])
    state = env.root(max_new_tokens=cfg.selfplay.max_new_tokens, seed=seed)
    X, M, P, acts, search_tokens = [], [], [], [], 0
    while not env.is_terminal(state):
        r = mcts.search(state, add_noise=True)
        X.append(env.features(state)); M.append(env.legal_mask(state)); P.append(r.policy)
        a = select_action(r, len(acts), cfg.mcts, rng)
        search_tokens += r.tokens_spent
        acts.append(ACTION_NAMES[a])
        state = mcts.advance(a)
    rt = env.reward(state)
    text, tokens, _ = finished_key(engine, state.gs)
    return Episode(np.stack(X).astype(np.float32), np.stack(M), np.stack(P).astype(np.float32),
                   reward_to_value(rt.total, env.bounds), rt.total, rt.terms, acts, text, tokens,
                   int(search_tokens), item.get('id'), item.get('task'), int(seed), time.perf_counter() - t0)

# %%
item = dict(id='demo-1', task='wikitext', prompt='Write about the river Thames.', references=[])
ep = play_selfplay_episode(eng, item, uniform_evaluator, LengthReward(4), cfg0, seed=0)
test_eq(ep.states.shape, (len(ep.actions), eng.feature_dim))
test_close(ep.policies.sum(1), np.ones(len(ep.actions)), eps=1e-5)
test_eq(bool((ep.policies[~ep.masks] == 0).all()), True)  # no mass on illegal actions
test_eq(ep.tokens <= cfg0.selfplay.max_new_tokens, True)
test_eq(ep.search_tokens > ep.tokens, True)  # the searches looked at more than the path
test_eq(ep.value, reward_to_value(ep.reward, (-1, 1)))
ep

# %% [markdown]
# The policy targets of that episode: the visit share of each action at each decision (dots: the move played,
# sampled from the visits during the first `mcts.temperature_moves` decisions).

# %%
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(5, 2.2))
ax.imshow(ep.policies.T, aspect='auto', cmap='Blues', vmin=0, vmax=1)
ax.scatter(range(len(ep.actions)), [ACTION_NAMES.index(a) for a in ep.actions], c='tab:red', s=12)
ax.set_yticks(range(N_ACTIONS)); ax.set_yticklabels(ACTION_NAMES); ax.set_xlabel('decision'); ax.set_title('visit distributions')
plt.show()

# %% [markdown]
# Seeded: the same seed replays the same episode, another seed explores differently.

# %%
ep2 = play_selfplay_episode(eng, item, uniform_evaluator, LengthReward(4), cfg0, seed=0)
test_eq((ep2.actions, ep2.text), (ep.actions, ep.text))
test_close(ep2.policies, ep.policies)
others = [play_selfplay_episode(eng, item, uniform_evaluator, LengthReward(4), cfg0, seed=s).actions for s in (1, 2, 3)]
test_eq(any(o != ep.actions for o in others), True)
others

# %% [markdown]
# ## Prompts
# `selfplay_items` mixes prompts round-robin over `selfplay.tasks`, each drawn (seeded) from the task's
# **training** split through `rewards.load_task_items`; the evaluation split is never touched.

# %%
#| export
def selfplay_items(cfg:Config, # `selfplay.tasks` and the `tasks` section
                   n:int, # how many items
                   seed:int=0, # sample seed
                  ) -> list[dict]:
    "`n` training items, round-robin over `cfg.selfplay.tasks`."
    from research_controller.rewards import TASKS, load_task_items
    tasks = list(cfg.selfplay.tasks)
    if not tasks: raise ConfigError("selfplay.tasks is empty; list at least one of " + str(list(TASKS)) + ".")
    bad = [t for t in tasks if t not in TASKS]
    if bad: raise ConfigError(f"selfplay.tasks has unknown task(s) {bad}; choose from {list(TASKS)}.")
    per = -(-n//len(tasks))
    pools = {t: load_task_items(cfg, t, 'train', n=per, seed=seed) for t in dict.fromkeys(tasks)}
    for t, p in pools.items():
        if not p: raise ConfigError(f"task {t!r} has no training items in {cfg.paths.data_dir!r}; remove it from selfplay.tasks.")
    out, used = [], {t: 0 for t in pools}
    for i in range(n):
        t = tasks[i % len(tasks)]
        out.append(pools[t][used[t] % len(pools[t])]); used[t] += 1
    return out

# %%
from research_controller.rewards import load_task_items
its = selfplay_items(load_config(), 8, seed=0)
test_eq([i['task'] for i in its[:4]], ['wikitext', 'squad', 'gsm8k', 'nq_open'])
test_eq([i['id'] for i in selfplay_items(load_config(), 8, seed=0)], [i['id'] for i in its])
ev_ids = {i['id'] for t in ('wikitext', 'squad', 'gsm8k', 'nq_open') for i in load_task_items(load_config(), t, 'eval')}
test_eq(any(i['id'] in ev_ids for i in selfplay_items(load_config(), 40, seed=3)), False)  # never the eval split
test_fail(lambda: selfplay_items(load_config(overrides=['selfplay.tasks=[squad, trivia]']), 2), contains="unknown task(s) ['trivia']")
[(i['task'], i['id']) for i in its]

# %% [markdown]
# ## Running self-play
# `run_selfplay` plays `episodes` episodes and commits each to the replay buffer as soon as it finishes
# (`ReplayBuffer.add_episode`, atomic per episode), with metadata: episode id, controller version, SLM
# fingerprint, reward and its terms, task, prompt id, seed, actions, tokens. Episode `i` always gets the item
# `i` of `selfplay_items` and the seed derived from `(seed, i)`, so results do not depend on how episodes are
# split over workers: with `selfplay.workers = k`, worker `w` plays episodes `w, w+k, ...` in its own process
# (loading the SLM itself) and the parent commits them in episode order. `selfplay.backend = 'ray'` runs the
# workers as Ray actors instead.
#
# First the pieces a worker needs: the evaluator of a checkpoint (or uniform priors and value 0 when there is
# none yet), the controller version it records, and a seed per episode.

# %%
#| export
def episode_seed(seed:int, i:int) -> int:
    "The seed of episode `i` of a run seeded `seed`."
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0])

def checkpoint_version(checkpoint:str|Path|None) -> str:
    "The controller version recorded in self-play metadata: the checkpoint's `extra['version']`, its content hash, or 'uniform'."
    if checkpoint is None: return 'uniform'
    p = Path(checkpoint)
    if not p.exists(): raise CheckpointError(f"no checkpoint at {str(p)!r}; train one (rc train) or pass checkpoint=None for uniform priors.")
    try:
        _, info = load_checkpoint(p)
        if info['extra'].get('version'): return str(info['extra']['version'])
    except CheckpointError: raise
    return 'ckpt-' + hashlib.sha256(p.read_bytes()).hexdigest()[:12]

def _evaluator_for(checkpoint, engine) -> Callable:
    if checkpoint is None: return uniform_evaluator
    net, _ = load_checkpoint(checkpoint, feature_dim=engine.feature_dim, action_names=ACTION_NAMES, slm_fingerprint=engine.fingerprint)
    return make_evaluator(net)

# %%
test_eq(episode_seed(0, 3), episode_seed(0, 3))
test_eq(len({episode_seed(0, i) for i in range(100)} | {episode_seed(1, i) for i in range(100)}), 200)
test_eq(checkpoint_version(None), 'uniform')
test_fail(lambda: checkpoint_version('nope.pt'), contains='no checkpoint')
episode_seed(0, 0)

# %% [markdown]
# `_Player` holds what one process needs to play episodes: an engine on its own copy of the SLM, the reward
# callback (default `RewardCalculator(cfg, model, tok).calc`), the evaluator. It is what worker processes and
# Ray actors run.

# %%
#| export
def _default_loader(cfg):
    from research_controller.slm import load_slm
    return load_slm(cfg)

def _default_reward(cfg, model, tok):
    try: from research_controller.rewards import RewardCalculator
    except ImportError as e: raise ImportError(f"research_controller.rewards has no RewardCalculator yet ({e}); pass reward_fn=...") from None
    return RewardCalculator(cfg, model, tok)  # callable like .calc, with .calc.batch and .bounds

class _Player:
    "Plays episodes in one process: engine on its own SLM, reward callback, evaluator."
    def __init__(self, cfg:Config, checkpoint=None, reward_fn=None, slm_loader=None, engine=None, threads:int=0):
        from research_controller.engine import Engine
        if threads: torch.set_num_threads(threads)
        if engine is None:
            model, tok = (slm_loader or _default_loader)(cfg)
            engine = Engine(model, tok, cfg)
        self.cfg, self.engine = cfg, engine
        self.reward_fn = reward_fn if reward_fn is not None else _default_reward(cfg, engine.model, engine.tok)
        self.evaluator = _evaluator_for(checkpoint, engine)

    def play(self, i:int, item:dict, seed:int) -> tuple:
        ep = play_selfplay_episode(self.engine, item, self.evaluator, self.reward_fn, self.cfg, seed=seed)
        return i, ep, self.engine.fingerprint

# %% [markdown]
# The worker process loop (spawned, never forked: torch and tokenizers do not survive `fork` with threads):
# play the assigned episodes, send each back on a queue, report an exception with its traceback.

# %%
#| export
def _worker_main(w:int, cfg:Config, jobs:list, checkpoint, reward_fn, slm_loader, out, threads:int):
    try:
        p = _Player(cfg, checkpoint, reward_fn, slm_loader, threads=threads)
        for i, item, seed in jobs: out.put(('episode', w, p.play(i, item, seed)))
        out.put(('done', w, None))
    except BaseException:
        out.put(('error', w, traceback.format_exc()))

def _local_episodes(cfg, jobs, checkpoint, reward_fn, slm_loader, engine, workers):
    "Yield (i, Episode, fingerprint) as episodes finish, from this process or `workers` spawned processes."
    if workers == 1:
        p = _Player(cfg, checkpoint, reward_fn, slm_loader, engine)
        for i, item, seed in jobs: yield p.play(i, item, seed)
        return
    from research_controller import selfplay as this  # the spawned child imports the target from the installed module
    ctx = mp.get_context('spawn')
    q = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1)//workers)
    procs = [ctx.Process(target=this._worker_main, args=(w, cfg, jobs[w::workers], checkpoint, reward_fn, slm_loader, q, threads), daemon=True)
             for w in range(workers)]
    for p in procs: p.start()
    running = set(range(workers))
    try:
        while running:
            try: kind, w, payload = q.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w in running if not procs[w].is_alive() and procs[w].exitcode not in (0, None)]
                if dead: raise RuntimeError(f"self-play worker {dead[0]} died with exit code {procs[dead[0]].exitcode} before reporting (see its "
                                            "stderr; reward_fn and slm_loader must be importable: module-level, not defined in __main__).")
                continue
            if kind == 'episode': yield payload
            elif kind == 'done': running.discard(w)
            else: raise RuntimeError(f"self-play worker {w} failed:\n{payload}")
    finally:
        for p in procs:
            if p.is_alive(): p.terminate()
        for p in procs: p.join(timeout=10)

# %% [markdown]
# Ray: one actor per worker, each loading the SLM once; episodes are handed out one at a time and collected as
# they finish. Ray is an optional dependency (the `[distributed]` extra).

# %%
#| export
RAY_HINT = "pip install 'research_controller[distributed]' (or pip install ray==2.60.0)"

def _ray_episodes(cfg, jobs, checkpoint, reward_fn, slm_loader, workers):
    try: import ray
    except ImportError:
        raise ImportError(f"selfplay.backend='ray' needs Ray, which is not installed. Fix: {RAY_HINT}, or set selfplay.backend=local.") from None
    started = not ray.is_initialized()  # a Ray instance we start is shut down at the end; a running one is left alone
    if started: ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False)
    from research_controller import selfplay as this  # the actors import the class from the installed module
    threads = max(1, (os.cpu_count() or 1)//workers)
    Actor = ray.remote(num_cpus=1)(this._Player)
    actors = [Actor.remote(cfg, checkpoint, reward_fn, slm_loader, None, threads) for _ in range(workers)]
    todo, pending = list(jobs), {}
    try:
        for a in actors:
            if todo: j = todo.pop(0); pending[a.play.remote(*j)] = a
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            a = pending.pop(done[0])
            yield ray.get(done[0])
            if todo: j = todo.pop(0); pending[a.play.remote(*j)] = a
    finally:
        for a in actors: ray.kill(a)
        if started: ray.shutdown()

# %% [markdown]
# `run_selfplay` itself. The buffer is opened at the first finished episode (its dimension comes from the
# engine that played it) and episodes are committed in episode order.

# %%
#| export
@dataclass
class SelfPlaySummary:
    "What a self-play run wrote."
    episodes: int
    positions: int
    episode_ids: list
    mean_reward: float
    seconds: float
    buffer_path: str
    rewards: list = field(default_factory=list)
    serials: list = field(default_factory=list)
    controller_version: str = 'uniform'
    def __repr__(self):
        return (f"SelfPlaySummary(episodes={self.episodes}, positions={self.positions}, mean_reward={self.mean_reward:.3f}, "
                f"controller_version={self.controller_version!r})")

def default_buffer_path(cfg:Config) -> Path:
    "Where self-play writes by default: `<runs>/<selfplay.out_dir>/buffer`."
    return run_path(cfg, cfg.selfplay.out_dir)/'buffer'

def _meta(ep:Episode, eid:str, version:str, fp:str, chash:str, i:int) -> dict:
    return dict(episode_id=eid, controller_version=version, slm_fingerprint=fp, reward=ep.reward, value=ep.value,
                reward_terms=ep.terms, task=ep.task, prompt_id=ep.item_id, seed=ep.seed, index=i, actions=ep.actions,
                tokens=ep.tokens, search_tokens=ep.search_tokens, text=ep.text, config_hash=chash)

# %%
#| export
def run_selfplay(cfg:Config, # the config (`selfplay`, `mcts`, `buffer`, `macro`, ...)
                 checkpoint:str|Path|None=None, # policy/value checkpoint guiding the search; None = uniform priors, value 0
                 episodes:int|None=None, # number of episodes; None = selfplay.episodes
                 buffer_path:str|Path|None=None, # replay buffer directory; None = default_buffer_path(cfg)
                 seed:int|None=None, # None = selfplay.seed
                 progress:bool=True, # show a tqdm bar
                 reward_fn:Callable|None=None, # (text, item, n_tokens, unclosed_thought) -> RewardBreakdown; None = RewardCalculator
                 slm_loader:Callable|None=None, # cfg -> (model, tok) in each worker; None = load_slm
                 engine=None, # an existing Engine to use (one worker, in this process)
                 items:list|None=None, # task items to play; None = selfplay_items(cfg, episodes, seed)
                ) -> SelfPlaySummary:
    "Play self-play episodes and commit each to the replay buffer as it finishes."
    sp = cfg.selfplay
    episodes = sp.episodes if episodes is None else int(episodes)
    if episodes < 1: raise ValueError(f"episodes must be >= 1, got {episodes}.")
    seed = sp.seed if seed is None else int(seed)
    workers = 1 if engine is not None else sp.workers
    if sp.backend == 'ray' and engine is not None: raise ValueError("engine= runs in this process; it cannot be combined with selfplay.backend='ray'.")
    items = items if items is not None else selfplay_items(cfg, episodes, seed)
    if len(items) < episodes: raise ValueError(f"{len(items)} items for {episodes} episodes.")
    version, chash = checkpoint_version(checkpoint), config_hash(cfg)
    path = Path(buffer_path) if buffer_path is not None else default_buffer_path(cfg)
    jobs = [(i, items[i], episode_seed(seed, i)) for i in range(episodes)]
    t0 = time.perf_counter()
    gen = (_ray_episodes(cfg, jobs, checkpoint, reward_fn, slm_loader, workers) if sp.backend == 'ray'
           else _local_episodes(cfg, jobs, checkpoint, reward_fn, slm_loader, engine, workers))
    buf, ready, nxt = None, {}, 0
    ids, rewards, serials, positions = [], [], [], 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=episodes, desc='self-play', unit='episode')
    try:
        for i, ep, fp in gen:
            ready[i] = (ep, fp)
            while nxt in ready:
                ep, fp = ready.pop(nxt)
                if buf is None: buf = ReplayBuffer(path, ep.states.shape[1], N_ACTIONS, cfg.buffer.capacity, cfg.buffer.dtype,
                                                   sampling=cfg.buffer.sampling, half_life=cfg.buffer.recency_half_life)
                eid = f"sp-{version}-s{seed}-e{nxt:05d}"
                values = np.full(len(ep.policies), ep.value, np.float32)
                serials.append(buf.add_episode(ep.states, ep.masks, ep.policies, values, _meta(ep, eid, version, fp, chash, nxt)))
                ids.append(eid); rewards.append(ep.reward); positions += len(ep.policies); nxt += 1
                if bar is not None: bar.update(1); bar.set_postfix(reward=f"{np.mean(rewards):.3f}")
    finally:
        if bar is not None: bar.close()
        if buf is not None: buf.close()
        gen.close()
    return SelfPlaySummary(len(ids), positions, ids, float(np.mean(rewards)), time.perf_counter() - t0, str(path),
                           rewards, serials, version)

# %%
tmp = Path(tempfile.mkdtemp())
sm = run_selfplay(cfg0, episodes=3, buffer_path=tmp/'buf', seed=0, progress=False, reward_fn=LengthReward(4), engine=eng)
with ReplayBuffer(tmp/'buf', eng.feature_dim, N_ACTIONS, cfg0.buffer.capacity, cfg0.buffer.dtype, readonly=True) as rb:
    test_eq(len(rb), sm.positions)
    test_eq(rb.episode_serials(), [0, 1, 2])
    m = rb.episode_meta(1)
    test_eq((m['episode_id'], m['controller_version'], m['slm_fingerprint']), (sm.episode_ids[1], 'uniform', eng.fingerprint))
    test_eq(m['task'], 'squad')  # round-robin: wikitext, squad, gsm8k
    test_eq(set(m['reward_terms']), {'length', 'unclosed_thought'})
    b = rb.sample(4, np.random.default_rng(0))
test_close(sm.mean_reward, np.mean(sm.rewards))
sm, m['actions']

# %% [markdown]
# ## A killed run loses nothing it wrote
# A subprocess plays self-play into a buffer; as soon as its first episode is committed it is killed with
# `SIGKILL`. Reopening the buffer recovers every committed episode intact, with its metadata, and never a
# half-written one.

# %%
bufk = tmp/'killed'
child = textwrap.dedent(f"""
    import torch; torch.set_num_threads(1)
    from research_controller.config import load_config
    from research_controller.slm import tiny_slm
    from research_controller.selfplay import run_selfplay, LengthReward
    cfg = load_config(overrides={list(f'{k}={v}' for k, v in [('features.drift_embedder', 'slm'), ('macro.chunk_tokens', 4),
                                 ('selfplay.max_new_tokens', 16), ('mcts.n_sims', 6), ('mcts.leaf_batch', 3)])!r})
    run_selfplay(cfg, episodes=200, buffer_path={str(bufk)!r}, progress=False, reward_fn=LengthReward(4),
                 slm_loader=lambda c: tiny_slm(c, seed=0))
""")
p = subprocess.Popen([sys.executable, '-c', child], stderr=subprocess.PIPE, text=True)
t0 = time.time()
while time.time() - t0 < 120 and p.poll() is None:
    log_f = bufk/'log.jsonl'
    if log_f.exists() and log_f.read_bytes().count(b'\n') >= 1: break
    time.sleep(0.05)
os.kill(p.pid, signal.SIGKILL); p.wait()
test_eq(p.returncode, -signal.SIGKILL)  # killed, not finished
with ReplayBuffer(bufk, eng.feature_dim, N_ACTIONS, cfg0.buffer.capacity, cfg0.buffer.dtype) as rb:  # the writer reopens and recovers
    ser = rb.episode_serials()
    test_eq(len(ser) >= 1, True)
    test_eq(ser, list(range(len(ser))))
    metas = [rb.episode_meta(s) for s in ser]
    test_eq(len(rb), sum(len(m['actions']) for m in metas))  # every committed position, no partial episode
    test_eq(all(m['slm_fingerprint'] == eng.fingerprint for m in metas), True)
    n_pos = len(rb)
len(ser), n_pos

# %% [markdown]
# ## Worker processes
# With `selfplay.workers = 2` the episodes are played by two spawned processes, each loading the SLM
# itself; the buffer gets the same episodes in the same order as with one worker. (`slm_loader` and
# `reward_fn` are sent to the workers, so they must be picklable: module-level functions, `functools.partial`,
# or objects like `LengthReward` imported from the package, not defined in a notebook.)

# %%
from research_controller import selfplay as sp_mod  # what the workers import
cfg2 = replace_config(cfg0, ['selfplay.workers=2'])
sm2 = run_selfplay(cfg2, episodes=4, buffer_path=tmp/'w2', seed=7, progress=False, reward_fn=sp_mod.LengthReward(4),
                   slm_loader=functools.partial(tiny_slm, seed=0))
sm1 = run_selfplay(cfg0, episodes=4, buffer_path=tmp/'w1', seed=7, progress=False, reward_fn=LengthReward(4), engine=eng)
def metas(p):
    with ReplayBuffer(p, eng.feature_dim, N_ACTIONS, cfg0.buffer.capacity, cfg0.buffer.dtype, readonly=True) as rb:
        return [(rb.episode_meta(s)['prompt_id'], rb.episode_meta(s)['actions'], rb.episode_meta(s)['text']) for s in rb.episode_serials()]
test_eq(metas(tmp/'w2'), metas(tmp/'w1'))
test_eq(sm2.episode_ids, sm1.episode_ids)
sm2

# %% [markdown]
# Without Ray installed, the Ray backend says how to get it (simulated here by hiding the module):

# %%
saved_ray = sys.modules.get('ray')
sys.modules['ray'] = None  # `import ray` now raises ImportError
try:
    test_fail(lambda: run_selfplay(replace_config(cfg0, ['selfplay.backend=ray']), episodes=1, buffer_path=tmp/'r', progress=False,
                                   reward_fn=LengthReward(4), slm_loader=functools.partial(tiny_slm, seed=0)), contains='pip install')
finally:
    if saved_ray is None: del sys.modules['ray']
    else: sys.modules['ray'] = saved_ray

# %% [markdown]
# With Ray installed, a local Ray instance runs two actors (slow: starting Ray takes a while):

# %%
#| slow
try:
    import ray; has_ray = True
except ImportError: has_ray = False
if has_ray:
    smr = run_selfplay(replace_config(cfg0, ['selfplay.backend=ray', 'selfplay.workers=2']), episodes=4, buffer_path=tmp/'ray',
                       seed=7, progress=False, reward_fn=sp_mod.LengthReward(4), slm_loader=functools.partial(tiny_slm, seed=0))
    test_eq(metas(tmp/'ray'), metas(tmp/'w1'))
    test_eq(ray.is_initialized(), False)  # the instance self-play started is shut down again
    print(smr)

# %% [markdown]
# ## Controllers driven by the network
# `PolicyController` is the controller that gets promoted: no search at all, the network's masked policy
# picks the argmax legal action at each decision. Its `generate` has the interface of the baselines in
# `04_engine`.

# %%
#| export
class PolicyController:
    "Network-only controller: at each decision the argmax of the masked policy over legal actions."
    def __init__(self, net:PolicyValueNet, cfg:Config|None=None, name:str|None=None, version:str|None=None,
                 slm_fingerprint:str|None=None, # the SLM the network was trained on; checked against the engine's
                ):
        self.net, self.cfg = net.eval(), cfg or load_config()
        self.name, self.version, self.slm_fingerprint = name or 'policy', version, slm_fingerprint
        self.evaluator = make_evaluator(net)

    def _check(self, engine):
        if engine.feature_dim != self.net.in_dim:
            raise CheckpointError(f"controller {self.name!r} expects feature_dim={self.net.in_dim} but the engine gives {engine.feature_dim}; "
                                  "use the SLM the controller was trained with.")
        if self.slm_fingerprint is not None and engine.fingerprint != self.slm_fingerprint:
            raise CheckpointError(f"controller {self.name!r} was trained with slm_fingerprint={self.slm_fingerprint!r}, the engine has "
                                  f"{engine.fingerprint!r}; load the SLM it was trained with (slm.source) or train a new controller.")

    def decide(self, engine, gs) -> tuple[int, np.ndarray, float]:
        "(action, policy, value) at state `gs`."
        m = engine.legal_mask(gs)
        p, v = self.evaluator(engine.features(gs)[None], m[None])
        return int(np.argmax(np.where(m, p[0], -1))), p[0], float(v[0])

    def generate(self, engine, prompt:str, max_new_tokens:int|None=None, seed:int=0, include_thoughts:bool=False, item:dict|None=None):
        "Generate under a total budget of `max_new_tokens` (None = macro.max_new_tokens); returns a `GenerationResult`."
        self._check(engine)
        t0 = time.perf_counter()
        gs = engine.new_state(prompt, max_new_tokens, seed=seed)
        notes, values = {}, []
        while not engine.is_done(gs):
            a, p, v = self.decide(engine, gs)
            notes[len(values)] = dict(policy=[round(float(x), 4) for x in p], value=round(v, 4))
            values.append(round(v, 4))
            engine.step(gs, a)
        res = _engine_result(engine, gs, include_thoughts, notes)
        res.latency_ms = round((time.perf_counter() - t0)*1000, 3)
        res.meta.update(controller=self.name, version=self.version, values=values)
        return res

    def __repr__(self): return f"PolicyController(name={self.name!r}, version={self.version!r}, body={self.net.cfg.body!r})"

# %%
torch.manual_seed(0)
net = PolicyValueNet(eng.feature_dim, N_ACTIONS, cfg0.network)
pc = PolicyController(net, cfg0, version='v-test')
r = pc.generate(eng, "Name a river.", max_new_tokens=16, seed=0)
test_eq(r.tokens <= 16, True)
test_eq(len(r.meta['values']), len(r.macro_trace))
test_eq(r.meta['version'], 'v-test')
test_eq([e['value'] for e in r.macro_trace], r.meta['values'])  # the network's view of each decision is in the trace
test_eq(pc.generate(eng, "Name a river.", max_new_tokens=16, seed=0).text, r.text)  # deterministic
test_fail(lambda: PolicyController(PolicyValueNet(10, N_ACTIONS)).generate(eng, "x", 8), contains='feature_dim=10')
r.text, [t['action'] for t in r.macro_trace]

# %% [markdown]
# A network that prefers one action makes the controller play it whenever it is legal: with the policy bias
# pushed towards THINK_BEGIN, every decision outside a thought opens one.

# %%
with torch.no_grad():
    net.policy_head.weight.zero_(); net.policy_head.bias.copy_(torch.tensor([0., 5., 0., 0., 0.]))
acts = [t['action'] for t in PolicyController(net, cfg0).generate(eng, "Name a river.", 16).macro_trace]
test_eq(acts[0] in ('THINK_BEGIN', Action.THINK_BEGIN, 1), True)
acts

# %% [markdown]
# `MCTSController` searches at inference time. Under the equal-budget rule every token the search decodes
# counts: the played path gets `1 - search_share` of `max_new_tokens`, the searches share the rest, and a
# search only runs as many simulations as its remaining share can pay for in the worst case (every
# simulation expanding a chunk). When the share is spent it decides with the network alone.
# `GenerationResult.tokens` is every token forwarded: search expansions plus path steps not already
# expanded by a search.

# %%
#| export
class MCTSController:
    "Search-at-inference controller: MCTS with the network per decision; search tokens count toward the budget."
    def __init__(self, net:PolicyValueNet, cfg:Config|None=None, n_sims:int|None=None, search_share:float=0.5,
                 name:str|None=None, version:str|None=None, slm_fingerprint:str|None=None,
                 on_search:Sequence[Callable]=()): # callbacks `f(decision, mcts, result)` after each search, before its move
        if not 0 <= search_share < 1: raise ValueError(f"search_share must lie in [0, 1), got {search_share}.")
        self.policy = PolicyController(net, cfg, name or 'mcts', version, slm_fingerprint)
        self.cfg, self.n_sims, self.search_share = self.policy.cfg, n_sims or self.policy.cfg.mcts.n_sims, search_share
        self.name, self.version = self.policy.name, version
        self.on_search = list(on_search) if isinstance(on_search, (list, tuple)) else [on_search]

    def generate(self, engine, prompt:str, max_new_tokens:int, seed:int=0, include_thoughts:bool=False, item:dict|None=None):
        "Generate with search under a TOTAL budget of `max_new_tokens` (search included); returns a `GenerationResult`."
        self.policy._check(engine)
        path_budget = max(1, int(round(max_new_tokens*(1 - self.search_share))))
        pool = max_new_tokens - path_budget
        env = SelfPlayEnv(engine, None, item, bounds=(-1, 1))  # no reward model at inference
        mcts = MCTS(_ValueEnv(env, self.policy), self.policy.evaluator, self.cfg.mcts, seed=seed)
        worst = self.cfg.macro.chunk_tokens + 1
        state = env.root(prompt, path_budget, seed=seed)
        search_tokens = extra = 0
        trace = []
        while not env.is_terminal(state):
            n = min(self.n_sims, (pool - search_tokens)//worst)
            if n >= 1:
                r = mcts.search(state, n_sims=n)
                for f in self.on_search: f(len(trace), mcts, r)  # e.g. snapshot the tree (report.search_trees)
                search_tokens += r.tokens_spent
                a, child_known = r.action, mcts.root.children[r.action] is not None
                trace.append(r.to_trace(list(ACTION_NAMES)))
                before = env.tokens_spent(state)
                state = mcts.advance(a)
                if not child_known: extra += env.tokens_spent(state) - before
            else:
                a, _, _ = self.policy.decide(engine, state.gs)
                trace.append(dict(action=ACTION_NAMES[a], n_sims=0))
                before = env.tokens_spent(state)
                state = env.expand([state], [a])[0]; mcts.reset()
                extra += env.tokens_spent(state) - before
        res = _engine_result(engine, state.gs, include_thoughts, {i: dict(search=t) for i, t in enumerate(trace)})
        res.meta.update(controller=self.name, version=self.version, search=trace, search_tokens=search_tokens,
                        path_tokens=int(res.tokens), path_budget=path_budget)
        return dataclasses.replace(res, tokens=int(search_tokens + extra))

    def __repr__(self): return f"MCTSController(n_sims={self.n_sims}, search_share={self.search_share}, version={self.version!r})"

class _ValueEnv:
    "An engine env whose finished states are scored by the value head (no reward model at inference)."
    def __init__(self, env:SelfPlayEnv, policy:PolicyController): self.env, self.policy = env, policy
    def __getattr__(self, k): return getattr(self.env, k)
    def terminal_value(self, s) -> float:
        "Finished text: the value head's estimate at the last decision's features (a terminal state has no legal move to mask)."
        f = self.env.features(s)
        _, v = self.policy.evaluator(f[None], np.ones((1, N_ACTIONS), bool))
        return float(np.clip(v[0], -1, 1))

# %%
mc = MCTSController(PolicyValueNet(eng.feature_dim, N_ACTIONS, cfg0.network), cfg0, n_sims=4)
r = mc.generate(eng, "Name a river.", max_new_tokens=32, seed=0)
test_eq(r.tokens <= 32, True)  # the equal-budget rule, search included
test_eq(r.tokens >= r.meta['path_tokens'], True)
test_eq(r.meta['search_tokens'] > 0, True)
test_eq(r.meta['path_budget'], 16)
test_eq([e['search']['n_sims'] for e in r.macro_trace], [t['n_sims'] for t in r.meta['search']])
seen = []
r2 = MCTSController(mc.policy.net, cfg0, n_sims=4, on_search=[lambda i, m, sr: seen.append((i, int(m.root.N.sum()), sr.action))]).generate(
    eng, "Name a river.", max_new_tokens=32, seed=0)
test_eq([i for i, _, _ in seen], [i for i, t in enumerate(r2.meta['search']) if t['n_sims']])  # once per searched decision
test_eq([n for _, n, _ in seen], [t['n_sims'] + t['reused_visits'] for t in r2.meta['search'] if t['n_sims']])   # called before the move
test_eq(r2.text, r.text)  # watching changes nothing
r.tokens, r.meta['search_tokens'], r.meta['path_tokens'], [s['n_sims'] for s in r.meta['search']]

# %% [markdown]
# ## Loading a trained controller
# `load_controller` turns a checkpoint into the `PolicyController` that evaluation, promotion and the service
# use. The checkpoint's SLM fingerprint is checked against the engine on the first `generate`.

# %%
#| export
def load_controller(checkpoint_path:str|Path, cfg:Config|None=None, name:str|None=None) -> PolicyController:
    "A `PolicyController` from a `save_checkpoint` file."
    net, info = load_checkpoint(checkpoint_path, action_names=ACTION_NAMES)
    version = info['extra'].get('version') or checkpoint_version(checkpoint_path)
    return PolicyController(net, cfg, name=name or 'policy', version=version, slm_fingerprint=info['slm_fingerprint'])

# %%
from research_controller.network import save_checkpoint
torch.manual_seed(1)
n1 = PolicyValueNet(eng.feature_dim, N_ACTIONS, cfg0.network)
ck = save_checkpoint(n1, tmp/'c.pt', eng.fingerprint, ACTION_NAMES, cfg0, extra=dict(version='v7'))
lc = load_controller(ck, cfg0)
test_eq(lc.version, 'v7')
test_eq(lc.generate(eng, "Name a river.", 16).text, PolicyController(n1, cfg0).generate(eng, "Name a river.", 16).text)
save_checkpoint(n1, tmp/'other.pt', '0'*16, ACTION_NAMES, cfg0)
test_fail(lambda: load_controller(tmp/'other.pt', cfg0).generate(eng, "x", 8), contains='slm_fingerprint')
lc

# %% [markdown]
# Self-play guided by that checkpoint records its version:

# %%
sm3 = run_selfplay(cfg0, checkpoint=ck, episodes=1, buffer_path=tmp/'ck', progress=False, reward_fn=LengthReward(4), engine=eng)
test_eq(sm3.controller_version, 'v7')
test_eq(sm3.episode_ids[0].startswith('sp-v7-'), True)
sm3
