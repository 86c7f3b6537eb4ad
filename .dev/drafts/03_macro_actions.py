# %%
#| default_exp macro_actions

# %% [markdown]
# # Macro-actions
# > The five moves a controller makes while the SLM writes: their legality rules, and what each one asks the engine to emit.

# %%
#| export
from __future__ import annotations
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Callable, Optional
import numpy as np
from research_controller.config import Config, MacroConfig, load_config

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close

# %% [markdown]
# A controller never picks tokens. At each decision point it picks one of five macro-actions and the
# engine (`04_engine`) turns it into tokens:
#
# | action | what the engine does | tokens spent |
# |---|---|---|
# | `CONTINUE` | emit a chunk of up to `macro.chunk_tokens` tokens (greedy, or sampled at `macro.temperature`) | the chunk |
# | `THINK_BEGIN` | append the thought-open token; later chunks are hidden thought text | 1 |
# | `THINK_END` | append the thought-close token | 1 |
# | `RESAMPLE` | drop the last chunk (and its KV) and regenerate it at `macro.resample_temperature` | the new chunk (the dropped one stays spent) |
# | `STOP` | end the episode | 0 |
#
# This module is pure bookkeeping, with no model in it: a small immutable `MacroState` per decision point,
# the legality mask, and one *planner* per action that says which tokens to emit. That keeps the rules
# testable at fuzzing speed and the engine free of special cases.

# %%
#| export
class Action(IntEnum):
    "The macro-actions, with stable ids (they index policy outputs and replay-buffer columns)."
    CONTINUE = 0
    THINK_BEGIN = 1
    THINK_END = 2
    RESAMPLE = 3
    STOP = 4

N_ACTIONS = len(Action)
ACTION_NAMES = tuple(a.name for a in Action)

class MacroActionError(ValueError):
    "An action that is illegal in the current state; the message says why and which actions are legal."

# %%
test_eq(N_ACTIONS, 5)
test_eq(Action(3), Action.RESAMPLE)
ACTION_NAMES

# %% [markdown]
# ## The macro state
# Everything legality depends on, after each decision. `prev` is the state before the last chunk, which is
# what a `RESAMPLE` goes back to (it is not compared: two states are equal when their counters are).
# `spent` counts every token forwarded through the SLM, including chunks that were later resampled
# away: that is the equal-budget rule every controller is measured by.

# %%
#| export
@dataclass(frozen=True)
class MacroState:
    "Counters of one generation at a decision point (immutable; each action returns a new one)."
    budget: int  # total tokens this episode may spend (max_new_tokens)
    spent: int = 0  # tokens forwarded so far, discarded ones included
    in_thought: bool = False  # inside a thought span (thought depth 1)
    thought_len: int = 0  # tokens inside the current thought
    last: str = 'prompt'  # what the last segment was: 'prompt', 'chunk', 'open', 'close'
    resamples: int = 0  # how often the last chunk has been resampled
    done: bool = False
    reason: Optional[str] = None  # why it ended: 'stop', 'eos' or 'budget'
    n_thoughts: int = 0  # thought spans opened so far
    kept: int = 0  # generated tokens in the current sequence (not counting resampled-away chunks)
    prev: Optional['MacroState'] = field(default=None, compare=False, repr=False)

    @property
    def left(self) -> int: return self.budget - self.spent
    @property
    def depth(self) -> int: return int(self.in_thought)

# %%
MacroState(budget=16)

# %% [markdown]
# ## Legality
# The rules, each with the reason `MacroActionError` gives when it is broken:
#
# - nothing is legal once the episode is done (STOP, end-of-sequence, or the budget spent);
# - `CONTINUE` needs a token of budget left (two inside a thought: the last one is kept for the close token);
# - `THINK_BEGIN`: no nested thoughts, `macro.max_thought_tokens > 0`, and room for the open *and* close token
#   (an empty thought is allowed);
# - `THINK_END` only inside a thought;
# - `RESAMPLE` only right after a chunk, at most `macro.max_resamples_per_chunk` times per chunk, and only
#   when the regenerated chunk can hold at least one token;
# - `STOP` not inside a thought (a thought is always closed before the episode ends).
#
# Two rules keep thoughts well-formed without the controller's help: a thought chunk is cut so that one
# token of budget is always left for the close token, and a thought that reaches `macro.max_thought_tokens`
# is closed by the engine. Hence inside a thought `left >= 1` and `thought_len < max_thought_tokens` always hold.

# %%
#| export
def _chunk(base:MacroState, mc:MacroConfig, spent:int):
    "(n_sample, close_after) of a chunk extending `base` when `spent` tokens are already spent."
    left = base.budget - spent
    if not base.in_thought: return min(mc.chunk_tokens, left), False
    n = min(mc.chunk_tokens, mc.max_thought_tokens - base.thought_len, left - 1)
    return n, (base.thought_len + n >= mc.max_thought_tokens) or (left - n == 1)

def _why_illegal(ms:MacroState, a:Action, mc:MacroConfig) -> Optional[str]:
    "None when `a` is legal in `ms`, else the reason."
    if ms.done: return f"the episode is over ({ms.reason})"
    if a == Action.CONTINUE:
        if ms.in_thought and ms.left < 2: return "the last token of budget is reserved for the thought's close token; use THINK_END"
        return None if ms.left >= 1 else "no token budget left"
    if a == Action.THINK_BEGIN:
        if ms.in_thought: return "a thought is already open (thoughts do not nest)"
        if mc.max_thought_tokens < 1: return "thoughts are disabled (macro.max_thought_tokens = 0)"
        if ms.left < 2: return f"{ms.left} token(s) of budget left, a thought needs 2 (open and close)"
        return None
    if a == Action.THINK_END:
        return None if ms.in_thought else "no thought is open"
    if a == Action.RESAMPLE:
        if ms.last != 'chunk' or ms.prev is None: return f"there is no chunk to replace (the last segment is the {ms.last})"
        if ms.resamples >= mc.max_resamples_per_chunk:
            return f"this chunk was already resampled {ms.resamples} time(s), the limit is macro.max_resamples_per_chunk = {mc.max_resamples_per_chunk}"
        if _chunk(replace(ms.prev, spent=ms.spent), mc, ms.spent)[0] < 1:
            return "no token budget left to regenerate the chunk (inside a thought the last token is kept for the close)"
        return None
    if a == Action.STOP:
        return "a thought is open; close it with THINK_END first" if ms.in_thought else None
    raise MacroActionError(f"unknown action {a!r}; actions are {list(ACTION_NAMES)}")

def legal_mask(ms:MacroState, mc:MacroConfig) -> np.ndarray:
    "Boolean mask over `Action` ids of the actions legal in `ms`."
    return np.array([_why_illegal(ms, a, mc) is None for a in Action], dtype=np.bool_)

def check_action(ms:MacroState, a, mc:MacroConfig) -> Action:
    "Return `a` as an `Action`, or raise `MacroActionError` saying why it is illegal and what is legal."
    try: a = Action(int(a))
    except (ValueError, TypeError):
        raise MacroActionError(f"{a!r} is not an action; use one of {dict(enumerate(ACTION_NAMES))}") from None
    why = _why_illegal(ms, a, mc)
    if why is not None:
        legal = [n for n, ok in zip(ACTION_NAMES, legal_mask(ms, mc)) if ok]
        raise MacroActionError(f"{a.name} is illegal: {why}. Legal now: {legal or 'nothing (episode over)'}.")
    return a

# %%
mc = MacroConfig()
ms0 = MacroState(budget=16)
test_eq(legal_mask(ms0, mc), [True, True, False, False, True])
test_fail(lambda: check_action(ms0, Action.THINK_END, mc), contains="THINK_END is illegal: no thought is open")
test_fail(lambda: check_action(ms0, 7, mc), contains="7 is not an action")
{n: bool(ok) for n, ok in zip(ACTION_NAMES, legal_mask(ms0, mc))}

# %% [markdown]
# ## Plans: what each action emits
# A `Plan` tells the engine which tokens to forward from which state: forced tokens first (`head`, symbolic:
# `'open'`/`'close'`), then up to `n_sample` sampled tokens, then an optional forced close (`close_after`)
# when a thought reaches its cap or the budget's last token. `base` is the state the tokens extend: the
# current one, except for `RESAMPLE`, whose base is the state before the chunk it replaces.

# %%
#| export
@dataclass(frozen=True)
class Plan:
    "Tokens one action asks the engine to emit."
    action: Action
    base: MacroState  # state the new tokens extend (counters of `spent` already current)
    head: tuple = ()  # forced symbolic tokens first: 'open' / 'close'
    n_sample: int = 0  # most tokens to sample after the head
    mode: str = 'continue'  # sampling settings: 'continue' (macro.temperature) or 'resample' (macro.resample_temperature)
    thought: bool = False  # the sampled tokens are inside a thought (EOS closes the thought instead of ending)
    close_after: bool = False  # force a close token after the sampled tokens (thought cap or last budget token)
    drop_last: bool = False  # the last chunk is discarded first (RESAMPLE)
    resamples: int = 0  # resample count the new chunk carries

    @property
    def max_tokens(self) -> int: return len(self.head) + self.n_sample + int(self.close_after)

# %% [markdown]
# The planners: one callable per action id, looked up through `ACTION_PLANNERS` (also reachable as
# `Action.X.planner`). A chunk is `macro.chunk_tokens` long unless the budget or the thought cap cuts it.

# %%
#| export
def plan_continue(ms:MacroState, mc:MacroConfig) -> Plan:
    n, close = _chunk(ms, mc, ms.spent)
    return Plan(Action.CONTINUE, ms, n_sample=n, thought=ms.in_thought, close_after=close)

def plan_think_begin(ms:MacroState, mc:MacroConfig) -> Plan: return Plan(Action.THINK_BEGIN, ms, head=('open',))
def plan_think_end(ms:MacroState, mc:MacroConfig) -> Plan: return Plan(Action.THINK_END, ms, head=('close',))

def plan_resample(ms:MacroState, mc:MacroConfig) -> Plan:
    base = replace(ms.prev, spent=ms.spent)
    n, close = _chunk(base, mc, ms.spent)
    return Plan(Action.RESAMPLE, base, n_sample=n, mode='resample', thought=base.in_thought, close_after=close,
                drop_last=True, resamples=ms.resamples + 1)

def plan_stop(ms:MacroState, mc:MacroConfig) -> Plan: return Plan(Action.STOP, ms)

ACTION_PLANNERS: dict[Action, Callable[[MacroState, MacroConfig], Plan]] = {
    Action.CONTINUE: plan_continue, Action.THINK_BEGIN: plan_think_begin, Action.THINK_END: plan_think_end,
    Action.RESAMPLE: plan_resample, Action.STOP: plan_stop}
Action.planner = property(lambda self: ACTION_PLANNERS[self])

def plan_action(ms:MacroState, a, mc:MacroConfig) -> Plan:
    "The `Plan` of action `a` in `ms` (raises `MacroActionError` when illegal)."
    a = check_action(ms, a, mc)
    return ACTION_PLANNERS[a](ms, mc)

# %%
p = plan_action(MacroState(budget=5), Action.CONTINUE, mc)
test_eq((p.n_sample, p.close_after, p.max_tokens), (5, False, 5))
test_eq(Action.STOP.planner, plan_stop)
p

# %% [markdown]
# ## Applying a plan
# After the engine ran a plan it reports how many tokens it sampled and whether the last one was the
# end-of-sequence token. Outside a thought EOS ends the episode; inside a thought the engine writes the
# close token in its place (the model "is done thinking"), so EOS never leaves a thought open.

# %%
#| export
def apply_plan(plan:Plan, n_sampled:Optional[int]=None, eos:bool=False) -> MacroState:
    "The state after the engine executed `plan`: it sampled `n_sampled` tokens (default all), the last one EOS if `eos`."
    b, a = plan.base, plan.action
    if a == Action.STOP: return replace(b, done=True, reason='stop')
    n = plan.n_sample if n_sampled is None else n_sampled
    if not (n == plan.n_sample or (eos and 1 <= n <= plan.n_sample)):
        raise ValueError(f"{a.name} planned {plan.n_sample} sampled tokens; got {n} (fewer only when the last is EOS)")
    if a in (Action.THINK_BEGIN, Action.THINK_END):
        opening = a == Action.THINK_BEGIN
        s = replace(b, spent=b.spent + 1, kept=b.kept + 1, in_thought=opening, thought_len=0, last='open' if opening else 'close',
                    resamples=0, n_thoughts=b.n_thoughts + opening, prev=b)
    elif plan.thought:  # a chunk inside a thought; EOS becomes the close token
        closes = eos or plan.close_after
        extra = int(closes and not eos)
        s = replace(b, spent=b.spent + n + extra, kept=b.kept + n + extra, in_thought=not closes,
                    thought_len=0 if closes else b.thought_len + n, last='chunk', resamples=plan.resamples, prev=b)
    else:
        s = replace(b, spent=b.spent + n, kept=b.kept + n, last='chunk', resamples=plan.resamples, prev=b)
        if eos: s = replace(s, done=True, reason='eos')
    if not s.done and s.left <= 0: s = replace(s, done=True, reason='budget')
    return s

def step_macro(ms:MacroState, a, mc:MacroConfig, n_sampled:Optional[int]=None, eos:bool=False) -> MacroState:
    "Check, plan and apply action `a` in one go (the symbolic twin of `Engine.step`)."
    return apply_plan(plan_action(ms, a, mc), n_sampled, eos)

# %% [markdown]
# A short episode: a chunk, a thought that the model ends itself with EOS, an answer chunk that is
# resampled, then STOP. `kept` counts the tokens that are in the final sequence, `spent` everything.

# %%
mc = MacroConfig(chunk_tokens=4, max_thought_tokens=6, max_resamples_per_chunk=1)
ms = MacroState(budget=30)
ms = step_macro(ms, Action.CONTINUE, mc)               # 4 answer tokens
ms = step_macro(ms, Action.THINK_BEGIN, mc)            # open
ms = step_macro(ms, Action.CONTINUE, mc, 2, eos=True)  # 2 thought tokens, the 2nd (EOS) becomes the close
test_eq((ms.in_thought, ms.last, ms.spent), (False, 'chunk', 7))
ms = step_macro(ms, Action.CONTINUE, mc)
ms = step_macro(ms, Action.RESAMPLE, mc)               # replaces those 4 tokens: spent +4, kept unchanged
test_eq((ms.spent, ms.kept, ms.resamples), (15, 11, 1))
test_fail(lambda: step_macro(ms, Action.RESAMPLE, mc), contains='already resampled 1 time(s)')
ms = step_macro(ms, Action.STOP, mc)
test_eq(legal_mask(ms, mc).any(), False)
ms

# %% [markdown]
# A thought is closed by the engine when it hits `max_thought_tokens`, and a thought chunk always leaves
# one token of budget for the close:

# %%
ms = step_macro(MacroState(budget=30), Action.THINK_BEGIN, mc)
p = plan_action(ms, Action.CONTINUE, mc); test_eq((p.n_sample, p.close_after), (4, False))
ms = step_macro(ms, Action.CONTINUE, mc)
p = plan_action(ms, Action.CONTINUE, mc); test_eq((p.n_sample, p.close_after), (2, True))  # cap 6: 2 more, then close
ms = step_macro(ms, Action.CONTINUE, mc)
test_eq((ms.in_thought, ms.spent), (False, 8))
tight = step_macro(MacroState(budget=4), Action.THINK_BEGIN, mc)
p = plan_action(tight, Action.CONTINUE, mc); test_eq((p.n_sample, p.close_after), (2, True))  # 3 left: 2 + close
test_eq(step_macro(tight, Action.CONTINUE, mc), MacroState(budget=4, spent=4, kept=4, last='chunk', done=True, reason='budget', n_thoughts=1))

# %% [markdown]
# ## Fuzz / property checks
# Thousands of random episodes under random configurations: each step picks a random *legal* action and
# a random outcome (EOS or not, and where). The symbolic token stream (`o` open, `c` close, `t` token) is
# kept alongside, so well-formedness is checked on the sequence itself, not only on the counters.
# After every step:
#
# 1. `0 <= spent <= budget` and `spent = kept + discarded`;
# 2. thought depth is 0 or 1 and the kept stream never nests or closes an unopened thought;
# 3. inside a thought `left >= 1` (room for the close) and `thought_len < max_thought_tokens`;
# 4. resamples never exceed the limit; `done` exactly when nothing is legal; an episode never ends inside a thought;
# 5. every illegal action is refused with `MacroActionError`, and the message names the action and the legal set.

# %%
#| export
def random_episode(mc:MacroConfig, budget:int, rng:np.random.Generator, p_eos:float=0.05):
    "Play random legal actions with random outcomes; yield (state, action, stream) after each step (fuzzing helper)."
    ms, stream = MacroState(budget=budget), []
    while not ms.done:
        w = legal_mask(ms, mc) * np.array([4., 1., 1., 1., 0.2])  # STOP rarely, so episodes run long
        a = Action(rng.choice(N_ACTIONS, p=w / w.sum()))
        plan = plan_action(ms, a, mc)
        if plan.drop_last: stream = stream[:len(stream) - (ms.kept - plan.base.kept)]
        n, eos = plan.n_sample, False
        if n and rng.random() < p_eos * n: n, eos = int(rng.integers(1, n + 1)), True
        stream += list(plan.head)
        if plan.thought and eos: stream += ['t'] * (n - 1) + ['close']
        else: stream += ['t'] * n + (['close'] if plan.close_after and plan.thought else [])
        ms = apply_plan(plan, n, eos)
        yield ms, a, stream

def _check_stream(stream):
    depth = 0
    for t in stream:
        if t == 'open': assert depth == 0, "nested thought"; depth = 1
        elif t == 'close': assert depth == 1, "close outside a thought"; depth = 0
    return depth

# %%
rng = np.random.default_rng(0)
n_steps, n_illegal, seen = 0, 0, set()
for ep in range(1500):
    mc = MacroConfig(chunk_tokens=int(rng.integers(1, 9)), max_thought_tokens=int(rng.integers(0, 12)),
                     max_resamples_per_chunk=int(rng.integers(0, 3)))
    budget, discarded, prev_ms = int(rng.integers(1, 60)), 0, None
    for ms, a, stream in random_episode(mc, budget, rng, p_eos=float(rng.uniform(0, 0.1))):
        n_steps += 1; seen.add(a)
        if a == Action.RESAMPLE: discarded += prev_ms.kept - ms.prev.kept
        assert 0 <= ms.spent <= ms.budget and ms.spent == ms.kept + discarded == len(stream) + discarded
        assert _check_stream(stream) == ms.depth
        if ms.in_thought: assert ms.left >= 1 and ms.thought_len < mc.max_thought_tokens
        assert ms.resamples <= mc.max_resamples_per_chunk
        mask = legal_mask(ms, mc)
        assert ms.done == (not mask.any())
        if ms.done: assert not ms.in_thought and ms.reason in ('stop', 'eos', 'budget')
        for bad in np.flatnonzero(~mask):
            n_illegal += 1
            try: plan_action(ms, bad, mc); raise AssertionError(f"{Action(bad).name} accepted")
            except MacroActionError as e: assert str(e).startswith(f"{Action(bad).name} is illegal: ") and 'Legal now' in str(e)
        prev_ms = ms
test_eq(seen, set(Action))
n_steps, n_illegal

# %% [markdown]
# The messages a controller (or a person at the `rc` prompt) gets:

# %%
mc = MacroConfig()
inside = step_macro(MacroState(budget=8), Action.THINK_BEGIN, mc)
for ms, a in [(inside, Action.THINK_BEGIN), (inside, Action.STOP), (MacroState(budget=8), Action.RESAMPLE),
              (MacroState(budget=1), Action.THINK_BEGIN), (step_macro(MacroState(budget=8), Action.STOP, mc), Action.CONTINUE)]:
    try: check_action(ms, a, mc)
    except MacroActionError as e: print(e)
