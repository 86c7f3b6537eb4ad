# %%
#| default_exp evaluate

# %% [markdown]
# # Evaluate
# > A fixed, versioned benchmark suite; any controller run on it at equal token budget; paired statistics, tables and plots.

# %%
#| export
from __future__ import annotations
import hashlib, json, math, time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional
import numpy as np
from fastcore.basics import patch_to
from tqdm.auto import tqdm
from research_controller.config import (Config, EvaluateConfig, atomic_write, atomic_write_text, config_hash, data_path,
                                        load_config, run_path, sha256_file)

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import os, random, shutil, itertools, tempfile
from scipy import stats as sstats
from types import SimpleNamespace

# %% [markdown]
# ## Small helpers
# Every file this module writes goes through `config.atomic_write_text`: the text lands in a temp file in the
# same directory, is flushed to disk, then `os.replace`d over the target, so a reader never sees half a file.

# %%
#| export
def _jsonable(o):
    "Replace NaN/inf floats by None so the JSON is strict."
    if isinstance(o, float) and not math.isfinite(o): return None
    if isinstance(o, dict): return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)): return [_jsonable(v) for v in o]
    if isinstance(o, np.generic): return _jsonable(o.item())
    return o

def atomic_write_json(path:str|Path, obj) -> Path:
    "Write `obj` as indented, strict JSON to `path` atomically."
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=1, ensure_ascii=False, allow_nan=False) + '\n')

def sha256_json(obj) -> str:
    "sha256 of the canonical JSON of `obj` (sorted keys, no whitespace)."
    return hashlib.sha256(json.dumps(_jsonable(obj), sort_keys=True, separators=(',', ':'), ensure_ascii=False).encode()).hexdigest()

# %%
with tempfile.TemporaryDirectory() as d:
    p = atomic_write_json(Path(d)/'sub'/'x.json', {'b': float('nan'), 'a': [1, np.float32(0.5)]})
    test_eq(json.loads(p.read_text()), {'b': None, 'a': [1, 0.5]})
    test_eq(sorted(os.listdir(p.parent)), ['x.json'])  # no temp file left behind
    test_eq(sha256_file(p), hashlib.sha256(p.read_bytes()).hexdigest())
test_eq(sha256_json({'a': 1, 'b': 2}), sha256_json({'b': 2, 'a': 1}))
sha256_json({'a': 1})[:16]

# %% [markdown]
# ## The benchmark suite
# A suite is a list of task items (the shared format `{"id", "task", "prompt", "references", "meta"}`)
# plus the seed and the token budget every controller gets per item. `check_item` refuses a bad item
# with the field and the fix.

# %%
#| export
TASKS = ('squad', 'gsm8k', 'nq_open', 'wikitext')
ITEM_KEYS = ('id', 'task', 'prompt', 'references', 'meta')
# the data files the eval split of each task is drawn from (see `research_controller.rewards.load_task_items`)
EVAL_FILES = {'squad': ['squad_v1.1/dev.jsonl'], 'gsm8k': ['gsm8k/test.jsonl'], 'nq_open': ['nq_open/dev.jsonl'],
              'wikitext': ['wikitext-2-raw/wiki.valid.raw', 'wikitext-2-raw/wiki.test.raw']}

class SuiteError(ValueError):
    "A benchmark suite (or result) that is malformed, modified or mismatched."

def check_item(item:dict, where:str='task item') -> dict:
    "Return `item` if it is a valid task item, else raise `SuiteError` naming the field."
    if not isinstance(item, dict):
        raise SuiteError(f"{where} must be a dict with keys {list(ITEM_KEYS)}, got {type(item).__name__}.")
    missing = [k for k in ITEM_KEYS if k not in item]
    if missing: raise SuiteError(f"{where} lacks {missing}; every task item needs {list(ITEM_KEYS)}.")
    iid = item['id']
    if not isinstance(iid, str) or not iid: raise SuiteError(f"{where}: 'id' must be a non-empty string, got {iid!r}.")
    if item['task'] not in TASKS: raise SuiteError(f"{where} ({iid}): 'task' is {item['task']!r}; use one of {list(TASKS)}.")
    if not isinstance(item['prompt'], str) or not item['prompt'].strip():
        raise SuiteError(f"{where} ({iid}): 'prompt' must be a non-empty string.")
    refs = item['references']
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise SuiteError(f"{where} ({iid}): 'references' must be a list of strings, got {refs!r:.80}.")
    if not isinstance(item['meta'], dict): raise SuiteError(f"{where} ({iid}): 'meta' must be a dict, got {type(item['meta']).__name__}.")
    return item

# %%
good = {'id': 'nq-1', 'task': 'nq_open', 'prompt': 'Q: capital of France?', 'references': ['Paris'], 'meta': {}}
test_eq(check_item(good), good)
test_fail(lambda: check_item({**good, 'task': 'trivia'}), contains="'task' is 'trivia'; use one of")
test_fail(lambda: check_item({k: v for k, v in good.items() if k != 'meta'}), contains="lacks ['meta']")
test_fail(lambda: check_item({**good, 'references': 'Paris'}), contains="'references' must be a list of strings")

# %% [markdown]
# `Suite` holds the items in a fixed order. Its `hash` is the sha256 of everything that defines it
# (name, version, seed, budget, source files, items), so two results can only be compared when they
# were produced on the very same suite.

# %%
#| export
@dataclass
class Suite:
    "A fixed, versioned benchmark suite: task items, seed and per-item token budget."
    name: str  # short name, e.g. 'default'
    items: list  # task items, in a fixed order
    version: int = 1  # bump when the items change on purpose
    seed: int = 0  # seeds every item's generation (see `item_seed`) and the bootstrap
    token_budget: int = 64  # tokens every controller may spend per item (equal budget)
    created_from: list = field(default_factory=list)  # [{"path": data file, "sha256": ...}]

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name: raise SuiteError(f"suite 'name' must be a non-empty string, got {self.name!r}.")
        if not isinstance(self.token_budget, int) or self.token_budget < 1:
            raise SuiteError(f"suite {self.name!r}: 'token_budget' must be a positive integer, got {self.token_budget!r}.")
        if not self.items: raise SuiteError(f"suite {self.name!r} has no items; a suite needs at least one task item.")
        self.items = [check_item(it, f"suite {self.name!r} item {i}") for i, it in enumerate(self.items)]
        dup = [k for k, c in Counter(it['id'] for it in self.items).items() if c > 1]
        if dup: raise SuiteError(f"suite {self.name!r} has duplicate item ids {dup[:5]}; ids must be unique.")

    def content(self) -> dict:
        "Everything that defines the suite (what the hash covers)."
        return dict(name=self.name, version=self.version, seed=self.seed, token_budget=self.token_budget,
                    created_from=self.created_from, items=self.items)

    @property
    def hash(self) -> str: return sha256_json(self.content())
    def __len__(self): return len(self.items)
    def __iter__(self): return iter(self.items)
    def task_counts(self) -> dict: return dict(sorted(Counter(it['task'] for it in self.items).items()))
    def __repr__(self):
        tc = ', '.join(f"{t} {n}" for t, n in self.task_counts().items())
        return f"Suite({self.name!r} v{self.version}, {len(self)} items: {tc}; budget {self.token_budget} tokens; hash {self.hash[:12]})"

# %%
def toy_suite(n_per_task=6, seed=0, tasks=('squad', 'nq_open', 'wikitext')):
    "A small hand-made suite for fast tests."
    items = []
    for t in tasks:
        for i in range(n_per_task):
            ans = f"answer{i}" if t != 'wikitext' else f"the story goes on {i}"
            items.append({'id': f"{t}-{i}", 'task': t, 'prompt': f"[{t}] question {i}?", 'references': [ans], 'meta': {}})
    return Suite('toy', items, seed=seed, token_budget=32)

suite = toy_suite()
test_eq(len(suite), 18)
test_eq(toy_suite().hash, suite.hash)                 # deterministic
test_eq(toy_suite(seed=1).hash == suite.hash, False)  # the seed is part of the identity
test_fail(lambda: Suite('x', suite.items + suite.items[:1]), contains='duplicate item ids')
suite

# %% [markdown]
# Saving writes the content plus its hash; `load_suite` recomputes the hash and refuses a file that
# was edited after it was saved.

# %%
#| export
@patch_to(Suite)
def to_dict(self) -> dict:
    "JSON-ready dict: the content plus its `hash`."
    c = self.content()
    return dict(name=c.pop('name'), version=c.pop('version'), hash=self.hash, **c)

@patch_to(Suite)
def save(self, path:str|Path) -> Path:
    "Write the suite to `path` as JSON, atomically."
    return atomic_write_json(path, self.to_dict())

def load_suite(path:str|Path) -> Suite:
    "Load a suite JSON and check that its content still matches its recorded hash."
    p = Path(path)
    if not p.exists(): raise SuiteError(f"suite file {str(p)!r} does not exist. Build one with build_default_suite(cfg).save(path), or set evaluate.suite_path=null to use the default suite.")
    try: d = json.loads(p.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e: raise SuiteError(f"suite file {str(p)!r} is not valid JSON: {e}") from None
    need = ('name', 'version', 'hash', 'seed', 'token_budget', 'created_from', 'items')
    if not isinstance(d, dict) or any(k not in d for k in need):
        got = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise SuiteError(f"suite file {str(p)!r} must be a JSON object with keys {list(need)} (as written by Suite.save); got {got}.")
    s = Suite(name=d['name'], items=d['items'], version=d['version'], seed=d['seed'],
              token_budget=d['token_budget'], created_from=d['created_from'])
    if s.hash != d['hash']:
        raise SuiteError(f"suite file {str(p)!r} was modified after it was saved: its content hashes to {s.hash[:12]} "
                         f"but the file records {str(d['hash'])[:12]}. A saved suite is fixed: restore the original file, or "
                         f"build a new suite and save it with a new version number.")
    return s

# %% [markdown]
# Round trip, then an edited file:

# %%
with tempfile.TemporaryDirectory() as d:
    p = suite.save(Path(d)/'toy.json')
    s2 = load_suite(p)
    test_eq(s2.items, suite.items); test_eq(s2.hash, suite.hash)
    d2 = json.loads(p.read_text()); d2['items'][0]['references'] = ['something else']
    p.write_text(json.dumps(d2))
    test_fail(lambda: load_suite(p), contains='was modified after it was saved')
    p.write_text('{"name": "x"}')
    test_fail(lambda: load_suite(p), contains='must be a JSON object with keys')
test_fail(lambda: load_suite('no/such/suite.json'), contains='does not exist')
list(suite.to_dict())

# %% [markdown]
# ## The default suite
# `build_default_suite` draws `evaluate.per_task` eval-split items of each task in `evaluate.tasks`
# through the rewards module's loader (`research_controller.rewards.load_task_items`, which keeps the
# eval split disjoint from self-play data), and records the eval data files of those tasks with their sha256.
# `loader` can be replaced, e.g. by a small fake in tests.

# %%
#| export
def suite_sources(cfg:Config, tasks:Iterable[str]) -> list:
    "The eval data files behind `tasks`, as `{'path', 'sha256'}` relative to the data directory."
    out = []
    for t in tasks:
        for rel in EVAL_FILES[t]:
            f = data_path(cfg, rel)
            if not f.is_file(): raise SuiteError(f"data file {str(f)!r} of task {t!r} is missing; check paths.data_dir (data/README.md lists the files).")
            out.append({'path': rel, 'sha256': sha256_file(f)})
    return out

def build_default_suite(cfg:Config, # uses cfg.evaluate.{tasks, per_task, seed, token_budget}
                        name:str='default', # suite name
                        version:int=1, # suite version
                        loader:Callable|None=None, # `load_task_items(cfg, task, split, n, seed)`; None = research_controller.rewards'
                       ) -> Suite:
    "Build the default benchmark suite from the eval split of the project's data."
    ec = cfg.evaluate
    bad = [t for t in ec.tasks if t not in TASKS]
    if bad: raise SuiteError(f"evaluate.tasks has unknown task(s) {bad}; use some of {list(TASKS)}.")
    if loader is None: from research_controller.rewards import load_task_items as loader
    items = []
    for t in ec.tasks:
        got = list(loader(cfg, t, split='eval', n=ec.per_task, seed=ec.seed))
        if not got: raise SuiteError(f"the loader returned no eval items for task {t!r}; check the data under {str(data_path(cfg))!r}.")
        items += [check_item(dict(it), f"{t} eval item {i}") for i, it in enumerate(got)]
    return Suite(name, items, version=version, seed=ec.seed, token_budget=ec.token_budget,
                 created_from=suite_sources(cfg, ec.tasks))

def get_suite(cfg:Config, loader:Callable|None=None) -> Suite:
    "The configured suite: `evaluate.suite_path` if set, else the default suite."
    if cfg.evaluate.suite_path: return load_suite(cfg.evaluate.suite_path)
    return build_default_suite(cfg, loader=loader)

# %% [markdown]
# Built with a tiny fake loader (the rewards module owns the real one; a `#| slow` cell at the end uses it):

# %%
def fake_loader(cfg, task, split='eval', n=None, seed=0):
    rng = random.Random(f"{task}:{seed}")
    return [{'id': f"{task}-{rng.randrange(10**6)}", 'task': task, 'prompt': f"{task} prompt {i}", 'references': ['x'], 'meta': {'split': split}}
            for i in range(n)]

cfg = load_config(overrides=['evaluate.per_task=3', 'evaluate.tasks=[gsm8k, nq_open]'])
ds = build_default_suite(cfg, loader=fake_loader)
test_eq(ds.task_counts(), {'gsm8k': 3, 'nq_open': 3})
test_eq([f['path'] for f in ds.created_from], ['gsm8k/test.jsonl', 'nq_open/dev.jsonl'])
test_eq(ds.created_from[1]['sha256'][:12], 'c48885c73813')  # the sha256 data/README.md lists
test_eq(build_default_suite(cfg, loader=fake_loader).hash, ds.hash)
test_fail(lambda: build_default_suite(load_config(overrides=['evaluate.tasks=[chess]']), loader=fake_loader), contains="unknown task(s) ['chess']")
ds

# %% [markdown]
# The real default suite (`evaluate.per_task` = 8 items of each of the four tasks, about a second to build):

# %%
default_suite = build_default_suite(load_config())
test_eq(default_suite.task_counts(), {'gsm8k': 8, 'nq_open': 8, 'squad': 8, 'wikitext': 8})
test_eq(build_default_suite(load_config()).hash, default_suite.hash)  # rebuilding gives the same suite
test_eq(default_suite.hash == build_default_suite(load_config(overrides=['evaluate.seed=1'])).hash, False)
from research_controller.rewards import load_task_items
train_ids = {it['id'] for t in TASKS for it in load_task_items(load_config(), t, split='train')}
test_eq(train_ids & {it['id'] for it in default_suite}, set())  # never an item self-play trains on
with tempfile.TemporaryDirectory() as d: test_eq(load_suite(default_suite.save(Path(d)/'s.json')).hash, default_suite.hash)
print(default_suite); print(default_suite.items[8]['prompt'][:160])

# %% [markdown]
# ## Running a controller on the suite
# Each item is generated with a seed derived from the suite seed and the item id, so two controllers
# see the same seed on the same item (paired), whatever the item order.

# %%
#| export
def item_seed(suite_seed:int, item_id:str) -> int:
    "Stable 31-bit generation seed of one item."
    return int(hashlib.sha256(f"{suite_seed}:{item_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF

# %%
test_eq(item_seed(0, 'a'), item_seed(0, 'a'))
test_eq(item_seed(0, 'a') == item_seed(1, 'a'), False)
item_seed(1234, 'gsm8k-0')

# %% [markdown]
# One `ItemRecord` per (controller, item): the visible text (never thought text), the task metrics and
# every reward term from the rewards module, tokens spent, wall-clock latency and the error, if any.

# %%
#| export
@dataclass
class ItemRecord:
    "The outcome of one controller on one suite item."
    controller: str
    version: Optional[str]
    item_id: str
    task: str
    text: str  # visible answer only, never thought text
    metrics: dict  # task metrics, e.g. {'f1': .., 'em': ..}; only those defined for the task
    terms: dict  # every reward term
    reward: float  # total reward (NaN when scoring itself failed)
    tokens: int  # every token the controller spent
    latency_ms: float  # wall clock of `controller.generate`
    error: Optional[str] = None  # 'ExcType: message' when generation or scoring failed
    seed: int = 0
    actions: dict = field(default_factory=dict)  # macro-action counts from the trace

    def value(self, metric:str) -> float:
        "One number of this record: 'reward', 'tokens', 'latency_ms', 'error', 'term.<name>' or a task metric."
        if metric == 'reward': return self.reward
        if metric in ('tokens', 'latency_ms'): return float(getattr(self, metric))
        if metric == 'error': return float(self.error is not None)
        if metric.startswith('term.'): return float(self.terms.get(metric[5:], math.nan))
        return float(self.metrics.get(metric, math.nan))

# %% [markdown]
# `SuiteResult` collects the records of one controller on one suite, with the suite's hash and budget.

# %%
#| export
@dataclass
class SuiteResult:
    "All item records of one controller on one suite."
    controller: str
    version: Optional[str]
    suite: str  # suite name
    suite_hash: str
    token_budget: int
    records: list  # [ItemRecord] in suite order
    meta: dict = field(default_factory=dict)  # slm fingerprint, config hash, ...

    @property
    def label(self) -> str: return f"{self.controller}@{self.version}" if self.version else self.controller
    @property
    def n(self) -> int: return len(self.records)
    def values(self, metric:str) -> dict: return {r.item_id: r.value(metric) for r in self.records}
    def metric_names(self) -> list: return sorted({k for r in self.records for k in r.metrics})
    def term_names(self) -> list: return sorted({k for r in self.records for k in r.terms})
    def mean(self, metric:str) -> float:
        "Mean of `metric` over the records where it is defined (NaN if none)."
        v = np.array([r.value(metric) for r in self.records], float)
        v = v[~np.isnan(v)]
        return float(v.mean()) if len(v) else math.nan
    @property
    def error_rate(self) -> float: return self.mean('error')
    @property
    def over_budget_rate(self) -> float: return float(np.mean([r.tokens > self.token_budget for r in self.records])) if self.records else math.nan
    def __repr__(self):
        return (f"SuiteResult({self.label!r} on {self.suite}[{self.suite_hash[:12]}]: {self.n} items, "
                f"reward {self.mean('reward'):.3f}, tokens {self.mean('tokens'):.1f}/{self.token_budget}, errors {self.error_rate:.0%})")

# %% [markdown]
# Aggregates: means per task and overall. A metric that a task does not define (e.g. F1 on WikiText)
# is left out of that task's mean rather than counted as 0.

# %%
#| export
def _agg(res:SuiteResult, recs:list) -> dict:
    sub = SuiteResult(res.controller, res.version, res.suite, res.suite_hash, res.token_budget, recs)
    out = {'n': len(recs)}
    for m in ['reward', *res.metric_names(), *[f"term.{t}" for t in res.term_names()], 'tokens', 'latency_ms']:
        v = sub.mean(m)
        if not math.isnan(v): out[m] = v
    out['error_rate'] = sub.error_rate
    out['over_budget_rate'] = sub.over_budget_rate
    return out

@patch_to(SuiteResult)
def summary(self) -> dict:
    "Means overall and per task: reward, task metrics, reward terms, tokens, latency, error and over-budget rates."
    tasks = sorted({r.task for r in self.records})
    return {'controller': self.controller, 'version': self.version, 'suite': self.suite, 'suite_hash': self.suite_hash,
            'token_budget': self.token_budget, 'overall': _agg(self, self.records),
            'per_task': {t: _agg(self, [r for r in self.records if r.task == t]) for t in tasks}}

@patch_to(SuiteResult)
def to_df(self):
    "One row per item: ids, text, reward, task metrics, `term.*` columns, tokens, latency, error."
    import pandas as pd
    rows = [{'controller': self.label, 'item_id': r.item_id, 'task': r.task, 'reward': r.reward, **r.metrics,
             **{f"term.{k}": v for k, v in r.terms.items()}, 'tokens': r.tokens, 'latency_ms': r.latency_ms,
             'error': r.error, 'text': r.text} for r in self.records]
    return pd.DataFrame(rows)

@patch_to(SuiteResult)
def to_dict(self) -> dict:
    "JSON-ready dict (records included)."
    d = asdict(self); d['summary'] = self.summary()
    return d

@patch_to(SuiteResult)
def save(self, path:str|Path) -> Path:
    "Write the result (records and summary) as JSON, atomically."
    return atomic_write_json(path, self.to_dict())

@patch_to(SuiteResult, cls_method=True)
def load(cls, path:str|Path) -> SuiteResult:
    "Read a result written by `SuiteResult.save`."
    p = Path(path)
    if not p.exists(): raise SuiteError(f"result file {str(p)!r} does not exist.")
    d = json.loads(p.read_text(encoding='utf-8'))
    recs = [ItemRecord(**{**r, 'reward': math.nan if r['reward'] is None else r['reward']}) for r in d['records']]
    return cls(d['controller'], d['version'], d['suite'], d['suite_hash'], d['token_budget'], recs, d.get('meta', {}))

# %% [markdown]
# `run_suite` runs a controller on every item through the shared controller contract
# (`controller.generate(engine, prompt, max_new_tokens, seed, include_thoughts=False)`) and scores the
# visible text with the rewards module (`rewards.calc(text, item, n_tokens, unclosed_thought)`; task
# metrics from `rewards.task_metrics(text, item)`). An exception is recorded on its item, never raised:
# the item then scores as an empty answer, so failures cost reward in every paired comparison.

# %%
#| export
def _count_actions(trace) -> dict:
    c = Counter()
    for step in trace or []:
        a = step.get('action') if isinstance(step, dict) else None
        if a is not None: c[getattr(a, 'name', str(a))] += 1
    return dict(sorted(c.items()))

def _takes_item(controller) -> bool:
    "Whether `controller.generate` accepts the task item (e.g. best-of-N scoring candidates by reward)."
    import inspect
    try: ps = inspect.signature(controller.generate).parameters
    except (TypeError, ValueError): return False
    return 'item' in ps or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values())

def generate_item(controller, item:dict, engine, token_budget:int, seed:int=0) -> dict:
    "Run the controller on one item: text, tokens, unclosed flag, action counts, latency and the error, if any."
    out = dict(text='', tokens=0, unclosed=False, actions={}, error=None)
    kw = {'item': item} if _takes_item(controller) else {}
    t0 = time.perf_counter()
    try:
        res = controller.generate(engine, item['prompt'], max_new_tokens=token_budget, seed=seed, include_thoughts=False, **kw)
        out.update(text=res.text, tokens=int(res.tokens), actions=_count_actions(getattr(res, 'macro_trace', None)),
                   unclosed=bool((getattr(res, 'meta', None) or {}).get('unclosed_thought', False)))
    except Exception as e: out['error'] = f"{type(e).__name__}: {e}"
    out['latency_ms'] = (time.perf_counter() - t0) * 1000
    return out

def score_item(g:dict, item:dict, rewards, metrics_fn:Callable|None=None, rb=None) -> tuple:
    "(reward, terms, metrics, error) of a generated item; `rb` = its precomputed RewardBreakdown, if any."
    metrics_fn = metrics_fn or getattr(rewards, 'task_metrics', None)
    try:
        if rb is None: rb = rewards.calc(g['text'], item=item, n_tokens=g['tokens'], unclosed_thought=g['unclosed'])
        metrics = {k: float(v) for k, v in (metrics_fn(g['text'], item) if metrics_fn else {}).items()}
        return float(rb.total), {k: float(v) for k, v in rb.terms.items()}, metrics, g['error']
    except Exception as e:
        return math.nan, {}, {}, g['error'] or f"scoring failed: {type(e).__name__}: {e}"

def _record(controller, version, item, g, scored, seed) -> ItemRecord:
    reward, terms, metrics, err = scored
    return ItemRecord(getattr(controller, 'name', type(controller).__name__), version, item['id'], item['task'], g['text'],
                      metrics, terms, reward, g['tokens'], g['latency_ms'], err, seed, g['actions'])

def run_item(controller, item:dict, engine, rewards, token_budget:int, seed:int=0, version:str|None=None,
             metrics_fn:Callable|None=None) -> ItemRecord:
    "Generate and score one item; errors are recorded in the record, not raised."
    g = generate_item(controller, item, engine, token_budget, seed)
    return _record(controller, version, item, g, score_item(g, item, rewards, metrics_fn), seed)

def _batch_scores(rewards, gens:list, items:list) -> list:
    "RewardBreakdowns of all generations in one `rewards.calc.batch` call (the judge batches its forwards); Nones if unavailable."
    batch = getattr(getattr(rewards, 'calc', None), 'batch', None)
    if batch is None: return [None] * len(gens)
    try: return list(batch([g['text'] for g in gens], items, [g['tokens'] for g in gens], [g['unclosed'] for g in gens]))
    except Exception: return [None] * len(gens)  # scored one by one, so the failing item gets its own error

def run_suite(controller, # anything with `.name` and `.generate(engine, prompt, max_new_tokens, seed, include_thoughts)`
              suite:Suite, engine, # the shared `Engine` (passed through to the controller)
              rewards, # a `RewardCalculator` (`.calc`, `.task_metrics`)
              token_budget:int|None=None, # None = the suite's budget
              version:str|None=None, # registry version of the controller, if any
              meta:dict|None=None, # extra provenance, e.g. {'slm_fingerprint': ...}
              progress:bool=True,
              metrics_fn:Callable|None=None, # (text, item) -> task metrics; None = `rewards.task_metrics`
              on_item:Callable|None=None, # called with each generation as it is done (e.g. to advance an outer progress bar)
             ) -> SuiteResult:
    "Run `controller` on every item of `suite` at equal token budget and record metrics, rewards, tokens, latency, errors."
    budget = token_budget or suite.token_budget
    version = version if version is not None else getattr(controller, 'version', None)
    name = getattr(controller, 'name', type(controller).__name__)
    gens, seeds = [], [item_seed(suite.seed, it['id']) for it in suite.items]
    for it, sd in zip(tqdm(suite.items, desc=f"eval {name}", disable=not progress, leave=False), seeds):
        gens.append(generate_item(controller, it, engine, budget, sd))
        if on_item is not None: on_item(gens[-1])
    rbs = _batch_scores(rewards, gens, suite.items)
    recs = [_record(controller, version, it, g, score_item(g, it, rewards, metrics_fn, rb), sd)
            for it, g, rb, sd in zip(suite.items, gens, rbs, seeds)]
    prov = {k: getattr(engine, a) for k, a in (('slm_fingerprint', 'fingerprint'), ('config_hash', 'config_hash'),
                                                 ('feature_dim', 'feature_dim')) if getattr(engine, a, None) is not None}
    return SuiteResult(name, version, suite.name, suite.hash, budget, recs, {**prov, **(meta or {})})

# %% [markdown]
# ### Fakes for the unit checks
# Until the engine and rewards modules are wired in, a fake controller answers with the reference with
# probability `p_right`, drawn from the item seed (so two fakes share their luck per item and a better
# one is right wherever a worse one is), and a fake reward scores exact match plus a length term.

# %%
@dataclass
class FakeResult:
    text: str; macro_trace: list; tokens: int; latency_ms: float; thought_text: str|None = None; meta: dict = field(default_factory=dict)

class FakeController:
    def __init__(self, name, suite, p_right, tokens=24, fail_ids=(), sleep_s=0.0, version=None, overspend=False):
        self.name, self.p_right, self.tokens, self.fail_ids, self.sleep_s, self.version = name, p_right, tokens, set(fail_ids), sleep_s, version
        self.overspend = overspend
        self.by_prompt = {it['prompt']: it for it in suite}
    def generate(self, engine, prompt, max_new_tokens, seed=0, include_thoughts=False):
        it = self.by_prompt[prompt]
        if it['id'] in self.fail_ids: raise RuntimeError(f"boom on {it['id']}")
        if self.sleep_s: time.sleep(self.sleep_s)
        rng = random.Random(seed)
        right = rng.random() < self.p_right
        n = self.tokens + rng.randrange(-4, 5)
        if not self.overspend: n = min(n, max_new_tokens)
        trace = [{'action': 'CONTINUE'}] * 3 + ([{'action': 'THINK_BEGIN'}] if not right else [])
        return FakeResult(it['references'][0] if right else 'no idea', trace, n, 0.0, 'secret thought' if include_thoughts else None)

class FakeRewards:
    def task_metrics(self, text, item):
        return {} if item['task'] == 'wikitext' else {'em': float(text.strip() in item['references'])}
    def calc(self, text, item=None, n_tokens=None, unclosed_thought=False):
        match = float(text.strip() in item['references'])
        terms = {'task': match, 'length': -abs((n_tokens or 0) - 24) / 48}
        return SimpleNamespace(total=2 * terms['task'] + terms['length'], terms=terms)

rewards = FakeRewards()
weak, strong = FakeController('weak', suite, 0.3), FakeController('strong', suite, 0.8)
r_weak = run_suite(weak, suite, None, rewards, progress=False)
r_strong = run_suite(strong, suite, None, rewards, progress=False)
test_eq(r_weak.suite_hash, suite.hash)
test_eq([r.item_id for r in r_weak.records], [it['id'] for it in suite])
test_eq(all(s.reward >= w.reward - 0.5 for s, w in zip(r_strong.records, r_weak.records)), True)
test_eq(r_weak.records[0].text in ('answer0', 'no idea'), True)
test_eq(any('secret' in r.text for r in r_weak.records), False)  # thought text never recorded
r_weak, r_strong

# %%
r_strong.to_df().drop(columns=['text', 'latency_ms']).head(4)

# %% [markdown]
# Errors are recorded per item and score as an empty answer; over-budget spending is counted:

# %%
flaky = FakeController('flaky', suite, 0.8, fail_ids={'squad-0', 'nq_open-3'})
r_flaky = run_suite(flaky, suite, None, rewards, progress=False)
bad = [r for r in r_flaky.records if r.error]
test_eq([(r.item_id, r.error, r.text, r.tokens) for r in bad],
        [('squad-0', 'RuntimeError: boom on squad-0', '', 0), ('nq_open-3', 'RuntimeError: boom on nq_open-3', '', 0)])
test_close(r_flaky.error_rate, 2 / 18)
test_eq(run_suite(FakeController('spender', suite, 0.5, tokens=60, overspend=True), suite, None, rewards, progress=False).over_budget_rate > 0, True)
{k: round(v, 3) for k, v in r_flaky.summary()['per_task']['squad'].items() if k != 'latency_ms'}

# %%
with tempfile.TemporaryDirectory() as d:
    p = r_flaky.save(Path(d)/'flaky.json')
    back = SuiteResult.load(p)
    test_eq(back.records, r_flaky.records); test_eq(back.summary(), r_flaky.summary())
{k: round(v, 3) for k, v in r_strong.summary()['overall'].items() if k != 'latency_ms'}

# %% [markdown]
# ## Paired statistics
# Two controllers on the same suite are compared item by item on the difference `b - a`:
# the mean difference with a paired bootstrap confidence interval (resampling items), the Wilcoxon
# signed-rank test (zero differences dropped; exact for up to 50 untied differences, else the normal
# approximation with tie correction, as R's `wilcox.test` does: scipy's own choice for small samples with
# ties is a permutation test that takes seconds) and the sign test (binomial, ties dropped).

# %%
#| export
def bootstrap_means(x:np.ndarray, n_boot:int=2000, seed:int=0, chunk:int=256) -> np.ndarray:
    "`n_boot` bootstrap means of `x` (items resampled with replacement), seeded."
    x = np.asarray(x, float); rng = np.random.default_rng(seed); out = []
    for i in range(0, n_boot, chunk):
        out.append(x[rng.integers(0, len(x), size=(min(chunk, n_boot - i), len(x)))].mean(1))
    return np.concatenate(out)

def bootstrap_ci(x, n_boot:int=2000, alpha:float=0.05, seed:int=0) -> tuple:
    "Percentile bootstrap `1-alpha` confidence interval of the mean of `x` (NaNs dropped)."
    x = np.asarray(x, float); x = x[~np.isnan(x)]
    if len(x) == 0: return (math.nan, math.nan)
    lo, hi = np.quantile(bootstrap_means(x, n_boot, seed), [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))

# %%
x = np.random.default_rng(0).normal(1.0, 1.0, 400)
lo, hi = bootstrap_ci(x, 4000, 0.05, seed=0)
test_close(hi - lo, 2 * 1.96 / 20, eps=0.02)  # ~ normal-theory width 2*1.96*sigma/sqrt(n)
test_eq(lo < x.mean() < hi, True)
test_eq(bootstrap_ci(x, seed=3), bootstrap_ci(x, seed=3))
round(lo, 3), round(hi, 3)

# %%
#| export
@dataclass
class PairedStat:
    "Paired comparison of one metric between controller `a` and controller `b` (difference = b - a)."
    metric: str
    n: int  # paired items where both values exist
    mean_a: float
    mean_b: float
    diff: float  # mean of b - a
    ci_lo: float  # paired bootstrap CI of `diff`
    ci_hi: float
    p_wilcoxon: float
    p_sign: float
    n_pos: int  # items where b > a
    n_neg: int  # items where b < a
    test: str = 'wilcoxon'  # which p is corrected: 'wilcoxon' or 'sign'
    p_adj: float = math.nan  # corrected p of `test` across the compared metrics
    alpha: float = 0.05
    @property
    def p(self) -> float: return self.p_wilcoxon if self.test == 'wilcoxon' else self.p_sign
    @property
    def significant(self) -> bool: return bool((self.p_adj if not math.isnan(self.p_adj) else self.p) < self.alpha)
    def __repr__(self):
        return (f"{self.metric}: {self.mean_b:.3f} vs {self.mean_a:.3f}, diff {self.diff:+.3f} "
                f"[{self.ci_lo:+.3f}, {self.ci_hi:+.3f}], n={self.n} (+{self.n_pos}/-{self.n_neg}), "
                f"p_wilcoxon={self.p_wilcoxon:.3g} p_sign={self.p_sign:.3g} p_adj={self.p_adj:.3g}")

def wilcoxon_p(d) -> float:
    "Two-sided Wilcoxon signed-rank p of differences `d` (zeros dropped): exact when n <= 50 without ties, else the normal approximation."
    from scipy import stats as sstats  # imported here: scipy.stats takes a second to import, the registry never needs it
    d = np.asarray(d, float); d = d[d != 0]
    if len(d) == 0: return 1.0
    ties = len(np.unique(np.abs(d))) < len(d)
    return float(sstats.wilcoxon(d, method='exact' if len(d) <= 50 and not ties else 'asymptotic').pvalue)

def sign_test_p(n_pos:int, n_neg:int) -> float:
    "Two-sided sign test p: binomial(n_pos + n_neg, 1/2) probability of a split at least this uneven."
    from scipy import stats as sstats
    return float(sstats.binomtest(n_pos, n_pos + n_neg, 0.5).pvalue) if n_pos + n_neg else 1.0

def paired_test(a, b, metric:str='reward', n_boot:int=2000, alpha:float=0.05, seed:int=0, test:str='wilcoxon',
                tol:float=1e-12) -> PairedStat:
    "Paired bootstrap CI of mean(b - a), Wilcoxon signed-rank and sign test; pairs with a NaN are dropped."
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape: raise ValueError(f"paired_test needs equally long a and b, got {a.shape} and {b.shape}.")
    if test not in ('wilcoxon', 'sign'): raise ValueError(f"test must be 'wilcoxon' or 'sign', got {test!r}.")
    keep = ~(np.isnan(a) | np.isnan(b)); a, b = a[keep], b[keep]
    if len(a) == 0: raise ValueError(f"no item has a value of {metric!r} for both controllers.")
    d = b - a; d[np.abs(d) <= tol] = 0.0
    boots = bootstrap_means(d, n_boot, seed)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    n_pos, n_neg = int((d > 0).sum()), int((d < 0).sum())
    p_w = wilcoxon_p(d)
    p_s = sign_test_p(n_pos, n_neg)
    return PairedStat(metric, len(d), float(a.mean()), float(b.mean()), float(d.mean()), float(lo), float(hi),
                      p_w, p_s, n_pos, n_neg, test, math.nan, alpha)

# %% [markdown]
# Known cases. Identical controllers: no difference, p = 1. A clear shift: significant, CI excludes 0.
# No shift: not significant and the CI covers 0.

# %%
rng = np.random.default_rng(0)
a = rng.normal(0, 1, 60)
same = paired_test(a, a.copy())
test_eq((same.diff, same.p_wilcoxon, same.p_sign, same.ci_lo, same.ci_hi), (0.0, 1.0, 1.0, 0.0, 0.0))
shift = paired_test(a, a + 0.5 + rng.normal(0, 0.3, 60))
test_eq(shift.p_wilcoxon < 1e-6 and shift.p_sign < 1e-6 and shift.ci_lo > 0.3, True)
null = paired_test(a, a + rng.normal(0, 0.3, 60))
test_eq(null.p_wilcoxon > 0.05 and null.ci_lo < 0 < null.ci_hi, True)
test_eq(paired_test([1, np.nan, 3], [2, 5, np.nan]).n, 1)  # NaN pairs dropped
shift

# %% [markdown]
# The p-values against independent computations: the exact Wilcoxon p by enumerating all 2^n sign
# assignments of the ranks, the sign test by summing the binomial tail, and scipy called directly.

# %%
d = np.array([0.3, -0.12, 0.55, 0.8, 0.21, -0.05, 0.67, 0.42, 0.9, -0.33, 0.15, 0.71])
ranks = sstats.rankdata(np.abs(d)); w_obs = ranks[d > 0].sum()
w_all = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))])
p_exact = min(1.0, 2 * min((w_all <= w_obs).mean(), (w_all >= w_obs).mean()))
ps = paired_test(np.zeros_like(d), d)
test_close(ps.p_wilcoxon, p_exact, eps=1e-12)
test_close(ps.p_wilcoxon, sstats.wilcoxon(d).pvalue, eps=1e-12)
tied = np.array([1., 1, 1, 2, 2, -1, 3, 0, 0, 1])  # ties and zeros: normal approximation on the 8 non-zero
test_close(wilcoxon_p(tied), sstats.wilcoxon(tied[tied != 0], method='asymptotic').pvalue, eps=1e-12)
k, n = 9, 12  # 9 positive of 12
test_close(ps.p_sign, min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n), eps=1e-12)
round(ps.p_wilcoxon, 5), round(float(p_exact), 5), round(ps.p_sign, 5)

# %% [markdown]
# When several metrics are compared, the p-values of the chosen test are corrected together
# (Holm's step-down method by default, or Bonferroni).

# %%
#| export
def adjust_pvalues(ps, method:str='holm') -> np.ndarray:
    "Multiple-comparison corrected p-values: 'holm' (step-down), 'bonferroni' or 'none'."
    ps = np.asarray(ps, float); m = len(ps)
    if method == 'none': return ps.copy()
    if method == 'bonferroni': return np.minimum(ps * m, 1.0)
    if method != 'holm': raise ValueError(f"correction must be 'holm', 'bonferroni' or 'none', got {method!r}.")
    adj, running = np.empty(m), 0.0
    for rank, i in enumerate(np.argsort(ps, kind='stable')):
        running = max(running, (m - rank) * ps[i]); adj[i] = min(1.0, running)
    return adj

# %%
test_close(adjust_pvalues([0.01, 0.04, 0.03], 'holm'), [0.03, 0.06, 0.06])
test_close(adjust_pvalues([0.01, 0.04, 0.03], 'bonferroni'), [0.03, 0.12, 0.09])
test_close(adjust_pvalues([0.5, 0.6], 'holm'), [1.0, 1.0])
test_fail(lambda: adjust_pvalues([0.1], 'fdr'), contains="must be 'holm'")
adjust_pvalues([0.001, 0.02, 0.04, 0.3])

# %% [markdown]
# `compare` pairs two results item by item (they must come from the same suite at the same budget),
# tests each metric, and corrects across the metrics. By default the metrics are the total reward and
# every task metric both results have; pass `metrics=` to add e.g. `'term.fluency'`, `'tokens'`.

# %%
#| export
@dataclass
class Comparison:
    "Paired comparison of two suite results, one `PairedStat` per metric (difference = b - a)."
    a: str
    b: str
    suite: str
    suite_hash: str
    stats: dict  # metric -> PairedStat
    correction: str
    alpha: float
    test: str
    def __getitem__(self, metric:str) -> PairedStat: return self.stats[metric]
    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in ('a', 'b', 'suite', 'suite_hash', 'correction', 'alpha', 'test')},
                'stats': {m: {**asdict(s), 'significant': s.significant} for m, s in self.stats.items()}}
    def table(self) -> str:
        "Markdown table of the comparison."
        lvl = f"{1 - self.alpha:.0%}"
        rows = [f"| metric | n | {self.a} | {self.b} | diff [{lvl} CI] | p Wilcoxon | p sign | p {self.test} ({self.correction}) | sig. |",
                "|---|---:|---:|---:|---|---:|---:|---:|:-:|"]
        for m, s in self.stats.items():
            rows.append(f"| {m} | {s.n} | {s.mean_a:.3f} | {s.mean_b:.3f} | {s.diff:+.3f} [{s.ci_lo:+.3f}, {s.ci_hi:+.3f}] | "
                        f"{s.p_wilcoxon:.3g} | {s.p_sign:.3g} | {s.p_adj:.3g} | {'yes' if s.significant else 'no'} |")
        return '\n'.join(rows)
    def _repr_markdown_(self): return self.table()
    def __repr__(self): return f"Comparison({self.b!r} - {self.a!r} on {self.suite}[{self.suite_hash[:12]}])\n" + self.table()

def _check_pair(a:SuiteResult, b:SuiteResult):
    if a.suite_hash != b.suite_hash:
        raise SuiteError(f"{a.label!r} and {b.label!r} ran on different suites ({a.suite}[{a.suite_hash[:12]}] vs "
                         f"{b.suite}[{b.suite_hash[:12]}]); run both on the same suite to compare them.")
    if a.token_budget != b.token_budget:
        raise SuiteError(f"{a.label!r} and {b.label!r} ran at different token budgets ({a.token_budget} vs {b.token_budget}); "
                         f"compare controllers at equal budget.")

def compare(result_a:SuiteResult, # the reference (champion / baseline)
            result_b:SuiteResult, # the candidate; differences are b - a
            ecfg:EvaluateConfig|None=None, # bootstrap, alpha, correction, test, seed
            metrics:list|None=None, # None = 'reward' + the task metrics both results have
            alpha:float|None=None, # override ecfg.alpha
           ) -> Comparison:
    "Paired statistics of `result_b - result_a` on each metric, corrected across metrics."
    ec = ecfg or EvaluateConfig(); alpha = ec.alpha if alpha is None else alpha
    _check_pair(result_a, result_b)
    if metrics is None: metrics = ['reward', *sorted(set(result_a.metric_names()) & set(result_b.metric_names()))]
    va_all = {m: result_a.values(m) for m in metrics}; vb_all = {m: result_b.values(m) for m in metrics}
    ids = [r.item_id for r in result_a.records if r.item_id in vb_all[metrics[0]]]
    st = {}
    for m in metrics:
        va, vb = np.array([va_all[m][i] for i in ids]), np.array([vb_all[m][i] for i in ids])
        if (~(np.isnan(va) | np.isnan(vb))).sum() == 0: continue
        st[m] = paired_test(va, vb, m, ec.bootstrap, alpha, ec.seed, ec.test)
    if not st: raise SuiteError(f"{result_a.label!r} and {result_b.label!r} share no scored item; nothing to compare.")
    for s, p in zip(st.values(), adjust_pvalues([s.p for s in st.values()], ec.correction)): s.p_adj = float(p)
    return Comparison(result_a.label, result_b.label, result_a.suite, result_a.suite_hash, st, ec.correction, alpha, ec.test)

# %%
cmp = compare(r_weak, r_strong, cfg.evaluate)
test_eq(list(cmp.stats), ['reward', 'em'])
test_eq(cmp['reward'].significant and cmp['reward'].ci_lo > 0, True)
test_eq(cmp['em'].n, 12)  # em is undefined on the 6 wikitext items
test_close(cmp['reward'].p_adj, min(1, 2 * min(cmp['reward'].p_wilcoxon, cmp['em'].p_wilcoxon)), eps=1e-12)  # Holm, smallest p
twin = compare(r_weak, run_suite(FakeController('weak-again', suite, 0.3), suite, None, rewards, progress=False), cfg.evaluate)
test_eq([(s.diff, s.p_adj, s.significant) for s in twin.stats.values()], [(0.0, 1.0, False), (0.0, 1.0, False)])
other = run_suite(weak, toy_suite(seed=5), None, rewards, progress=False)
test_fail(lambda: compare(r_weak, other), contains='ran on different suites')
cmp

# %% [markdown]
# ## Tables for people
# `compare_table` puts every controller and baseline in one Markdown table: means with bootstrap CIs,
# tokens, latency and error rate, and each one's reward difference to a reference controller with the
# paired CI and the corrected p (corrected across the metrics of that pair). A second table gives the
# mean reward per task.

# %%
#| export
def _fmt_ci(m, lo, hi): return '—' if math.isnan(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"

def compare_table(results:list, # SuiteResults on one suite
                  ecfg:EvaluateConfig|None=None,
                  reference:str|int=0, # label or index of the controller the others are compared with
                  metrics:list|None=None, # None = 'reward' + task metrics all results have
                  per_task:bool=True) -> str:
    "Markdown table of every result with CIs and paired reward differences to `reference`."
    ec = ecfg or EvaluateConfig()
    if not results: raise ValueError("compare_table needs at least one SuiteResult.")
    labels = [r.label for r in results]
    if isinstance(reference, int): ref = results[reference]
    elif reference in labels: ref = results[labels.index(reference)]
    else: raise ValueError(f"reference {reference!r} is not one of {labels}.")
    if metrics is None: metrics = ['reward', *sorted(set.intersection(*[set(r.metric_names()) for r in results]))]
    lvl = f"{1 - ec.alpha:.0%}"
    head = ['controller', 'n', *[f"{m} [{lvl} CI]" for m in metrics], 'tokens', 'latency ms', 'errors',
            f"Δ reward vs {ref.label} [{lvl} CI]", f"p ({ec.correction})"]
    rows = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] + ['---:'] * (len(head) - 1)) + '|']
    for r in results:
        cells = [r.label, str(r.n)]
        for m in metrics:
            v = np.array(list(r.values(m).values()), float)
            cells.append(_fmt_ci(np.nanmean(v) if (~np.isnan(v)).any() else math.nan, *bootstrap_ci(v, ec.bootstrap, ec.alpha, ec.seed)))
        cells += [f"{r.mean('tokens'):.1f}", f"{r.mean('latency_ms'):.0f}", f"{r.error_rate:.0%}"]
        if r is ref: cells += ['—', '—']
        else:
            s = compare(ref, r, ec, metrics=metrics)['reward']
            cells += [f"{s.diff:+.3f} [{s.ci_lo:+.3f}, {s.ci_hi:+.3f}]", f"{s.p_adj:.3g}" + (' *' if s.significant else '')]
        rows.append('| ' + ' | '.join(cells) + ' |')
    out = '\n'.join(rows)
    if per_task:
        tasks = sorted({rec.task for r in results for rec in r.records})
        t_rows = ['| controller | ' + ' | '.join(tasks) + ' |', '|---|' + '---:|' * len(tasks)]
        for r in results:
            s = r.summary()['per_task']
            t_rows.append(f"| {r.label} | " + ' | '.join(f"{s[t]['reward']:.3f}" if t in s and 'reward' in s[t] else '—' for t in tasks) + ' |')
        out += '\n\nMean reward per task:\n\n' + '\n'.join(t_rows)
    return out + f"\n\n{lvl} CIs: bootstrap over items ({ec.bootstrap} resamples); * = significant at α={ec.alpha} after {ec.correction} correction.\n"

# %%
tbl = compare_table([r_weak, r_strong, r_flaky], cfg.evaluate)
test_eq(tbl.count('\n| weak |'), 2)  # one row in each table
test_eq('| strong | 18 |' in tbl and ' *' in tbl.split('| strong |')[1].split('\n')[0], True)
print(tbl)

# %% [markdown]
# ## Plots
# Per-metric bars with bootstrap CIs, the mean reward terms of each controller, and tokens spent
# against score (items as faint dots, the mean with its CIs as a cross). The figures are built
# without pyplot's global state, so library calls never pop up windows.

# %%
#| export
def _figure(w, h):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), layout='constrained')

def plot_metric_bars(results:list, ecfg:EvaluateConfig|None=None, metrics:list|None=None):
    "One panel per metric: mean of each controller with its bootstrap CI."
    ec = ecfg or EvaluateConfig()
    if metrics is None: metrics = ['reward', *sorted(set.intersection(*[set(r.metric_names()) for r in results]))]
    fig = _figure(1.2 + 0.6 * len(results) * len(metrics) + 1.2 * len(metrics), 3.4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        means, errs = [], [[], []]
        for r in results:
            v = np.array(list(r.values(m).values()), float); mu = float(np.nanmean(v)) if (~np.isnan(v)).any() else math.nan
            lo, hi = bootstrap_ci(v, ec.bootstrap, ec.alpha, ec.seed)
            means.append(mu); errs[0].append(mu - lo); errs[1].append(hi - mu)
        x = np.arange(len(results))
        ax.bar(x, means, yerr=errs, capsize=4, color=[f"C{i}" for i in range(len(results))])
        ax.set_xticks(x, [r.label for r in results], rotation=30, ha='right'); ax.set_title(m); ax.axhline(0, color='k', lw=0.5)
    fig.suptitle(f"{results[0].suite}: means with {1 - ec.alpha:.0%} bootstrap CIs")
    return fig

def plot_reward_terms(results:list):
    "Grouped bars: the mean of every reward term per controller."
    terms = sorted(set().union(*[r.term_names() for r in results]))
    fig = _figure(1.5 + 0.5 * len(terms) * len(results), 3.4); ax = fig.subplots()
    w = 0.8 / len(results); x = np.arange(len(terms))
    for i, r in enumerate(results):
        ax.bar(x + (i - (len(results) - 1) / 2) * w, [r.mean(f"term.{t}") for t in terms], w, label=r.label, color=f"C{i}")
    ax.set_xticks(x, terms); ax.axhline(0, color='k', lw=0.5); ax.set_ylabel('mean term value'); ax.legend(fontsize=8)
    ax.set_title('reward term breakdown')
    return fig

def plot_tokens_vs_score(results:list, ecfg:EvaluateConfig|None=None, metric:str='reward'):
    "Tokens spent vs `metric`: items as dots, each controller's mean with bootstrap CIs on both axes."
    ec = ecfg or EvaluateConfig()
    fig = _figure(5.5, 4); ax = fig.subplots(); rng = np.random.default_rng(ec.seed)
    for i, r in enumerate(results):
        t = np.array(list(r.values('tokens').values()), float); s = np.array(list(r.values(metric).values()), float)
        ax.scatter(t + rng.uniform(-0.3, 0.3, len(t)), s, s=8, alpha=0.25, color=f"C{i}")
        (tl, th), (sl, sh) = bootstrap_ci(t, ec.bootstrap, ec.alpha, ec.seed), bootstrap_ci(s, ec.bootstrap, ec.alpha, ec.seed)
        tm, sm = np.nanmean(t), np.nanmean(s)
        ax.errorbar([tm], [sm], xerr=[[tm - tl], [th - tm]], yerr=[[sm - sl], [sh - sm]], fmt='o', ms=7, capsize=4, color=f"C{i}", label=r.label)
    ax.axvline(results[0].token_budget, color='gray', ls='--', lw=1, label='token budget')
    ax.set_xlabel('tokens spent per item'); ax.set_ylabel(metric); ax.legend(fontsize=8); ax.set_title(f"tokens vs {metric}")
    return fig

# %%
plot_metric_bars([r_weak, r_strong, r_flaky], cfg.evaluate)

# %%
plot_reward_terms([r_weak, r_strong, r_flaky])

# %%
fig = plot_tokens_vs_score([r_weak, r_strong, r_flaky], cfg.evaluate)
test_eq(len(fig.axes[0].collections) >= 3, True)
fig

# %% [markdown]
# ## Writing a comparison
# `write_comparison` is what `rc evaluate --compare` needs: every result as JSON, the Markdown table
# and the three PNGs in one directory (default `runs/eval/<suite>`), all written atomically.

# %%
#| export
def _save_fig(fig, path:Path) -> Path:
    return atomic_write(path, lambda t: fig.savefig(t, format='png', dpi=110, metadata={'Software': None}))

def save_plots(results:list, out_dir:str|Path, ecfg:EvaluateConfig|None=None) -> dict:
    "Write the three comparison plots as PNGs into `out_dir`; returns {name: path}."
    out = Path(out_dir)
    figs = {'metric_bars': plot_metric_bars(results, ecfg), 'reward_terms': plot_reward_terms(results),
            'tokens_vs_score': plot_tokens_vs_score(results, ecfg)}
    return {k: _save_fig(f, out/f"{k}.png") for k, f in figs.items()}

def write_comparison(results:list, cfg:Config, out_dir:str|Path|None=None, reference:str|int=0) -> dict:
    "Write results JSON, `compare.md` and PNG plots for `results`; returns the written paths."
    if not results: raise ValueError("write_comparison needs at least one SuiteResult.")
    for r in results[1:]: _check_pair(results[0], r)
    out = Path(out_dir) if out_dir else run_path(cfg, cfg.evaluate.out_dir)/results[0].suite
    paths = {'results': [r.save(out/'results'/f"{r.label.replace('/', '_')}.json") for r in results]}
    md = f"# {results[0].suite} [{results[0].suite_hash[:12]}], budget {results[0].token_budget} tokens\n\n" + compare_table(results, cfg.evaluate, reference)
    paths['table'] = atomic_write_text(out/'compare.md', md)
    paths.update(save_plots(results, out, cfg.evaluate))
    return paths

# %%
with tempfile.TemporaryDirectory() as d:
    paths = write_comparison([r_weak, r_strong, r_flaky], cfg, d)
    test_eq(sorted(p.name for p in Path(d).iterdir()), ['compare.md', 'metric_bars.png', 'results', 'reward_terms.png', 'tokens_vs_score.png'])
    test_eq(paths['metric_bars'].read_bytes()[:8], b'\x89PNG\r\n\x1a\n')
    test_eq(SuiteResult.load(paths['results'][1]).records, r_strong.records)
    test_fail(lambda: write_comparison([r_weak, other], cfg, d), contains='different suites')
    names = sorted(str(p.relative_to(d)) for p in Path(d).rglob('*') if p.is_file())
names

# %% [markdown]
# ## Real controllers at equal budget
# `evaluate_controllers` runs controllers on the suite with the shared engine (`engine.get_engine(cfg)`)
# and the rewards module's `RewardCalculator`, every one at `evaluate.token_budget` tokens per item
# (best-of-N candidates, resampled chunks and thoughts all count). A controller is an object with
# `.name` and `.generate`, or a name that `research_controller.promotion.resolve_controller` turns into one:
# a baseline (`greedy`, `sampling`, `best_of_n`, `threshold`), a registry version `vN`, or `active`.

# %%
#| export
BASELINE_ORDER = ('greedy', 'sampling', 'best_of_n', 'threshold')

def default_engine(cfg:Config):
    "The shared engine on the configured SLM (`engine.get_engine`, cached per config)."
    from research_controller import engine as E
    if hasattr(E, 'get_engine'): return E.get_engine(cfg)
    from research_controller.slm import load_slm
    model, tok = load_slm(cfg)
    return E.Engine(model, tok, cfg)

def default_rewards(cfg:Config, engine):
    "The rewards module's `RewardCalculator` on the engine's SLM (it is also the G-Eval judge)."
    from research_controller.rewards import RewardCalculator
    return RewardCalculator(cfg, getattr(engine, 'model', None), getattr(engine, 'tok', None))

def metrics_fn_for(rewards) -> Callable:
    "`(text, item) -> task metrics`: `rewards.task_metrics` when it has one, else `rewards.task_score(item, text)`."
    if hasattr(rewards, 'task_metrics'): return rewards.task_metrics
    from research_controller.rewards import task_score
    return lambda text, item: task_score(item, text)

def _label(c) -> str:
    v = getattr(c, 'version', None); n = getattr(c, 'name', type(c).__name__)
    return f"{n}@{v}" if v else n

def as_controllers(cfg:Config, controllers:list, registry=None) -> list:
    "Controller objects from objects or names (baseline, 'vN', 'active'); labels must be unique."
    if isinstance(controllers, (str, bytes)) or not controllers:
        raise ValueError(f"controllers must be a non-empty list of controllers or names, got {controllers!r}.")
    out = []
    for c in controllers:
        if isinstance(c, str):
            from research_controller.promotion import resolve_controller
            c = resolve_controller(cfg, c, registry)
        elif not callable(getattr(c, 'generate', None)):
            raise TypeError(f"{c!r} is not a controller: it needs .name and .generate(engine, prompt, max_new_tokens, seed, include_thoughts).")
        out.append(c)
    labels = [_label(c) for c in out]
    dup = sorted({l for l in labels if labels.count(l) > 1})
    if dup: raise ValueError(f"controllers {dup} appear more than once (e.g. 'active' when nothing is promoted is the threshold controller); list each once.")
    return out

def evaluate_controllers(cfg:Config, # `evaluate` (budget, suite), `slm`, `rewards`, ...
                         controllers:list, # controller objects and/or names: greedy, sampling, best_of_n, threshold, vN, active
                         suite:Suite|None=None, # None = `get_suite(cfg)` (the fixed default suite)
                         progress:bool=True, # one tqdm bar over every (controller, item)
                         engine=None, # None = `default_engine(cfg)`
                         rewards=None, # None = `default_rewards(cfg, engine)`
                         registry=None, # registry for 'vN'/'active' names; None = the configured one
                        ) -> list:
    "Run every controller on the suite at `evaluate.token_budget` tokens per item; one `SuiteResult` each."
    suite = suite if suite is not None else get_suite(cfg)
    budget = cfg.evaluate.token_budget
    if suite.token_budget != budget:
        raise SuiteError(f"suite {suite.name!r} fixes {suite.token_budget} tokens per item but evaluate.token_budget is {budget}; "
                         f"set evaluate.token_budget={suite.token_budget} (or build a new suite) so every result is at the suite's budget.")
    ctls = as_controllers(cfg, controllers, registry)
    engine = engine if engine is not None else default_engine(cfg)
    rewards = rewards if rewards is not None else default_rewards(cfg, engine)
    mfn, out = metrics_fn_for(rewards), []
    bar = tqdm(total=len(ctls) * len(suite), desc='evaluate', unit='item', disable=not progress)
    try:
        for c in ctls:
            bar.set_postfix_str(_label(c))
            out.append(run_suite(c, suite, engine, rewards, budget, meta={'config_hash': config_hash(cfg)}, progress=False,
                                 metrics_fn=mfn, on_item=lambda r: bar.update(1)))
    finally: bar.close()
    return out

# %% [markdown]
# With the fakes (the engine is only passed through to the controllers, so a namespace stands in for it):

# %%
cfg32 = load_config(overrides=['evaluate.token_budget=32'])
fake_engine = SimpleNamespace(fingerprint='f' * 16, feature_dim=24)
res = evaluate_controllers(cfg32, [weak, strong, flaky], suite, progress=False, engine=fake_engine, rewards=rewards)
test_eq([r.label for r in res], ['weak', 'strong', 'flaky'])
nolat = lambda r: [(x.item_id, x.text, x.reward, x.tokens, x.seed) for x in r.records]
test_eq([nolat(r) for r in res[:2]], [nolat(r_weak), nolat(r_strong)])  # same seeds, same items: same outcome as run_suite
test_eq((res[0].meta['slm_fingerprint'], res[0].meta['config_hash']), ('f' * 16, config_hash(cfg32)))
test_fail(lambda: evaluate_controllers(load_config(), [weak], suite, engine=fake_engine, rewards=rewards), contains='set evaluate.token_budget=32')
test_fail(lambda: evaluate_controllers(cfg32, [weak, weak], suite, engine=fake_engine, rewards=rewards), contains="['weak'] appear more than once")
test_fail(lambda: evaluate_controllers(cfg32, [object()], suite, engine=fake_engine, rewards=rewards), contains='is not a controller')
res

# %% [markdown]
# A `RewardCalculator` scores a whole controller's answers in one `calc.batch` call (the G-Eval judge
# then batches its forward passes); the result is the same as scoring one by one:

# %%
class BatchCalc:
    def __init__(self, r): self.r, self.batches = r, []
    def __call__(self, *a, **k): return self.r.calc(*a, **k)
    def batch(self, texts, items, n_tokens, unclosed):
        self.batches.append(len(texts)); return [self.r.calc(*x) for x in zip(texts, items, n_tokens, unclosed)]
brew = SimpleNamespace(calc=BatchCalc(rewards), task_metrics=rewards.task_metrics)
r_b = run_suite(strong, suite, None, brew, progress=False)
test_eq((brew.calc.batches, nolat(r_b)), ([18], nolat(r_strong)))
brew.calc.batches

# %% [markdown]
# A controller whose `generate` takes the task item (best-of-N scoring its candidates by reward does) gets it:

# %%
class ItemAware(FakeController):
    def generate(self, engine, prompt, max_new_tokens, seed=0, include_thoughts=False, item=None):
        self.seen = item['id']; return super().generate(engine, prompt, max_new_tokens, seed, include_thoughts)
ia = ItemAware('item-aware', suite, 0.5)
rec = run_item(ia, suite.items[4], None, rewards, 32, seed=0)
test_eq((ia.seen, _takes_item(ia), _takes_item(weak)), ('squad-4', True, False))
rec.item_id

# %% [markdown]
# `run_compare` is `rc evaluate --compare`: it evaluates the given controllers, or by default every
# baseline plus the active learned controller when there is one, and writes the results, the
# Markdown table and the plots (`write_comparison`). The table's reference is the first controller.

# %%
#| export
def default_controller_names(cfg:Config) -> list:
    "The baselines, then 'active' when the registry has an active version."
    names = list(BASELINE_ORDER)
    if (run_path(cfg, cfg.promotion.registry_dir)/'active.json').exists(): names.append('active')
    return names

class CompareRun:
    "What `run_compare` produced: the results, the Markdown table and the written paths."
    def __init__(self, results:list, table:str, paths:dict): self.results, self.table, self.paths = results, table, paths
    def __repr__(self):
        files = [str(p) for k, v in self.paths.items() for p in (v if isinstance(v, list) else [v])]
        return self.table + '\nwritten:\n  ' + '\n  '.join(files)

def run_compare(cfg:Config, # the config (`evaluate`, `promotion.registry_dir`, ...)
                controllers:list|None=None, # objects or names; None = `default_controller_names(cfg)`
                out_dir:str|Path|None=None, # None = runs/<evaluate.out_dir>/<suite name>
                progress:bool=True,
                compare:bool=True, # False = results and summary table only, no plots
                suite:Suite|None=None, engine=None, rewards=None, registry=None,
               ) -> CompareRun:
    "Evaluate controllers at equal budget and write results JSON, `compare.md` (with CIs) and PNG plots."
    results = evaluate_controllers(cfg, controllers or default_controller_names(cfg), suite, progress, engine, rewards, registry)
    if compare: paths = write_comparison(results, cfg, out_dir)
    else:
        out = Path(out_dir) if out_dir else run_path(cfg, cfg.evaluate.out_dir)/results[0].suite
        paths = {'results': [r.save(out/'results'/f"{r.label.replace('/', '_')}.json") for r in results]}
    table = compare_table(results, cfg.evaluate, per_task=True)
    return CompareRun(results, table, paths)

# %%
with tempfile.TemporaryDirectory() as d:
    run = run_compare(cfg32, [weak, strong, flaky], d, progress=False, suite=suite, engine=fake_engine, rewards=rewards)
    test_eq(sorted(p.name for p in Path(d).iterdir()), ['compare.md', 'metric_bars.png', 'results', 'reward_terms.png', 'tokens_vs_score.png'])
    test_eq((Path(d)/'compare.md').read_text().split('\n', 2)[2], run.table)
    test_eq([SuiteResult.load(p).label for p in run.paths['results']], ['weak', 'strong', 'flaky'])
    test_eq('Δ reward vs weak' in run.table and '| strong | 18 |' in run.table, True)
with tempfile.TemporaryDirectory() as d:
    c = load_config(overrides=[f'paths.runs_dir={d}'])
    test_eq(default_controller_names(c), ['greedy', 'sampling', 'best_of_n', 'threshold'])
    (Path(d)/c.promotion.registry_dir).mkdir(parents=True); (Path(d)/c.promotion.registry_dir/'active.json').write_text('{}')
    test_eq(default_controller_names(c)[-1], 'active')
print(run)

# %% [markdown]
# ### A real run on the default SLM
# Real controllers on the real SLM with the real rewards: the greedy and threshold baselines on one
# eval item of two tasks at 16 tokens each (the G-Eval judge is switched off here only to keep the
# default test fast; the slow cell below runs everything with every reward term).

# %%
small_cfg = load_config(overrides=['evaluate.per_task=1', 'evaluate.tasks=[nq_open, squad]', 'evaluate.token_budget=16',
                                   'rewards.w_coherence=0'])
small_suite = build_default_suite(small_cfg)
small = evaluate_controllers(small_cfg, ['greedy', 'threshold'], small_suite, progress=False)
test_eq([r.label for r in small], ['greedy', 'threshold'])
test_eq([(rec.error, 0 < rec.tokens <= 16) for r in small for rec in r.records], [(None, True)] * 4)  # equal budget held
test_eq(small[0].meta['slm_fingerprint'], default_engine(small_cfg).fingerprint)
test_eq(sorted(small[0].term_names()), ['fluency', 'length', 'repetition', 'task', 'unclosed_thought'])
test_eq(set(small[0].records[1].metrics), {'em', 'f1'})  # the squad item
print(compare_table(small, small_cfg.evaluate, per_task=False))
[(r.label, [rec.text for rec in r.records]) for r in small]

# %% [markdown]
# The full comparison (`rc evaluate --compare`): every baseline, plus the active learned controller
# when there is one, on the default suite at `evaluate.token_budget` tokens with all reward terms.
# It writes `runs/eval/default/compare.md` and the plots.

# %%
#| slow
full = run_compare(load_config())
test_eq(len(full.results) >= 4 and all(r.n == 32 for r in full.results), True)
print(full)

# %%
#| slow
from IPython.display import Image
Image(filename=str(full.paths['metric_bars']))
