# %%
#| default_exp serve

# %% [markdown]
# # Serve
# > An HTTP service over the shared SLM: `POST /generate` (and its server-sent-events stream) with the active controller, a registry version or a baseline; `/health` and `/versions`; validation, timeouts, bounded concurrency, and hidden thoughts that never leak.

# %%
#| export
import asyncio, concurrent.futures, contextlib, enum, io, itertools, json, logging, math, re, socket, sys, threading, time
from typing import Any, Callable, Optional
import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from research_controller.config import Config, load_config

log = logging.getLogger(__name__)

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import os, tempfile
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from fastapi.testclient import TestClient
import httpx, torch
torch.set_num_threads(1)  # the test machine's cores are shared

# %% [markdown]
# ## Choosing a controller per request
# A request names its controller: `active` (the default: the registry's active version, or the threshold
# controller while nothing is promoted), a registry version such as `v3`, or a baseline name. A *resolver*
# turns that name into a controller object and lists the valid names; `create_app` takes any resolver, so
# the tests below serve the tiny model with scripted controllers while the real service uses the registry.
# An unknown name raises `UnknownController`, which the app answers with 404 and the valid names.

# %%
#| export
class UnknownController(LookupError):
    "A controller name the resolver does not know; `choices` lists the valid ones."
    def __init__(self, spec:str, choices:list):
        self.spec, self.choices = spec, list(choices)
        super().__init__(f"controller={spec!r} is unknown; valid controllers: {self.choices}.")

class StaticResolver:
    "Resolve controller names from a fixed dict (tests, custom deployments); `default` answers None/'active'."
    def __init__(self, controllers:dict, # name -> controller object
                 default:str|None=None): # name served for None/'active' (default: the first one)
        if not controllers: raise ValueError("StaticResolver needs at least one controller.")
        self.controllers, self.default = dict(controllers), default or next(iter(controllers))
        if self.default not in self.controllers: raise ValueError(f"default={self.default!r} is not one of {list(self.controllers)}.")
        self.registry = None
    def choices(self) -> list: return ['active', *self.controllers]
    def __call__(self, spec:str|None=None):
        "The controller named `spec` (None/'active' = the default one)."
        name = self.default if spec in (None, '', 'active') else spec
        if name not in self.controllers: raise UnknownController(spec, self.choices())
        return self.controllers[name]
    def __repr__(self): return f"StaticResolver({list(self.controllers)}, default={self.default!r})"

# %% [markdown]
# `RegistryResolver` is the real one. It reads `active` at every request, so a promotion or a rollback is
# served at once without a restart, and it keeps each loaded version in memory (a checkpoint is loaded once,
# not per request). Loading goes through `promotion.resolve_controller`, which verifies the checkpoint bytes,
# the SLM fingerprint and the feature size.

# %%
#| export
class RegistryResolver:
    "Resolve 'active', registry versions ('v3') and baseline names through `promotion.resolve_controller`, caching loaded controllers."
    def __init__(self, cfg:Config, registry=None): # config; a `ControllerRegistry` (default: the configured one)
        from research_controller.promotion import ControllerRegistry
        self.cfg = cfg
        self.registry = registry if registry is not None else ControllerRegistry.from_config(cfg)
        self._cache, self._lock = {}, threading.Lock()

    @staticmethod
    def baselines() -> list:
        from research_controller.promotion import baseline_names
        return sorted(baseline_names())

    def choices(self) -> list: return ['active', *self.registry.versions(), *self.baselines()]

    def _key(self, spec):
        from research_controller.promotion import RegistryError, version_name
        if spec in (None, '', 'active'): return self.registry.active() or 'threshold'
        if spec in self.baselines(): return spec
        if re.fullmatch(r'v?\d+', str(spec)):
            try: v = version_name(spec)
            except RegistryError: raise UnknownController(spec, self.choices()) from None
            if v in self.registry.versions(): return v
        raise UnknownController(spec, self.choices())

    def __call__(self, spec:str|None=None):
        "The controller for `spec`: None/'active', a version ('v3', 'v0003') or a baseline name."
        from research_controller.promotion import resolve_controller
        key = self._key(spec)
        with self._lock:
            if key not in self._cache: self._cache[key] = resolve_controller(self.cfg, key, self.registry)
            return self._cache[key]

    def __repr__(self): return f"RegistryResolver(active={self.registry.active()!r}, versions={len(self.registry.versions())})"

# %% [markdown]
# The tests need controllers that behave in known ways on the tiny model. `ScriptedController` plays a
# fixed list of macro-actions (skipping illegal ones, then `CONTINUE` until the budget is spent) through the
# engine's public API; its script opens a thought at once, so every request exercises thought redaction.
# `delay_s` makes each decision slow, to test timeouts and concurrency.

# %%
from research_controller.config import load_config
from research_controller.slm import tiny_slm
from research_controller.engine import Engine, GenerationResult
from research_controller.macro_actions import Action

class ScriptedController:
    "Test controller: play `script`, then CONTINUE until done; `delay_s` sleeps before each decision."
    version = None
    def __init__(self, name='scripted', script=(Action.THINK_BEGIN, Action.CONTINUE, Action.THINK_END), delay_s=0.0):
        self.name, self.script, self.delay_s, self.decisions = name, list(script), delay_s, 0
    def generate(self, engine, prompt, max_new_tokens, seed=0, include_thoughts=False, item=None):
        s = engine.new_state(prompt, max_new_tokens, seed=seed)
        todo = list(self.script)
        while not engine.is_done(s):
            if self.delay_s: time.sleep(self.delay_s)
            m = engine.legal_mask(s)
            a = todo.pop(0) if todo else Action.CONTINUE
            engine.step(s, a if m[a] else (Action.CONTINUE if m[Action.CONTINUE] else Action.STOP))
            self.decisions += 1
        r = engine.result(s, include_thoughts=include_thoughts)
        r.meta.update(controller=self.name, version=self.version)
        return r

cfg = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4', 'macro.max_new_tokens=24', 'serve.max_new_tokens=64',
                             'serve.max_prompt_chars=200', 'serve.max_concurrency=2', 'serve.batch_window_ms=20'])
tm, tt = tiny_slm(cfg)
eng = Engine(tm, tt, cfg)
res = StaticResolver({'scripted': ScriptedController(), 'plain': ScriptedController('plain', script=())})
r = ScriptedController().generate(eng, "Why is the sky blue?", 16, seed=1)
[e['action'] for e in r.macro_trace], r.tokens

# %%
test_eq(res(None).name, 'scripted')
test_eq(res('plain').name, 'plain')
test_fail(lambda: res('v9'), contains="valid controllers: ['active', 'scripted', 'plain']")
test_eq(r.tokens, 16)
test_eq(r.thought_text, None)

# %% [markdown]
# ## Requests and their limits
# `request_model(cfg)` builds the request schema with the limits of the `serve` section: a prompt of at most
# `serve.max_prompt_chars` characters that is not blank, `max_new_tokens` in `[1, serve.max_new_tokens]`
# (default: `macro.max_new_tokens`, capped), a seed, and the two opt-ins. Unknown fields are refused (a
# misspelt `max_tokens` is an error, not silently ignored) and numbers must be numbers (`"16"` or `true` is refused).

# %%
#| export
def request_model(cfg:Config) -> type[BaseModel]:
    "The pydantic model of a generation request, with the limits of `cfg.serve`."
    sv = cfg.serve
    default_budget = min(cfg.macro.max_new_tokens, sv.max_new_tokens)
    class GenerateRequest(BaseModel):
        "A generation request."
        model_config = ConfigDict(extra='forbid')
        prompt: str = Field(min_length=1, max_length=sv.max_prompt_chars, description="the user prompt")
        max_new_tokens: int = Field(default_budget, ge=1, le=sv.max_new_tokens, strict=True,
                                    description="TOTAL token budget (thoughts and resampled chunks count)")
        controller: Optional[str] = Field(None, max_length=64, description="'active' (default), a version such as 'v3', or a baseline name")
        seed: int = Field(0, ge=0, le=2**32 - 1, strict=True, description="sampling seed")
        include_trace: bool = Field(False, strict=True, description="return the macro-action trace")
        include_thoughts: bool = Field(False, strict=True, description="return hidden thoughts (never logged)")

        @field_validator('prompt')
        @classmethod
        def _not_blank(cls, v):
            if not v.strip(): raise ValueError("the prompt is blank; send some text")
            return v
    return GenerateRequest

# %%
Req = request_model(cfg)
Req(prompt="Hi", max_new_tokens=8)

# %%
test_eq(Req(prompt="Hi").max_new_tokens, 24)
for bad, field in [(dict(prompt="x" * 201), 'prompt'), (dict(prompt="  "), 'prompt'), (dict(prompt="Hi", max_new_tokens=65), 'max_new_tokens'),
                   (dict(prompt="Hi", max_new_tokens="16"), 'max_new_tokens'), (dict(prompt="Hi", max_tokens=5), 'max_tokens'),
                   (dict(prompt="Hi", include_thoughts=1), 'include_thoughts'), (dict(prompt="Hi", seed=-1), 'seed')]:
    test_fail(lambda: Req(**bad), contains=field)

# %% [markdown]
# Validation errors become one 422 answer whose `detail` names each bad field, what is wrong, and the
# config key that sets the limit when there is one.

# %%
#| export
_LIMIT_KEYS = {'prompt': 'serve.max_prompt_chars', 'max_new_tokens': 'serve.max_new_tokens'}

def describe_validation(errors:list) -> str:
    "One sentence per pydantic error: the field, the problem, and the config key behind the limit."
    out = []
    for e in errors:
        loc = [str(x) for x in e.get('loc', ()) if x != 'body']
        name = '.'.join(loc) or 'body'
        msg = e.get('msg', 'invalid')
        if e.get('type') == 'extra_forbidden': msg = "unknown field; allowed fields: prompt, max_new_tokens, controller, seed, include_trace, include_thoughts"
        elif e.get('type') == 'json_invalid': name, msg = 'body', f"is not valid JSON ({e.get('ctx', {}).get('error', msg)})"
        elif e.get('type') == 'missing': msg = "is required"
        key = _LIMIT_KEYS.get(loc[0] if loc else '')
        if key and e.get('type') in ('string_too_long', 'less_than_equal'): msg += f" (limit set by {key})"
        out.append(f"{name}: {msg}")
    return '; '.join(out)

# %%
from pydantic import ValidationError
try: Req(prompt="x" * 300, max_tokens=3)
except ValidationError as e: errs = e.errors()
describe_validation(errs)

# %%
test_eq(describe_validation(errs).startswith("prompt: String should have at most 200 characters (limit set by serve.max_prompt_chars); max_tokens: unknown field"), True)

# %% [markdown]
# ## Responses are JSON
# Traces carry numpy scalars and possibly non-finite floats (a z-score on the first step); `jsonable` turns
# them into plain JSON values (non-finite numbers become `null`, since JSON has no NaN).

# %%
#| export
def jsonable(x):
    "`x` with numpy values converted, tuples as lists, and non-finite floats as None."
    if isinstance(x, dict): return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray): return jsonable(x.tolist())
    if isinstance(x, np.generic): x = x.item()
    if isinstance(x, float) and not math.isfinite(x): return None
    if isinstance(x, enum.Enum): return x.name
    return x

# %%
jsonable({'a': np.float32(1.5), 'b': (1, np.int64(2)), 'c': float('nan'), 'd': np.array([[1, 2]]), 'e': Action.STOP})

# %%
test_eq(jsonable({'a': np.float32(1.5), 'b': (1, np.int64(2)), 'c': float('nan'), 'e': Action.STOP}),
        {'a': 1.5, 'b': [1, 2], 'c': None, 'e': 'STOP'})
test_eq(json.dumps(jsonable({'x': float('inf')}), allow_nan=False), '{"x": null}')

# %% [markdown]
# ## One request's view of the engine: deadlines and live chunks
# Every request runs `controller.generate` in a worker thread on the *shared* engine, through a thin
# `RequestEngine` proxy. The proxy forwards everything to the engine, and at each call that does work
# (`new_state(s)`, `step`, `step_batch`, `expand`) it first checks the request's deadline and cancel flag:
# a request that times out or whose client went away stops at its next decision and frees its worker,
# whatever the controller. After each `step` of a state the controller created, it reports the decision
# to `on_step` (the stream endpoint turns that into one event per decided chunk). States the controller
# created are numbered: a best-of-N controller streams each candidate under its own `candidate` index.

# %%
#| export
class Cancelled(RuntimeError):
    "A request was stopped (deadline passed or client gone) between two decisions."

class RequestEngine:
    "Per-request proxy of the shared `Engine`: deadline/cancel checks before work, and a callback after each decided step."
    def __init__(self, engine, # the shared Engine
                 deadline:float|None=None, # `time.monotonic()` after which work stops with `Cancelled`
                 cancel:threading.Event|None=None, # set it to stop the request at its next decision
                 on_step:Callable|None=None, # on_step(candidate_index, state) after each step of a root state
                 batcher:'StepBatcher|None'=None): # merges this request's steps with other requests' (None = step alone)
        self._engine, self._deadline, self._on_step, self._batcher = engine, deadline, on_step, batcher
        self.cancel = cancel or threading.Event()
        self._roots, self._stepped, self._n = {}, set(), 0  # id(state) -> (candidate index, state); ids stepped; next index
        self.why = None

    def __getattr__(self, name): return getattr(self._engine, name)
    def __repr__(self): return f"RequestEngine({self._engine!r}, candidates={len(self._roots)})"

    def check(self):
        "Raise `Cancelled` if the deadline passed or the request was cancelled."
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.why = self.why or 'timeout'; self.cancel.set()
        if self.cancel.is_set(): raise Cancelled(f"request stopped ({self.why or 'cancelled'})")

    def _track(self, states):
        for s in states:
            if id(s) not in self._roots: self._roots[id(s)] = (self._n, s); self._n += 1
        return states

    def new_states(self, prompts, *args, **kw):
        self.check(); return self._track(self._engine.new_states(prompts, *args, **kw))
    def new_state(self, prompt, *args, **kw):
        self.check(); return self._track([self._engine.new_state(prompt, *args, **kw)])[0]
    def expand(self, parents, actions):
        self.check(); return self._engine.expand(parents, actions)
    def fork(self, s, seed=None):
        "Forks of a fresh, never-stepped tracked state are candidates (best-of-N); the template itself is dropped."
        c = self._engine.fork(s, seed)
        r = self._roots.get(id(s))
        if r is not None and r[1] is s and id(s) not in self._stepped:
            if not any(x is s for x in self._templates()): self._roots[id(s)] = (r[0], s, 'template'); self._roots[id(c)] = (r[0], c)
            else: self._roots[id(c)] = (self._n, c); self._n += 1
        return c
    def _templates(self): return [v[1] for v in self._roots.values() if len(v) == 3]
    def step_batch(self, states, actions):
        self.check()
        out = (self._batcher or self._engine).step_batch(states, actions)
        for s in states:
            r = self._roots.get(id(s))
            if r is not None and r[1] is s and len(r) == 2:
                self._stepped.add(id(s))
                if self._on_step is not None: self._on_step(r[0], s)
        return out
    def step(self, s, action): return self.step_batch([s], [action])[0]

# %%
seen = []
pe = RequestEngine(eng, on_step=lambda i, s: seen.append((i, eng.tokens_spent(s))))
r = ScriptedController().generate(pe, "Hi", 12)
seen

# %%
test_eq(seen, [(0, 1), (0, 5), (0, 6), (0, 10), (0, 12)])  # open, thought chunk, close, chunk, last 2 tokens
test_eq(r.tokens, 12)
pe = RequestEngine(eng, deadline=time.monotonic() - 1)
test_fail(lambda: ScriptedController().generate(pe, "Hi", 12), contains='request stopped (timeout)')
pe = RequestEngine(eng); pe.cancel.set()
test_fail(lambda: pe.new_state("Hi"), contains='request stopped (cancelled)')

# %% [markdown]
# A stream event describes one decision of one candidate: the action, the chunk it added (thought chunks
# are `[thought redacted]` unless the request asked for thoughts, exactly as in the final trace), the visible
# text so far and the tokens spent. The visible `text` is authoritative after a `RESAMPLE` (which replaces
# the last chunk). It costs a decode of the visible tokens, not a whole `engine.result` (which would
# recompute the features of every past decision at every step).

# %%
#| export
def step_event(engine, candidate:int, s, include_thoughts:bool=False) -> dict:
    "The stream event for the last decision of state `s`."
    d = engine.decisions(s)[-1]
    ev = dict(candidate=candidate, step=d.step, action=d.action.name, chunk=engine._chunk_text(d, include_thoughts),
              text=engine.tok.decode(engine.visible_ids(s.tip), skip_special_tokens=True), tokens=engine.tokens_spent(s))
    if include_thoughts:
        ev['thought_text'] = '\n'.join(engine.tok.decode(x, skip_special_tokens=True) for x in engine.thought_spans(s.tip))
    return ev

# %%
events = []
pe = RequestEngine(eng, on_step=lambda i, s: events.append(step_event(eng, i, s)))
r = ScriptedController().generate(pe, "Hi", 12)
[(e['action'], e['chunk'][:20]) for e in events]

# %%
test_eq([e['action'] for e in events], ['THINK_BEGIN', 'CONTINUE', 'THINK_END', 'CONTINUE', 'CONTINUE'])
test_eq([e['chunk'] for e in events[:3]], ['[thought redacted]'] * 3)
test_eq(events[-1]['text'], r.text)
test_eq(events[-1]['tokens'], r.tokens)
test_eq(any('thought_text' in e for e in events), False)

# %% [markdown]
# Best-of-N forks one fresh prefill into N candidates and steps them together: each candidate streams under
# its own index, and the chosen one's last event holds the final text.

# %%
from research_controller.engine import make_controller
bon = make_controller('best_of_n', cfg)
events = []
pe = RequestEngine(eng, on_step=lambda i, s: events.append(step_event(eng, i, s)))
rb = bon.generate(pe, "Name a colour.", 16, seed=0)
sorted({e['candidate'] for e in events}), rb.meta['chosen'], len(events)

# %%
test_eq(sorted({e['candidate'] for e in events}), list(range(bon.n)))
test_eq([e for e in events if e['candidate'] == rb.meta['chosen']][-1]['text'], rb.text)
last = {e['candidate']: e['tokens'] for e in events}  # each candidate's tokens after its last decision
test_eq(sum(last.values()), rb.tokens)  # best-of-N spends the budget of every candidate

# %% [markdown]
# ## Batching concurrent requests
# On a CPU one batched SLM forward for several sequences costs little more than a forward for one (the
# weights are read once; see PERF_NOTES), so concurrent requests should decode *together*. `StepBatcher`
# merges the `step_batch` calls that concurrent requests make within `serve.batch_window_ms` into one
# engine call: the first caller leads, waits until every running generation has submitted its step (or the
# window closes), then runs them all in one `engine.step_batch` and hands each caller its own states back.
# The actions are checked before any work; if the merged call fails, each request's step is re-run alone so
# one bad request never fails the others. With one client there is nothing to wait for, so it costs nothing.
# In fp32 a batched step gives exactly the tokens of separate steps; in bf16 padding and batch shape change
# the rounding, so the same seed can give slightly different text under load.
#
# It is **off by default** (`serve.batch_window_ms = 0`): on the shared 2-core development machine
# (load average 12-18) `benchmarks/serve_load.py` found no reliable gain: four side-by-side measurements with
# 16-token answers gave batched/unbatched request-rate ratios of 0.58x-1.16x at 4 clients and 0.82x-1.53x at
# 16 (the last run, pooling two interleaved repetitions: 1.02x and 1.05x); 48-token answers at 4 clients gave
# 0.71x. Short answers are dominated by the
# unbatched prefill, and merged steps serialise requests that otherwise overlap on both cores. Turn it on where
# one batched forward is much cheaper than several parallel ones (more cores, longer answers, a GPU) and measure.

# %%
#| export
class StepBatcher:
    "Merge concurrent `step_batch` calls on a shared engine into one batched call."
    def __init__(self, engine, # the shared Engine
                 window_ms:float=5.0, # how long the first caller waits for the others
                 n_running:Callable|None=None): # () -> how many generations could submit a step now (default 1)
        self.engine, self.window = engine, window_ms / 1000
        self.n_running = n_running or (lambda: 1)
        self._cv, self._pending, self._leading = threading.Condition(), [], False
        self.calls = self.steps = 0  # batched engine calls, and the request steps they carried

    def step_batch(self, states, actions):
        "Apply `actions` to `states` (in place) together with whatever other requests submit meanwhile."
        item = dict(states=list(states), actions=list(actions), done=False, error=None)
        with self._cv:
            self._pending.append(item); self._cv.notify_all()
            while not item['done'] and self._leading: self._cv.wait()
            if not item['done']:  # lead: gather the others, then run everyone's steps
                self._leading = True
                end = time.monotonic() + self.window
                while len(self._pending) < self.n_running() and (left := end - time.monotonic()) > 0: self._cv.wait(left)
                batch, self._pending = self._pending, []
        if not item['done']:
            try: self._run(batch)
            finally:
                with self._cv:
                    for it in batch: it['done'] = True
                    self._leading = False; self._cv.notify_all()
        if item['error'] is not None: raise item['error']
        return states

    def _run(self, batch):
        self.calls += 1; self.steps += len(batch)
        try: self.engine.step_batch([s for it in batch for s in it['states']], [a for it in batch for a in it['actions']])
        except Exception:
            if len(batch) == 1: batch[0]['error'] = sys.exc_info()[1]; return
            for it in batch:  # the merged call changed no state (the engine validates first, applies last): retry alone
                try: self.engine.step_batch(it['states'], it['actions'])
                except Exception as e: it['error'] = e

    def __repr__(self): return f"StepBatcher(window_ms={self.window * 1000:g}, calls={self.calls}, steps={self.steps})"

# %% [markdown]
# Four threads generating at once through one batcher: every answer equals the answer made alone, far fewer
# engine calls than steps were made, and an illegal action in one request fails only that request.

# %%
bat = StepBatcher(eng, window_ms=50, n_running=lambda: 4)
solo = [ScriptedController().generate(eng, p, 16, seed=i) for i, p in enumerate(["Hi", "Why?", "Name a river.", "Count to 3."])]
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    together = list(ex.map(lambda ip: ScriptedController().generate(RequestEngine(eng, batcher=bat), ip[1], 16, seed=ip[0]),
                           enumerate(["Hi", "Why?", "Name a river.", "Count to 3."])))
bat

# %%
test_eq([r.text for r in together], [r.text for r in solo])
test_eq([r.tokens for r in together], [16] * 4)
test_eq(bat.steps, 4 * 6)  # six decisions per request
test_eq(bat.calls < bat.steps, True)  # merged
class Bad(ScriptedController):
    def generate(self, engine, prompt, max_new_tokens, seed=0, include_thoughts=False, item=None):
        s = engine.new_state(prompt, max_new_tokens, seed=seed); engine.step(s, Action.THINK_END)  # illegal: no thought is open
bat2 = StepBatcher(eng, window_ms=200, n_running=lambda: 2)
with concurrent.futures.ThreadPoolExecutor(2) as ex:
    ok_f = ex.submit(lambda: ScriptedController().generate(RequestEngine(eng, batcher=bat2), "Hi", 8))
    bad_f = ex.submit(lambda: Bad().generate(RequestEngine(eng, batcher=bat2), "Hi", 8))
    test_fail(bad_f.result, contains='THINK_END is illegal')
    test_eq(ok_f.result().tokens, 8)

# %% [markdown]
# ## The app
# `create_app` wires the pieces. Generation runs off the event loop in a thread pool of
# `serve.max_concurrency` workers (more requests wait their turn; the SLM and its engine are shared and
# only read), and their decoding steps are merged by a `StepBatcher` when `serve.batch_window_ms` > 0.
# Each request gets a deadline of `serve.request_timeout_s` from its arrival, queueing included:
# past it the answer is 504, and the worker stops at its next decision. `app.state.stats` counts requests,
# the generations running now and the most that ever ran at once.
#
# Logging: one line per request (id, controller, status, tokens, latency, prompt length) and never the
# prompt, the text, or any thought.

# %%
#| export
class _Stats:
    "Thread-safe request counters of one app."
    def __init__(self): self._lock, self.d = threading.Lock(), dict(requests=0, ok=0, errors=0, timeouts=0, cancelled=0, active=0, max_active=0)
    def add(self, **kw):
        with self._lock:
            for k, v in kw.items(): self.d[k] += v
            self.d['max_active'] = max(self.d['max_active'], self.d['active'])
    def snapshot(self) -> dict:
        with self._lock: return dict(self.d)

def _controller_error(e:UnknownController) -> HTTPException:
    return HTTPException(404, detail=dict(message=f"controller: {e}", field='controller', valid=e.choices))

# %%
#| export
def create_app(cfg:Config|None=None, # configuration (`serve` section: limits, timeout, concurrency)
               engine=None, # the shared `Engine` (default: `engine.get_engine(cfg)`, the configured SLM)
               resolver=None, # controller name -> controller (default: `RegistryResolver` on the configured registry)
               ) -> FastAPI:
    "The FastAPI app: POST /generate, POST /generate/stream, GET /health, GET /versions."
    cfg = cfg or load_config()
    if engine is None:
        from research_controller.engine import get_engine
        engine = get_engine(cfg)
    if resolver is None:
        from research_controller.promotion import ControllerRegistry
        resolver = RegistryResolver(cfg, ControllerRegistry.from_config(cfg, engine.fingerprint, engine.feature_dim))
    sv, Req = cfg.serve, request_model(cfg)
    pool = concurrent.futures.ThreadPoolExecutor(sv.max_concurrency, thread_name_prefix='rc-generate')
    stats = _Stats()
    batcher = StepBatcher(engine, sv.batch_window_ms, lambda: stats.snapshot()['active']) if sv.batch_window_ms > 0 else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="research_controller", version="1", lifespan=lifespan,
                  description="Generation with a learned macro-action controller steering a frozen small language model.")
    app.state.cfg, app.state.engine, app.state.resolver, app.state.pool = cfg, engine, resolver, pool
    app.state.stats, app.state.batcher, app.state.ids = stats, batcher, itertools.count(1)
    app.state.request_model = Req
    app.state.max_body = 4 * sv.max_prompt_chars + 4096  # JSON escaping can grow text up to ~6x; larger bodies are refused early
    _add_handlers(app)
    _add_routes(app)
    return app

# %% [markdown]
# Errors: 422 for a bad request (`detail` names the field), 413 for a body far beyond the prompt limit (refused
# before it is parsed), 404 for an unknown controller (with the valid names), 504 on timeout, 500 with the
# request id for anything else (the log has the traceback, never the prompt).

# %%
#| export
def _add_handlers(app:FastAPI):
    @app.exception_handler(RequestValidationError)
    async def _invalid(request:Request, exc:RequestValidationError):
        return JSONResponse(status_code=422, content=dict(detail=describe_validation(exc.errors()), errors=jsonable(
            [dict(field='.'.join(str(x) for x in e.get('loc', ()) if x != 'body'), type=e.get('type'), msg=e.get('msg')) for e in exc.errors()])))

    app.add_middleware(_BodyLimit, state=app.state)

class _BodyLimit:
    "ASGI middleware: answer 413 to a POST whose Content-Length is far beyond the prompt limit, before its body is read."
    # A plain ASGI wrapper, not `@app.middleware('http')`: Starlette's BaseHTTPMiddleware wraps `receive`, and
    # behind it a route never sees the client disconnect (`request.is_disconnected()` stays False).
    def __init__(self, app, state): self.app, self.state = app, state
    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http' and scope['method'] == 'POST':
            n = dict(scope['headers']).get(b'content-length', b'').decode('latin-1')
            if n.isdigit() and int(n) > self.state.max_body:
                r = JSONResponse(status_code=413, content=dict(detail=f"request body of {n} bytes is too large: prompt may have at most "
                                 f"{self.state.cfg.serve.max_prompt_chars} characters (serve.max_prompt_chars)."))
                return await r(scope, receive, send)
        await self.app(scope, receive, send)

# %% [markdown]
# The generation job: resolve the controller first (so an unknown name is a 404 before any work), then run
# `generate` in the pool through a `RequestEngine`. `_finish` shapes the answer: thoughts only when asked
# (they are removed here too, whatever a controller returned), the trace only when asked.

# %%
#| export
class _Job:
    "One generation: the request, its controller, deadline, cancel flag and optional step callback."
    def __init__(self, app, req, on_step=None):
        self.app, self.req, self.rid = app, req, next(app.state.ids)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + app.state.cfg.serve.request_timeout_s
        try: self.ctl = app.state.resolver(req.controller)
        except UnknownController as e: raise _controller_error(e) from None
        except Exception as e:  # a corrupt checkpoint, a controller trained for another SLM, ...
            log.error("controller %r could not be loaded: %s", req.controller, e)
            raise HTTPException(503, detail=f"controller: {req.controller or 'active'!r} could not be loaded ({type(e).__name__}: {e}); "
                                            "roll back to another version or ask for a baseline.") from None
        self.peng = RequestEngine(app.state.engine, self.deadline, on_step=on_step, batcher=app.state.batcher)

    def run(self):
        "Run the controller (in a worker thread)."
        st = self.app.state.stats
        self.peng.check()  # the deadline may have passed while the job waited for a worker
        st.add(active=1)
        try:
            return self.ctl.generate(self.peng, self.req.prompt, self.req.max_new_tokens, seed=self.req.seed,
                                     include_thoughts=self.req.include_thoughts)
        finally: st.add(active=-1)

    def finish(self, r) -> dict:
        "The response body for result `r`."
        q = self.req
        out = dict(text=r.text, controller=getattr(self.ctl, 'name', None) or q.controller,
                   controller_version=getattr(self.ctl, 'version', None) or r.meta.get('version'),
                   tokens=int(r.tokens), latency_ms=round(float(r.latency_ms), 3),
                   wall_ms=round(1000 * (time.monotonic() - self.t0), 3), request_id=self.rid, seed=q.seed,
                   max_new_tokens=q.max_new_tokens)
        if q.include_trace: out['macro_trace'] = r.macro_trace
        if q.include_thoughts: out['thought_text'] = r.thought_text
        return jsonable(out)

    def log(self, status:int, tokens=None, note=''):
        "One log line: never the prompt, the text or thoughts."
        log.info("request %d controller=%s status=%d tokens=%s wall_ms=%.1f prompt_chars=%d%s", self.rid,
                 getattr(self.ctl, 'name', '?'), status, tokens, 1000 * (time.monotonic() - self.t0), len(self.req.prompt),
                 f" {note}" if note else '')

def _error_status(e:Exception) -> tuple[int, str]:
    "HTTP status and message for an exception raised by a generation."
    if isinstance(e, Cancelled): return 504, str(e)
    if isinstance(e, ValueError): return 422, str(e)  # e.g. prompt + budget longer than the model's context
    return 500, f"{type(e).__name__}: {e}"

# %% [markdown]
# The routes. `/generate` waits for the job at most until its deadline; on a timeout it cancels the job (a
# queued job never starts, a running one stops at its next decision) and answers 504. While it waits it asks
# the server every `DISCONNECT_POLL_S` whether the client is still there: a client that hangs up (a closed
# tab, a client-side timeout) stops its generation at the next decision instead of holding a worker until
# the end, and the request is counted as `cancelled` and logged with status 499.

# %%
#| export
DISCONNECT_POLL_S = 0.1  # how often a waiting `/generate` checks that its client is still connected

class _ClientGone(Exception): "The client closed the connection before its answer was ready."

def _retrieve(fut):
    "Done-callback that consumes a future's outcome, so a worker's error nobody awaits is not reported as never retrieved."
    fut.cancelled() or fut.exception()

async def _wait_or_gone(fut, deadline:float, request:Request):
    "The result of `fut`; `asyncio.TimeoutError` after `deadline` (monotonic), `_ClientGone` if the client disconnects first."
    while True:
        left = deadline - time.monotonic()
        if left <= 0: raise asyncio.TimeoutError
        done, _ = await asyncio.wait({fut}, timeout=min(left, DISCONNECT_POLL_S))
        if done: return fut.result()
        if await request.is_disconnected(): raise _ClientGone

def _add_routes(app:FastAPI):
    Req, cfg = app.state.request_model, app.state.cfg

    @app.post('/generate')
    async def generate(req: Req, request: Request) -> dict:
        "Generate text with the requested controller."
        st = app.state.stats; st.add(requests=1)
        job = _Job(app, req)
        fut = asyncio.get_running_loop().run_in_executor(app.state.pool, job.run)
        fut.add_done_callback(_retrieve)  # a worker that stops after we answered (timeout, client gone) raises into nobody
        try: r = await _wait_or_gone(fut, job.deadline, request)
        except _ClientGone:
            job.peng.why = 'client gone'; job.peng.cancel.set(); st.add(cancelled=1); job.log(499, note='client gone')
            return JSONResponse({'detail': 'client disconnected'}, status_code=499)  # nobody reads it
        except (asyncio.TimeoutError, Cancelled):
            job.peng.why = 'timeout'; job.peng.cancel.set(); st.add(timeouts=1); job.log(504)
            raise HTTPException(504, detail=f"generation took longer than serve.request_timeout_s={cfg.serve.request_timeout_s} s; "
                                            "ask for fewer max_new_tokens, retry later, or raise the timeout.") from None
        except Exception as e:
            code, msg = _error_status(e); st.add(errors=1); job.log(code, note=type(e).__name__)
            if code == 500: log.exception("request %d failed", job.rid)
            raise HTTPException(code, detail=f"{msg} (request {job.rid})") from None
        st.add(ok=1); job.log(200, r.tokens)
        return job.finish(r)

    @app.get('/health')
    def health() -> dict:
        "Liveness and what is served: SLM fingerprint, active version, counters."
        e, reg = app.state.engine, getattr(app.state.resolver, 'registry', None)
        return jsonable(dict(status='ok', slm=cfg.slm.source, slm_fingerprint=e.fingerprint, feature_dim=e.feature_dim,
                             active_version=reg.active() if reg is not None else None,
                             max_concurrency=cfg.serve.max_concurrency, stats=app.state.stats.snapshot(),
                             batching=dict(window_ms=cfg.serve.batch_window_ms, engine_calls=b.calls, request_steps=b.steps)
                                      if (b := app.state.batcher) is not None else None))

    @app.get('/versions')
    def versions() -> dict:
        "Registry versions, the active one, the history length, and every valid controller name."
        reg = getattr(app.state.resolver, 'registry', None)
        return dict(versions=reg.versions() if reg is not None else [], active=reg.active() if reg is not None else None,
                    history_length=len(reg.history()) if reg is not None else 0, controllers=app.state.resolver.choices())

    _add_stream_route(app)

# %% [markdown]
# The stream route: `POST /generate/stream` takes the same request and answers with server-sent events, one
# `chunk` event per decision (from `step_event`), then one `done` event with the summary `/generate` returns.
# Validation and the controller name are checked before the stream starts (so they get a normal 4xx); a
# failure after that is an `error` event carrying the status (504 on timeout). If the client disconnects, the
# generation stops at its next decision. A controller that decides on states it did not create through the
# engine gets its trace replayed as chunk events at the end.

# %%
#| export
def sse(event:str, data) -> str:
    "One server-sent event."
    return f"event: {event}\ndata: {json.dumps(jsonable(data), ensure_ascii=False, allow_nan=False)}\n\n"

def parse_sse(text:str) -> list[tuple[str, dict]]:
    "Parse a server-sent-events body into (event, data) pairs."
    out = []
    for block in text.replace('\r\n', '\n').split('\n\n'):
        ev, data = 'message', []
        for line in block.split('\n'):
            if line.startswith('event:'): ev = line[6:].strip()
            elif line.startswith('data:'): data.append(line[5:].lstrip())
        if data: out.append((ev, json.loads('\n'.join(data))))
    return out

def _add_stream_route(app:FastAPI):
    Req, cfg = app.state.request_model, app.state.cfg

    @app.post('/generate/stream')
    async def generate_stream(req: Req):
        "Generate with the requested controller, streaming one server-sent event per decided chunk."
        st = app.state.stats; st.add(requests=1)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        def on_step(i, s):
            ev = step_event(app.state.engine, i, s, req.include_thoughts)
            loop.call_soon_threadsafe(q.put_nowait, ('chunk', ev))
        job = _Job(app, req, on_step=on_step)

        async def events():
            fut = loop.run_in_executor(app.state.pool, job.run)
            fut.add_done_callback(lambda f: q.put_nowait(('end', None))); fut.add_done_callback(_retrieve)
            n = 0
            try:
                while True:
                    try: kind, ev = await asyncio.wait_for(q.get(), max(0.0, job.deadline - time.monotonic()))
                    except asyncio.TimeoutError: kind = 'timeout'
                    if kind == 'chunk': n += 1; yield sse('chunk', ev); continue
                    if kind == 'timeout' or (fut.done() and isinstance(fut.exception(), Cancelled)):
                        job.peng.why = 'timeout'; job.peng.cancel.set(); st.add(timeouts=1); job.log(504, note='stream')
                        yield sse('error', dict(status=504, detail=f"generation took longer than serve.request_timeout_s="
                                                f"{cfg.serve.request_timeout_s} s; ask for fewer max_new_tokens or raise the timeout."))
                        return
                    e = fut.exception()
                    if e is not None:
                        code, msg = _error_status(e); st.add(errors=1); job.log(code, note='stream ' + type(e).__name__)
                        if code == 500: log.error("request %d failed: %s", job.rid, msg)
                        yield sse('error', dict(status=code, detail=f"{msg} (request {job.rid})")); return
                    r = fut.result()
                    if n == 0:  # the controller decided on states it did not create through the engine: replay its trace
                        for t in r.macro_trace:
                            yield sse('chunk', dict(candidate=0, step=t.get('step'), action=t.get('action'), chunk=t.get('chunk', ''),
                                                    text=None, tokens=t.get('spent')))
                    st.add(ok=1); job.log(200, r.tokens, note='stream')
                    yield sse('done', job.finish(r)); return
            finally:
                if not fut.done() and not job.peng.cancel.is_set():
                    job.peng.why = 'client gone'; job.peng.cancel.set(); st.add(cancelled=1); job.log(499, note='stream client gone')

        return StreamingResponse(events(), media_type='text/event-stream', headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})

# %% [markdown]
# ### The contract, through `TestClient`
# Two scripted controllers on the tiny model; every request below goes through the full HTTP stack.

# %%
app = create_app(cfg, engine=eng, resolver=res)
client = TestClient(app)
resp = client.post('/generate', json=dict(prompt="Why is the sky blue?", max_new_tokens=16, seed=1, include_trace=True))
body = resp.json()
resp.status_code, {k: body[k] for k in ('controller', 'controller_version', 'tokens')}, [e['action'] for e in body['macro_trace']]

# %%
test_eq(resp.status_code, 200)
test_eq((body['controller'], body['controller_version'], body['tokens']), ('scripted', None, 16))
test_eq(body['text'], r1 := ScriptedController().generate(eng, "Why is the sky blue?", 16, seed=1).text)  # same as calling the controller
test_eq('thought_text' in body, False)
test_eq([e['chunk'] for e in body['macro_trace'][:3]], ['[thought redacted]'] * 3)
test_eq(set(body) >= {'text', 'macro_trace', 'controller_version', 'controller', 'tokens', 'latency_ms'}, True)
b2 = client.post('/generate', json=dict(prompt="Why is the sky blue?", max_new_tokens=16, seed=1, controller='plain')).json()
test_eq((b2['controller'], 'macro_trace' in b2), ('plain', False))

# %% [markdown]
# Asking for thoughts returns them (and the thought chunks in the trace):

# %%
bt = client.post('/generate', json=dict(prompt="Why is the sky blue?", max_new_tokens=16, seed=1, include_trace=True, include_thoughts=True)).json()
bt['thought_text'], bt['macro_trace'][1]['chunk']

# %%
test_eq(isinstance(bt['thought_text'], str) and len(bt['thought_text']) > 0, True)
test_eq(bt['macro_trace'][1]['chunk'] != '[thought redacted]', True)
test_eq(bt['text'], body['text'])  # thoughts never enter the visible text
test_eq(bt['thought_text'].strip() in json.dumps(body), False)  # and the answer that did not ask holds no trace of them

# %% [markdown]
# Bad requests: each answer names the field.

# %%
bad = {'prompt too long': (dict(prompt="x" * 201), 422, 'prompt: String should have at most 200 characters (limit set by serve.max_prompt_chars)'),
       'budget too big': (dict(prompt="Hi", max_new_tokens=1000), 422, 'max_new_tokens: Input should be less than or equal to 64 (limit set by serve.max_new_tokens)'),
       'budget zero': (dict(prompt="Hi", max_new_tokens=0), 422, 'max_new_tokens: Input should be greater than or equal to 1'),
       'no prompt': (dict(max_new_tokens=4), 422, 'prompt: is required'),
       'blank prompt': (dict(prompt="   "), 422, 'prompt: Value error, the prompt is blank'),
       'typo': (dict(prompt="Hi", max_tokens=4), 422, 'max_tokens: unknown field'),
       'string number': (dict(prompt="Hi", max_new_tokens="8"), 422, 'max_new_tokens: Input should be a valid integer'),
       'unknown controller': (dict(prompt="Hi", controller='v7'), 404, "controller: controller='v7' is unknown; valid controllers: ['active', 'scripted', 'plain']")}
got = {k: client.post('/generate', json=b) for k, (b, _, _) in bad.items()}
{k: (v.status_code, v.json()['detail'] if isinstance(v.json()['detail'], str) else v.json()['detail']['message']) for k, v in got.items()}

# %%
for k, (b, code, msg) in bad.items():
    d = got[k].json()['detail']
    test_eq(got[k].status_code, code)
    test_eq((d if isinstance(d, str) else d['message']).startswith(msg), True)
test_eq(got['unknown controller'].json()['detail']['valid'], ['active', 'scripted', 'plain'])
r_json = client.post('/generate', content=b'{"prompt": "Hi", ', headers={'content-type': 'application/json'})
test_eq((r_json.status_code, r_json.json()['detail'].startswith('body: is not valid JSON')), (422, True))
r_big = client.post('/generate', content=b'{"prompt": "' + b'x' * 10_000 + b'"}', headers={'content-type': 'application/json'})
test_eq((r_big.status_code, 'serve.max_prompt_chars' in r_big.json()['detail']), (413, True))

# %% [markdown]
# `/health` and `/versions` (no registry behind a `StaticResolver`: no versions, the controller names):

# %%
client.get('/health').json(), client.get('/versions').json()

# %%
h = client.get('/health').json()
test_eq((h['status'], h['slm_fingerprint'], h['feature_dim']), ('ok', eng.fingerprint, eng.feature_dim))
test_eq(h['stats']['ok'] >= 3 and h['stats']['active'] == 0, True)
test_eq(client.get('/versions').json(), dict(versions=[], active=None, history_length=0, controllers=['active', 'scripted', 'plain']))

# %% [markdown]
# ### Registry versions
# The real resolver on a registry in a temporary runs directory: one (untrained) policy network registered
# as `v0001`. Before its promotion `active` serves the threshold controller and `v1` serves the version by
# name; after it, `active` serves `v0001` at once, without restarting the app.

# %%
from pathlib import Path
from research_controller.network import PolicyValueNet, save_checkpoint
from research_controller.promotion import ControllerRegistry
from research_controller.macro_actions import ACTION_NAMES, N_ACTIONS
reg_dir = tempfile.mkdtemp()
gcfg = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4', f'paths.runs_dir={reg_dir}'])
torch.manual_seed(0)
ck = save_checkpoint(PolicyValueNet(eng.feature_dim, N_ACTIONS, gcfg.network), Path(reg_dir)/'net.pt', eng.fingerprint, ACTION_NAMES, gcfg)
reg = ControllerRegistry.from_config(gcfg, eng.fingerprint, eng.feature_dim)
v1 = reg.register(ck, dict(slm_fingerprint=eng.fingerprint, feature_dim=eng.feature_dim, notes='serve test'))
gclient = TestClient(create_app(gcfg, engine=eng))  # the default resolver: RegistryResolver on the configured registry
ask = lambda **kw: gclient.post('/generate', json=dict(prompt="Name a colour.", max_new_tokens=12, **kw)).json()
before, by_name = ask(), ask(controller='v1')
reg.promote(v1, who='test', why='serve test')
after = ask()
[(b['controller'], b['controller_version'], b['tokens']) for b in (before, by_name, after)], gclient.get('/versions').json()

# %%
test_eq([(b['controller'], b['controller_version']) for b in (before, by_name, after)],
        [('threshold', None), ('policy', 'v0001'), ('policy', 'v0001')])
test_eq((0 < before['tokens'] <= 12, all(0 <= b['tokens'] <= 12 for b in (by_name, after))), (True, True))  # this untrained net may STOP at once
test_eq(after['text'], by_name['text'])  # the same network, the same seed
gv = gclient.get('/versions').json()
test_eq((gv['versions'], gv['active'], gv['history_length']), (['v0001'], 'v0001', 2))
test_eq(gv['controllers'], ['active', 'v0001', 'best_of_n', 'greedy', 'sampling', 'threshold'])
test_eq(gclient.get('/health').json()['active_version'], 'v0001')
r404 = gclient.post('/generate', json=dict(prompt="Hi", controller='v2'))
test_eq((r404.status_code, r404.json()['detail']['valid']), (404, gv['controllers']))

# %% [markdown]
# A version that cannot be loaded (here: a second version whose checkpoint bytes were damaged after it was
# registered) is a 503 that says why; the other controllers keep working.

# %%
v2 = reg.register(ck, dict(slm_fingerprint=eng.fingerprint, feature_dim=eng.feature_dim, notes='to be damaged'))
with open(reg.root/'versions'/v2/'checkpoint.pt', 'ab') as f: f.write(b'garbage')
r503 = gclient.post('/generate', json=dict(prompt="Hi", controller=v2))
r503.status_code, r503.json()['detail'][:150]

# %%
test_eq(r503.status_code, 503)
test_eq("'v0002' could not be loaded (RegistryError: checkpoint of v0002 is corrupt" in r503.json()['detail'], True)
test_eq(gclient.post('/generate', json=dict(prompt="Hi", max_new_tokens=4, controller='greedy')).status_code, 200)

# %% [markdown]
# ### Thoughts are never logged
# Every logger at DEBUG (the engine's per-decision debug lines included) while a request asks for its
# thoughts: the captured log holds neither the thought text nor the thought tokens.

# %%
#| export
@contextlib.contextmanager
def capture_logs(level=logging.DEBUG):
    "Capture every log record (all loggers, `level` and up) into a `StringIO` while the block runs."
    buf, h = io.StringIO(), logging.StreamHandler()
    h.stream = buf; h.setLevel(level); h.setFormatter(logging.Formatter('%(name)s %(levelname)s %(message)s'))
    root = logging.getLogger()
    named = [logging.getLogger(n) for n in ('research_controller', 'uvicorn', 'uvicorn.access', 'uvicorn.error', 'fastapi', 'httpx')]
    old = [(root.level, None)] + [(l.level, l) for l in named]
    root.addHandler(h); root.setLevel(level)
    for l in named: l.setLevel(level)
    try: yield buf
    finally:
        root.removeHandler(h); root.setLevel(old[0][0])
        for lv, l in old[1:]: l.setLevel(lv)

# %%
with capture_logs() as logbuf:
    bt = client.post('/generate', json=dict(prompt="Tell me a story.", max_new_tokens=20, seed=3, include_trace=True, include_thoughts=True)).json()
logged = logbuf.getvalue()
thought_chunks = [e['chunk'] for e in bt['macro_trace'] if e['action'] in ('THINK_BEGIN', 'CONTINUE', 'THINK_END')][:3]
print(logged[-300:])
len(logged), thought_chunks

# %%
test_eq('request ' in logged and 'status=200' in logged, True)  # the capture works
test_eq('step 0 THINK_BEGIN' in logged, True)  # the engine's debug lines were captured too
secrets = [c.strip() for c in thought_chunks if len(c.strip()) >= 6] + [bt['thought_text'].strip(), '<assistant_thought>', '</assistant_thought>']
test_eq(len(secrets) >= 3, True)
for sct in secrets: test_eq(sct in logged, False)

# %% [markdown]
# ### Streaming
# The same request as above, streamed: three redacted thought decisions, three visible chunks, then the summary.

# %%
with client.stream('POST', '/generate/stream', json=dict(prompt="Why is the sky blue?", max_new_tokens=16, seed=1)) as sr:
    stream = parse_sse(sr.read().decode())
[(e, d.get('action'), d.get('chunk', '')[:18]) for e, d in stream]

# %%
test_eq(sr.status_code, 200)
test_eq([e for e, _ in stream], ['chunk'] * 6 + ['done'])
test_eq(stream[-1][1]['text'], body['text'])  # the same answer as /generate
test_eq(stream[-2][1]['text'], body['text'])  # the last chunk event already holds the whole visible text
test_eq([d['chunk'] for _, d in stream[:3]], ['[thought redacted]'] * 3)
test_eq(''.join(d['chunk'] for _, d in stream[3:6]), body['text'])
test_eq(any('thought_text' in d for _, d in stream), False)
with client.stream('POST', '/generate/stream', json=dict(prompt="Why is the sky blue?", max_new_tokens=16, seed=1, include_thoughts=True)) as sr:
    st2 = parse_sse(sr.read().decode())
bt1 = client.post('/generate', json=dict(prompt="Why is the sky blue?", max_new_tokens=16, seed=1, include_thoughts=True)).json()
test_eq(st2[1][1]['chunk'] != '[thought redacted]', True)
test_eq((st2[-1][0], st2[-1][1]['thought_text']), ('done', bt1['thought_text']))
test_eq(client.post('/generate/stream', json=dict(prompt="Hi", controller='nope')).status_code, 404)
test_eq(client.post('/generate/stream', json=dict(prompt="")).status_code, 422)

# %% [markdown]
# ### Timeouts
# A slow controller (0.1 s per decision) against a 0.3 s timeout: `/generate` answers 504 naming the
# setting, the stream ends with an `error` event, and in both cases the worker stops soon after instead of
# finishing the generation.

# %%
ct = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4', 'serve.request_timeout_s=0.3', 'serve.max_concurrency=2'])
slow = StaticResolver({'slow': ScriptedController('slow', delay_s=0.1)})
tapp = create_app(ct, engine=eng, resolver=slow)
def settle(app, limit_s=10.0):
    "Wait until no generation runs in `app` (polling; returns the counters)."
    t = time.monotonic()
    while app.state.stats.snapshot()['active'] and time.monotonic() - t < limit_s: time.sleep(0.02)
    return app.state.stats.snapshot()
with TestClient(tapp) as tc:
    rt = tc.post('/generate', json=dict(prompt="Hi", max_new_tokens=64))
    with tc.stream('POST', '/generate/stream', json=dict(prompt="Hi", max_new_tokens=64)) as sr: ts = parse_sse(sr.read().decode())
    tstats = settle(tapp)
rt.status_code, rt.json()['detail'], ts[-1], tstats, slow('slow').decisions

# %%
test_eq(rt.status_code, 504)
test_eq('serve.request_timeout_s=0.3' in rt.json()['detail'], True)
test_eq((ts[-1][0], ts[-1][1]['status']), ('error', 504))
test_eq(all(e == 'chunk' for e, _ in ts[:-1]), True)
test_eq((tstats['timeouts'], tstats['active'], tstats['ok']), (2, 0, 0))
test_eq(slow('slow').decisions < 16, True)  # both workers stopped early: ONE full 64-token run takes 16 decisions

# %% [markdown]
# ## A real server
# `ServerThread` runs the app under uvicorn on 127.0.0.1 and a free port in a background thread (tests,
# benchmarks, notebooks); `serve(cfg)` is the blocking entry point `rc serve` calls.

# %%
#| export
def free_port(host:str='127.0.0.1') -> int:
    "A TCP port that is free on `host` right now."
    with socket.socket() as s: s.bind((host, 0)); return s.getsockname()[1]

class ServerThread:
    "Run `app` under uvicorn in a background thread; a context manager whose `url` is the base URL."
    def __init__(self, app, host:str='127.0.0.1', port:int|None=None, log_level:str='warning', start_timeout_s:float=30.0):
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level, lifespan='on'))
        self.thread, self.start_timeout_s = threading.Thread(target=self.server.run, daemon=True, name='rc-uvicorn'), start_timeout_s
    @property
    def url(self) -> str: return f"http://{self.host}:{self.port}"
    def start(self) -> 'ServerThread':
        "Start the server and wait until it accepts connections."
        self.thread.start(); t = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t > self.start_timeout_s:
                raise RuntimeError(f"uvicorn did not start on {self.url} within {self.start_timeout_s} s (port in use?).")
            time.sleep(0.02)
        return self
    def stop(self):
        "Ask the server to exit and wait for its thread."
        self.server.should_exit = True; self.thread.join(timeout=10)
    def __enter__(self): return self.start()
    def __exit__(self, *a): self.stop()
    def __repr__(self): return f"ServerThread({self.url}, running={self.thread.is_alive()})"

def serve(cfg:Config|None=None, host:str|None=None, port:int|None=None):
    "Serve the configured SLM and the registry's controllers over HTTP until interrupted (blocking)."
    cfg = cfg or load_config()
    host, port = host or cfg.serve.host, port or cfg.serve.port
    if not log.hasHandlers():  # no handler here or above (`rc serve` has one on `research_controller`): add one
        h = logging.StreamHandler(); h.setFormatter(logging.Formatter('%(levelname)s:     %(name)s: %(message)s'))
        log.addHandler(h)
    if log.getEffectiveLevel() > logging.INFO: log.setLevel(logging.INFO)  # show the per-request lines next to uvicorn's, once
    app = create_app(cfg)
    log.info("serving SLM %s (fingerprint %s) on http://%s:%d, max_concurrency=%d", cfg.slm.source, app.state.engine.fingerprint,
             host, port, cfg.serve.max_concurrency)
    uvicorn.run(app, host=host, port=port, log_level='info')

# %% [markdown]
# Concurrent clients against a real server: 12 requests with different seeds from 12 threads, while at most
# `serve.max_concurrency = 2` generate at once. Every answer must equal the answer of the same request made
# alone (the shared engine must not mix states, and batching their steps must not change them in fp32), and
# the server must never have run more than 2 generations at once. A slowed controller (10 ms per decision) makes the requests overlap for sure.

# %%
capp = create_app(cfg, engine=eng, resolver=StaticResolver({'scripted': ScriptedController(delay_s=0.01)}))
reqs = [dict(prompt=p, max_new_tokens=12 + i % 3 * 4, seed=i, include_trace=True) for i, p in
        enumerate(["Hi", "What is 2+2?", "Name a river.", "Tell me a joke."] * 3)]
alone = [client.post('/generate', json=q).json() for q in reqs]
with ServerThread(capp) as srv:
    def call(q):
        with httpx.Client(base_url=srv.url, timeout=30) as c: return c.post('/generate', json=q)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(12) as ex: answers = list(ex.map(call, reqs))
    t_conc = time.monotonic() - t0
    with httpx.Client(base_url=srv.url) as c:
        with c.stream('POST', '/generate/stream', json=reqs[1]) as sr: live = parse_sse(sr.read().decode())
        srv_health = c.get('/health').json()
srv, round(t_conc, 2), [a.status_code for a in answers], srv_health['stats']

# %%
test_eq([a.status_code for a in answers], [200] * 12)
test_eq([a.json()['text'] for a in answers], [a['text'] for a in alone])
test_eq([a.json()['tokens'] for a in answers], [q['max_new_tokens'] for q in reqs])
test_eq([[t['chunk'] for t in a.json()['macro_trace']] for a in answers], [[t['chunk'] for t in a['macro_trace']] for a in alone])
test_eq(srv_health['stats']['max_active'], 2)  # bounded by serve.max_concurrency, and really concurrent
test_eq(srv_health['batching']['engine_calls'] < srv_health['batching']['request_steps'], True)  # steps of concurrent requests were merged
test_eq((live[-1][0], live[-1][1]['text']), ('done', alone[1]['text']))
test_eq(srv.thread.is_alive(), False)  # stopped

# %% [markdown]
# Clients that hang up. A slowed controller (250 ms per decision) needs 16 decisions, about 4 s, for 64
# tokens. A `/generate` client that gives up after 0.5 s and a stream client that closes after its first
# event must both stop their generations: the worker is free again within a decision or two (not after 4 s),
# and each request is counted as `cancelled`, not as answered.

# %%
slow = ScriptedController(script=(), delay_s=0.25)
gapp = create_app(cfg, engine=eng, resolver=StaticResolver({'scripted': slow}))
long_req = dict(prompt="Tell me a long story.", max_new_tokens=64, seed=0)

def until_idle(c, timeout_s=5.0):
    "Seconds until the server runs no generation (None if it still does after `timeout_s`), and its counters."
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        stats = c.get('/health').json()['stats']
        if stats['active'] == 0: return round(time.monotonic() - t0, 2), stats
        time.sleep(0.05)
    return None, stats

with ServerThread(gapp) as srv, httpx.Client(base_url=srv.url) as c:
    try: c.post('/generate', json=long_req, timeout=0.5); hung_up = False
    except httpx.ReadTimeout: hung_up = True
    idle_plain, stats_plain = until_idle(c); decisions_plain = slow.decisions
    with c.stream('POST', '/generate/stream', json=long_req, timeout=5) as sr: first_line = next(sr.iter_lines())
    idle_stream, stats_stream = until_idle(c); decisions_stream = slow.decisions - decisions_plain
hung_up, (idle_plain, decisions_plain), (first_line, idle_stream, decisions_stream), stats_stream

# %%
test_eq(hung_up, True)
test_eq(idle_plain is not None and idle_plain < 2.0, True)   # stopped, not run to its 4 s end
test_eq(decisions_plain < 10, True)                          # of 16
test_eq((stats_plain['cancelled'], stats_plain['ok'], stats_plain['active']), (1, 0, 0))
test_eq(first_line, 'event: chunk')
test_eq(idle_stream is not None and idle_stream < 2.0 and decisions_stream < 10, True)
test_eq((stats_stream['cancelled'], stats_stream['ok'], stats_stream['active']), (2, 0, 0))

# %% [markdown]
# ## The real SLM, once
# The default SLM with the default resolver (a fresh registry in a temporary runs directory, so nothing is
# active and `active` serves the threshold controller): one short request through the whole stack.

# %%
from research_controller.engine import get_engine
with tempfile.TemporaryDirectory() as td:
    rcfg = load_config(overrides=[f'paths.runs_dir={td}'])
    rapp = create_app(rcfg, engine=get_engine(rcfg))
    with TestClient(rapp) as rc_client:
        real = rc_client.post('/generate', json=dict(prompt="What is the capital of France?", max_new_tokens=16, include_trace=True))
        real_versions = rc_client.get('/versions').json()
real.status_code, real.json()['text'], real.json()['controller'], real.json()['tokens'], real.json()['latency_ms']

# %%
rj = real.json()
test_eq((real.status_code, rj['controller'], rj['controller_version']), (200, 'threshold', None))
test_eq(0 < rj['tokens'] <= 16 and len(rj['text'].strip()) > 0, True)
test_eq(real_versions['active'], None)
test_eq(set(real_versions['controllers']) >= {'active', 'greedy', 'threshold'}, True)

# %% [markdown]
# ## Running the service
# `rc serve` (or `serve(load_config())`) blocks until interrupted:
#
# ```bash
# rc serve --port 8000
# curl -s localhost:8000/generate -H 'content-type: application/json' \
#      -d '{"prompt": "What is the capital of France?", "max_new_tokens": 32}'
# curl -sN localhost:8000/generate/stream -H 'content-type: application/json' -d '{"prompt": "Hi"}'
# ```

# %%
#| eval: false
serve(load_config())
