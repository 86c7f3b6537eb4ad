# %%
#| default_exp promotion

# %% [markdown]
# # Promotion
# > The gate a challenger must pass to replace the active controller, the versioned registry it is promoted in, and one report per training cycle.

# %%
#| export
from __future__ import annotations
import datetime, hashlib, json, math, os, re, shutil, tempfile, time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional
from fastcore.basics import patch_to
from filelock import FileLock, Timeout
from research_controller.config import Config, EvaluateConfig, config_hash, config_to_dict, load_config, run_path, sha256_file
from research_controller.evaluate import Comparison, ItemRecord, SuiteError, SuiteResult, atomic_write_json, compare, _check_pair

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import subprocess, sys, textwrap, time
import numpy as np
from types import SimpleNamespace

# %% [markdown]
# ## The promotion policy
# A challenger replaces the champion only if every check passes. Checks are ordered callbacks: objects
# with an `order` and a `__call__(ctx) -> CheckResult`, run sorted by `order`, so a user adds a rule by
# adding an object, not a flag. Every check writes one human-readable sentence with its numbers.

# %%
#| export
@dataclass
class CheckResult:
    "The verdict of one promotion check."
    name: str
    passed: bool
    reason: str  # one human-readable sentence with the numbers
    stop: bool = False  # skip the remaining checks (e.g. the results are not comparable)

class PromotionCheck:
    "Base of an ordered promotion check: set `order` and `name`, implement `__call__(ctx) -> CheckResult`."
    order: int = 50
    name: str = 'check'
    def __call__(self, ctx:'PromotionContext') -> CheckResult: raise NotImplementedError(f"{type(self).__name__} must implement __call__")
    def __repr__(self): return f"{type(self).__name__}(order={self.order})"

@dataclass
class PromotionContext:
    "What checks see: both results, the policy, the (lazily computed) paired comparison, and a dict for numbers."
    champion: SuiteResult
    challenger: SuiteResult
    policy: 'PromotionPolicy'
    metrics: dict = field(default_factory=dict)  # checks record the numbers behind their verdicts here
    _comparison: Optional[Comparison] = None
    @property
    def comparison(self) -> Comparison:
        if self._comparison is None:
            p = self.policy
            self._comparison = compare(self.champion, self.challenger, p.ecfg, metrics=p.metrics, alpha=p.alpha)
        return self._comparison

# %% [markdown]
# The built-in checks, in order: the two results are comparable (same suite, same budget), there are
# enough items, the reward gain is large and significant, errors did not rise, latency did not rise too much.

# %%
#| export
class ComparableCheck(PromotionCheck):
    "Both results come from the same suite at the same token budget."
    order, name = 0, 'comparable'
    def __call__(self, ctx):
        try: _check_pair(ctx.champion, ctx.challenger)
        except SuiteError as e: return CheckResult(self.name, False, f"The results cannot be compared: {e}", stop=True)
        return CheckResult(self.name, True, f"Both ran on suite {ctx.champion.suite} [{ctx.champion.suite_hash[:12]}] "
                                            f"at {ctx.champion.token_budget} tokens per item.")

class MinItemsCheck(PromotionCheck):
    "The decision rests on at least `policy.min_tasks` paired items."
    order, name = 10, 'min_items'
    def __call__(self, ctx):
        n = ctx.comparison['reward'].n; need = ctx.policy.min_tasks
        ctx.metrics['n'] = n
        return CheckResult(self.name, n >= need, f"{n} paired items {'≥' if n >= need else '<'} the {need} required.")

class RewardGainCheck(PromotionCheck):
    "Mean reward gain above `min_reward_delta`, corrected p below `alpha`, and the CI's lower bound above 0."
    order, name = 20, 'reward_gain'
    def __call__(self, ctx):
        s, p, cmp = ctx.comparison['reward'], ctx.policy, ctx.comparison
        ctx.metrics.update(reward_champion=s.mean_a, reward_challenger=s.mean_b, reward_delta=s.diff,
                           reward_ci=[s.ci_lo, s.ci_hi], p_wilcoxon=s.p_wilcoxon, p_sign=s.p_sign, p_adj=s.p_adj,
                           test=cmp.test, correction=cmp.correction, n_metrics=len(cmp.stats))
        lvl = f"{1 - cmp.alpha:.0%}"
        conds = [(s.diff > p.min_reward_delta, f"the gain {s.diff:+.4f} {'>' if s.diff > p.min_reward_delta else '≤'} the required {p.min_reward_delta:+.4f}"),
                 (s.p_adj < p.alpha, f"{cmp.test} p = {s.p_adj:.3g} after {cmp.correction} correction over {len(cmp.stats)} metric(s) "
                                     f"{'<' if s.p_adj < p.alpha else '≥'} α = {p.alpha}"),
                 (s.ci_lo > 0, f"the {lvl} CI [{s.ci_lo:+.4f}, {s.ci_hi:+.4f}] {'lies above' if s.ci_lo > 0 else 'does not lie above'} 0")]
        ok = all(c for c, _ in conds)
        head = f"Mean reward {s.mean_b:.4f} vs champion {s.mean_a:.4f}: "
        if ok: return CheckResult(self.name, True, head + '; '.join(t for _, t in conds) + '.')
        return CheckResult(self.name, False, head + 'not accepted because ' + '; '.join(t for c, t in conds if not c) +
                           ('' if not any(c for c, _ in conds) else ' (while ' + '; '.join(t for c, t in conds if c) + ')') + '.')

class ErrorRateCheck(PromotionCheck):
    "The challenger's share of failed items rises by at most `max_error_rate_increase`."
    order, name = 30, 'error_rate'
    def __call__(self, ctx):
        a, b, lim = ctx.champion.error_rate, ctx.challenger.error_rate, ctx.policy.max_error_rate_increase
        ctx.metrics.update(error_rate_champion=a, error_rate_challenger=b)
        ok = b - a <= lim + 1e-12
        return CheckResult(self.name, ok, f"Error rate {b:.1%} vs champion {a:.1%}: a change of {b - a:+.1%}, "
                                          f"{'within' if ok else 'more than'} the allowed +{lim:.1%}.")

class LatencyCheck(PromotionCheck):
    "The challenger's mean latency rises by at most `max_latency_increase` (relative)."
    order, name = 40, 'latency'
    def __call__(self, ctx):
        a, b, lim = ctx.champion.mean('latency_ms'), ctx.challenger.mean('latency_ms'), ctx.policy.max_latency_increase
        rel = (b / a - 1) if a > 0 else (0.0 if b <= 0 else math.inf)
        ctx.metrics.update(latency_ms_champion=a, latency_ms_challenger=b, latency_increase=rel)
        ok = rel <= lim + 1e-12
        return CheckResult(self.name, ok, f"Mean latency {b:.1f} ms vs champion {a:.1f} ms: {rel:+.0%}, "
                                          f"{'within' if ok else 'more than'} the allowed +{lim:.0%}.")

def default_checks() -> list:
    "The built-in checks, in order."
    return [ComparableCheck(), MinItemsCheck(), RewardGainCheck(), ErrorRateCheck(), LatencyCheck()]

# %%
#| export
@dataclass
class PromotionDecision:
    "Whether a challenger replaces the champion, why, and the numbers behind it."
    accepted: bool
    reasons: list  # one sentence per check, prefixed PASS/FAIL/SKIP
    metrics: dict  # n, reward means/delta/CI/p, error rates, latencies, tokens, the full comparison
    champion: str = ''
    challenger: str = ''
    checks: list = field(default_factory=list)  # [{'name', 'passed', 'reason'}]
    def to_dict(self) -> dict: return asdict(self)
    def __repr__(self):
        head = f"PromotionDecision({'ACCEPTED' if self.accepted else 'REJECTED'}: {self.challenger!r} vs champion {self.champion!r})"
        return '\n'.join([head, *[f"  {r}" for r in self.reasons]])

@dataclass
class PromotionPolicy:
    "The promotion gate: thresholds, the statistics settings and the ordered checks."
    min_reward_delta: float = 0.0  # challenger's mean reward must exceed the champion's by more than this
    alpha: float = 0.05  # required significance (corrected p) of the reward gain
    max_error_rate_increase: float = 0.0  # largest allowed rise in the fraction of failed items
    max_latency_increase: float = 0.5  # largest allowed relative rise in mean latency
    min_tasks: int = 8  # fewest paired items a decision may rest on
    ecfg: EvaluateConfig = field(default_factory=EvaluateConfig)  # bootstrap, correction, test, seed
    metrics: Optional[list] = None  # metrics compared (and corrected together); None = reward + task metrics
    checks: list = field(default_factory=default_checks)

    @classmethod
    def from_config(cls, cfg:Config, extra_checks:list=()) -> PromotionPolicy:
        "Policy from `cfg.promotion` (thresholds) and `cfg.evaluate` (statistics), plus `extra_checks`."
        p = cfg.promotion
        return cls(p.min_reward_delta, p.alpha, p.max_error_rate_increase, p.max_latency_increase, p.min_tasks,
                   cfg.evaluate, None, default_checks() + list(extra_checks))

    def add_check(self, check:PromotionCheck) -> PromotionPolicy:
        "Add a check (it runs in `order` with the others)."
        if not callable(check) or not hasattr(check, 'order'):
            raise TypeError(f"a promotion check needs an `order` attribute and __call__(ctx) -> CheckResult; got {check!r}.")
        self.checks.append(check); return self

# %% [markdown]
# `evaluate` runs the checks in order and accepts only if all pass. A check that raises rejects the
# promotion with the error as its reason (a broken check must never let a challenger through).

# %%
#| export
@patch_to(PromotionPolicy)
def evaluate(self, champion:SuiteResult, challenger:SuiteResult) -> PromotionDecision:
    "Decide whether `challenger` replaces `champion`: all checks must pass."
    ctx = PromotionContext(champion, challenger, self)
    results, tags, stopped = [], [], False
    for chk in sorted(self.checks, key=lambda c: c.order):
        name = getattr(chk, 'name', type(chk).__name__)
        if stopped:
            results.append(CheckResult(name, False, "Not checked (an earlier check stopped the evaluation).")); tags.append('SKIP'); continue
        try: r = chk(ctx)
        except Exception as e: r = CheckResult(name, False, f"Check {name!r} failed to run: {type(e).__name__}: {e}")
        results.append(r); tags.append('PASS' if r.passed else 'FAIL'); stopped = r.stop
    ok = all(r.passed for r in results)
    m = dict(ctx.metrics, champion=champion.label, challenger=challenger.label,
             tokens_champion=champion.mean('tokens'), tokens_challenger=challenger.mean('tokens'))
    if ctx._comparison is not None: m['comparison'] = ctx._comparison.to_dict()
    return PromotionDecision(ok, [f"{t} {r.name}: {r.reason}" for t, r in zip(tags, results)], m, champion.label, challenger.label,
                             [dict(name=r.name, passed=r.passed, reason=r.reason) for r in results])

# %% [markdown]
# Synthetic results make the policy's cases exact: `fake_result` builds a `SuiteResult` from per-item
# rewards, latencies and failed items (the evaluate notebook runs real controllers).

# %%
def fake_result(name, rewards, latency_ms=100.0, errors=(), suite_hash='a' * 64, budget=64, version=None):
    recs = [ItemRecord(name, version, f"item-{i}", ('squad', 'gsm8k')[i % 2], 'text', {'em': float(r > 0.5)}, {'task': float(r)},
                       float(r), 40, float(latency_ms), 'RuntimeError: boom' if i in errors else None) for i, r in enumerate(rewards)]
    return SuiteResult(name, version, 'toy', suite_hash, budget, recs)

rng = np.random.default_rng(0)
base = rng.normal(0.5, 0.2, 40)
champ = fake_result('champ', base, version='v0001')
better = fake_result('better', base + 0.15 + rng.normal(0, 0.05, 40), version='v0002')
policy = PromotionPolicy.from_config(load_config())
dec = policy.evaluate(champ, better)
test_eq(dec.accepted, True)
test_eq([c['name'] for c in dec.checks], ['comparable', 'min_items', 'reward_gain', 'error_rate', 'latency'])
test_eq(dec.metrics['n'], 40); test_eq(dec.metrics['reward_ci'][0] > 0, True)
dec

# %% [markdown]
# Rejections, each with its reason: a gain lost in noise; a gain bought with failures; a gain bought
# with latency; too few items; different suites.

# %%
noisy = fake_result('noisy', base + 0.01 + rng.normal(0, 0.2, 40))
d_noisy = policy.evaluate(champ, noisy)
test_eq(d_noisy.accepted, False)
test_eq(d_noisy.checks[2]['passed'], False)
test_eq('≥ α = 0.05' in d_noisy.reasons[2] and 'does not lie above 0' in d_noisy.reasons[2], True)
d_noisy.reasons[2]

# %%
failing = fake_result('failing', base + 0.15, errors={3, 7})
d_fail = policy.evaluate(champ, failing)
test_eq((d_fail.accepted, [c['passed'] for c in d_fail.checks]), (False, [True, True, True, False, True]))
slow = fake_result('slow', base + 0.15, latency_ms=300.0)
d_slow = policy.evaluate(champ, slow)
test_eq((d_slow.accepted, d_slow.checks[4]['passed']), (False, False))
test_close(d_slow.metrics['latency_increase'], 2.0)
few = policy.evaluate(fake_result('champ', base[:5]), fake_result('few', base[:5] + 1.0))
test_eq((few.accepted, few.checks[1]['passed'], few.metrics['n']), (False, False, 5))
other_suite = policy.evaluate(champ, fake_result('other', base + 0.15, suite_hash='b' * 64))
test_eq((other_suite.accepted, [r.split(' ')[0] for r in other_suite.reasons]), (False, ['FAIL', 'SKIP', 'SKIP', 'SKIP', 'SKIP']))
print(d_fail.reasons[3]); print(d_slow.reasons[4]); print(few.reasons[1]); print(other_suite.reasons[0])

# %% [markdown]
# Thresholds come from the config, e.g. a required minimum gain, which also shows the reason when only
# that condition fails:

# %%
strict = PromotionPolicy.from_config(load_config(overrides=['promotion.min_reward_delta=0.3']))
d_strict = strict.evaluate(champ, better)
test_eq(d_strict.accepted, False)
test_eq('not accepted because the gain' in d_strict.reasons[2] and '(while' in d_strict.reasons[2], True)
d_strict.reasons[2]

# %% [markdown]
# A user check: no task's mean reward may drop by more than `max_drop`. It runs between the built-in
# checks because of its `order`.

# %%
class NoTaskRegression(PromotionCheck):
    "No task's mean reward drops by more than `max_drop`."
    order, name = 25, 'no_task_regression'
    def __init__(self, max_drop=0.05): self.max_drop = max_drop
    def __call__(self, ctx):
        a, b = ctx.champion.summary()['per_task'], ctx.challenger.summary()['per_task']
        drops = {t: b[t]['reward'] - a[t]['reward'] for t in a if t in b}
        worst = min(drops, key=drops.get)
        return CheckResult(self.name, drops[worst] >= -self.max_drop,
                           f"Worst task {worst}: mean reward {drops[worst]:+.3f} (allowed down to {-self.max_drop:+.3f}).")

mixed_r = base.copy(); mixed_r[0::2] += 0.4; mixed_r[1::2] -= 0.1  # squad much better, gsm8k worse
mixed = fake_result('mixed', mixed_r)
p2 = PromotionPolicy.from_config(load_config(), extra_checks=[NoTaskRegression(0.05)])
test_eq(policy.evaluate(champ, mixed).accepted, True)   # overall gain is significant...
d_mixed = p2.evaluate(champ, mixed)
test_eq((d_mixed.accepted, d_mixed.checks[3]['name'], d_mixed.checks[3]['passed']), (False, 'no_task_regression', False))
d_mixed

# %% [markdown]
# A check that crashes rejects rather than lets the challenger through:

# %%
class Broken(PromotionCheck):
    order, name = 5, 'broken'
    def __call__(self, ctx): return 1 / 0
d_broken = PromotionPolicy(checks=default_checks() + [Broken()]).evaluate(champ, better)
test_eq((d_broken.accepted, d_broken.reasons[1]), (False, "FAIL broken: Check 'broken' failed to run: ZeroDivisionError: division by zero"))
test_fail(lambda: policy.add_check(lambda ctx: None), contains='needs an `order` attribute')

# %% [markdown]
# ## The controller registry
# Versioned checkpoints on disk under `promotion.registry_dir`:
#
# ```
# registry/
#   versions/v0001/checkpoint.pt   the checkpoint bytes (opaque here; research_controller.network writes them)
#   versions/v0001/meta.json       parent version, training data ids, config, SLM fingerprint, feature dim, benchmark summary, sha256
#   active.json                    the `active` alias: version, who, why, when, history sequence number
#   history.jsonl                  append-only audit trail: register / promote / rollback events
#   registry.lock                  file lock held by every write
# ```
#
# A version directory is assembled in a temp directory and renamed into place; `active.json` is replaced
# atomically; history lines are appended and fsynced; all of it under one `filelock` lock, so two
# processes promoting at once serialise. Before a version is promoted (or its checkpoint handed out) its
# bytes are checked against the sha256 in its metadata and its SLM fingerprint / feature dim against
# what the registry expects.

# %%
#| export
class RegistryError(RuntimeError):
    "A registry operation that was refused: corrupt or mismatched checkpoint, unknown version, bad metadata."

def _now() -> str: return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='milliseconds')

def _cfg_hash(d:dict) -> str:
    "Short sha256 of a config dict (equals `config_hash` of the Config it came from)."
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

def version_name(v:int|str) -> str:
    "Canonical version name: 3, 'v3' and 'v0003' are all 'v0003'."
    if isinstance(v, int) and not isinstance(v, bool) and v > 0: return f"v{v:04d}"
    m = re.fullmatch(r'v?0*(\d+)', str(v).strip())
    if not m or int(m.group(1)) == 0: raise RegistryError(f"{v!r} is not a version; versions look like 'v0003' (or 3).")
    return f"v{int(m.group(1)):04d}"

META_REQUIRED = {'slm_fingerprint': str, 'feature_dim': int}
META_OPTIONAL = {'parent_version': (str, type(None)), 'training_data_ids': list, 'config': dict, 'action_names': list,
                 'benchmark': dict, 'notes': str}

# %%
test_eq([version_name(3), version_name('v3'), version_name('v0003'), version_name('12')], ['v0003'] * 3 + ['v0012'])
test_fail(lambda: version_name('latest'), contains="is not a version")

# %%
#| export
class ControllerRegistry:
    "Versioned controller checkpoints with an audited `active` alias, atomic writes and a process lock."
    def __init__(self, root:str|Path, # registry directory
                 slm_fingerprint:str|None=None, # expected SLM fingerprint; other checkpoints are refused
                 feature_dim:int|None=None, # expected state-vector size; other checkpoints are refused
                 lock_timeout_s:float=60.0):
        self.root = Path(root); self.slm_fingerprint, self.feature_dim = slm_fingerprint, feature_dim
        (self.root/'versions').mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.root/'registry.lock'), timeout=lock_timeout_s)

    @classmethod
    def from_config(cls, cfg:Config, slm_fingerprint:str|None=None, feature_dim:int|None=None) -> ControllerRegistry:
        "The registry at `promotion.registry_dir` under `paths.runs_dir`."
        return cls(run_path(cfg, cfg.promotion.registry_dir), slm_fingerprint, feature_dim, cfg.promotion.lock_timeout_s)

    def __repr__(self):
        return f"ControllerRegistry({len(self.versions())} versions, active={self.active()!r})"

    def _locked(self):
        try: return self.lock.acquire()
        except Timeout: raise RegistryError(f"registry {str(self.root)!r} is locked by another process for more than "
                                            f"{self.lock.timeout} s; retry, or raise promotion.lock_timeout_s.") from None

# %% [markdown]
# Reading: the versions, their metadata, the history (the last line is ignored only if a crash left it
# half written) and the active alias.

# %%
#| export
@patch_to(ControllerRegistry)
def versions(self) -> list:
    "All registered versions, oldest first."
    return sorted(p.name for p in (self.root/'versions').iterdir() if p.is_dir() and re.fullmatch(r'v\d{4,}', p.name))

@patch_to(ControllerRegistry)
def _vdir(self, version) -> Path:
    v = version_name(version); d = self.root/'versions'/v
    if not d.is_dir(): raise RegistryError(f"no version {v} in registry {str(self.root)!r}; known versions: {self.versions()}.")
    return d

@patch_to(ControllerRegistry)
def meta(self, version:int|str) -> dict:
    "The metadata of `version` as stored (not verified; see `verify`)."
    p = self._vdir(version)/'meta.json'
    try: return json.loads(p.read_text(encoding='utf-8'))
    except FileNotFoundError: raise RegistryError(f"{version_name(version)} has no meta.json; the version is incomplete, register the checkpoint again.") from None
    except json.JSONDecodeError as e: raise RegistryError(f"{version_name(version)}/meta.json is not valid JSON ({e}); the version is corrupt.") from None

@patch_to(ControllerRegistry)
def history(self) -> list:
    "Every register/promote/rollback event, oldest first."
    p = self.root/'history.jsonl'
    if not p.exists(): return []
    text = p.read_text(encoding='utf-8'); lines = text.split('\n')
    if lines and lines[-1] == '': lines.pop()
    elif lines: lines.pop()  # a torn last line (crash mid-append) carries no event
    try: return [json.loads(l) for l in lines]
    except json.JSONDecodeError as e: raise RegistryError(f"{str(p)!r} is corrupt ({e}); it is append-only and must not be edited by hand.") from None

@patch_to(ControllerRegistry)
def active(self) -> str|None:
    "The active version, or None before the first promotion."
    p = self.root/'active.json'
    return json.loads(p.read_text(encoding='utf-8'))['version'] if p.exists() else None

# %% [markdown]
# `verify` is the gate every checkpoint passes before it is promoted or loaded: the bytes must hash to
# the recorded sha256, and the SLM fingerprint and feature dimension must be what this registry expects.

# %%
#| export
@patch_to(ControllerRegistry)
def verify(self, version:int|str) -> dict:
    "Check `version`'s checkpoint bytes and metadata; return the metadata or raise `RegistryError`."
    v = version_name(version); d = self._vdir(v); m = self.meta(v)
    for k, tp in META_REQUIRED.items():
        if not isinstance(m.get(k), tp): raise RegistryError(f"{v}/meta.json lacks a valid {k!r}; the version is corrupt.")
    if m.get('version') != v: raise RegistryError(f"{v}/meta.json says it is {m.get('version')!r}; the version directory was moved or corrupted.")
    ck = d/m.get('checkpoint', {}).get('file', 'checkpoint.pt')
    if not ck.exists(): raise RegistryError(f"{v} has no checkpoint file {ck.name}; the version is incomplete, register it again.")
    sha = sha256_file(ck)
    if sha != m['checkpoint']['sha256']:
        raise RegistryError(f"checkpoint of {v} is corrupt: {ck.name} hashes to {sha[:12]}, but meta.json records "
                            f"{m['checkpoint']['sha256'][:12]}. Do not use it: register the original checkpoint again, or roll back to another version.")
    self._check_expected(m, v)
    return m

@patch_to(ControllerRegistry)
def _check_expected(self, m:dict, what:str):
    if self.slm_fingerprint is not None and m['slm_fingerprint'] != self.slm_fingerprint:
        raise RegistryError(f"{what} was trained against SLM {m['slm_fingerprint']} but this registry serves SLM "
                            f"{self.slm_fingerprint}; its features mean something else. Train a controller for this SLM.")
    if self.feature_dim is not None and m['feature_dim'] != self.feature_dim:
        raise RegistryError(f"{what} expects {m['feature_dim']} features but the engine produces {self.feature_dim}; "
                            f"the feature set changed. Train a controller for the current features.")

@patch_to(ControllerRegistry)
def checkpoint(self, version:int|str|None=None) -> Path:
    "Path of the verified checkpoint of `version` (None = the active one)."
    v = version if version is not None else self.active()
    if v is None: raise RegistryError(f"registry {str(self.root)!r} has no active version yet; promote one first.")
    m = self.verify(v)
    return self._vdir(v)/m['checkpoint']['file']

# %% [markdown]
# Writing: `register` copies a checkpoint in as the next version with its metadata; `promote` and
# `rollback` move the `active` alias and append to the history. All take the lock.

# %%
#| export
@patch_to(ControllerRegistry)
def _append(self, event:dict) -> dict:
    "Append one event to history.jsonl (caller holds the lock)."
    hist = self.history()
    event = {'seq': (hist[-1]['seq'] + 1) if hist else 1, **event, 'at': _now()}
    p = self.root/'history.jsonl'
    if p.exists() and p.stat().st_size and not p.read_bytes().endswith(b'\n'):  # drop a torn line left by a crash
        with open(p, 'rb+') as f: f.truncate(p.read_bytes().rfind(b'\n') + 1)
    with open(p, 'a', encoding='utf-8') as f:
        f.write(json.dumps(event, ensure_ascii=False) + '\n'); f.flush(); os.fsync(f.fileno())
    return event

@patch_to(ControllerRegistry)
def _check_meta_in(self, metadata:dict) -> dict:
    if not isinstance(metadata, dict): raise RegistryError(f"metadata must be a dict, got {type(metadata).__name__}.")
    m = dict(metadata)
    if 'config' in m and not isinstance(m['config'], dict): m['config'] = config_to_dict(m['config'])
    for k, tp in META_REQUIRED.items():
        if k not in m: raise RegistryError(f"metadata lacks {k!r}; every checkpoint must record {list(META_REQUIRED)} (the network checkpoint has them).")
        if not isinstance(m[k], tp) or isinstance(m[k], bool): raise RegistryError(f"metadata {k!r} must be {tp.__name__}, got {m[k]!r}.")
    if m['feature_dim'] < 1: raise RegistryError(f"metadata 'feature_dim' must be positive, got {m['feature_dim']}.")
    for k, tp in META_OPTIONAL.items():
        if k in m and not isinstance(m[k], tp): raise RegistryError(f"metadata {k!r} has type {type(m[k]).__name__}; expected {tp}.")
    reserved = {'version', 'checkpoint', 'registered_at'} & set(m)
    if reserved: raise RegistryError(f"metadata keys {sorted(reserved)} are set by the registry; remove them.")
    return m

@patch_to(ControllerRegistry)
def register(self, checkpoint_path:str|Path, # a checkpoint file (opaque bytes)
             metadata:dict, # slm_fingerprint, feature_dim (required); parent_version, training_data_ids, config, action_names, benchmark, notes
             who:str='system') -> str:
    "Copy a checkpoint into the registry as the next version with its metadata; returns the version."
    src = Path(checkpoint_path)
    if not src.is_file(): raise RegistryError(f"checkpoint {str(src)!r} does not exist or is not a file.")
    m = self._check_meta_in(metadata); self._check_expected(m, f"checkpoint {src.name}")
    sha = sha256_file(src)
    self._locked()
    try:
        vs = self.versions(); v = version_name(int(vs[-1][1:]) + 1 if vs else 1)
        if 'parent_version' not in m: m['parent_version'] = self.active()
        elif m['parent_version'] is not None: m['parent_version'] = version_name(m['parent_version']); self._vdir(m['parent_version'])
        if 'config' in m: m.setdefault('config_hash', _cfg_hash(m['config']))
        tmp = Path(tempfile.mkdtemp(dir=self.root/'versions', prefix=f'.{v}.'))
        try:
            shutil.copyfile(src, tmp/'checkpoint.pt')
            if sha256_file(tmp/'checkpoint.pt') != sha: raise RegistryError(f"checkpoint {str(src)!r} changed while it was copied; register it again once it is written.")
            meta = {'version': v, **m, 'checkpoint': {'file': 'checkpoint.pt', 'sha256': sha, 'bytes': src.stat().st_size},
                    'registered_at': _now()}
            atomic_write_json(tmp/'meta.json', meta)
            os.rename(tmp, self.root/'versions'/v)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True); raise
        self._append({'event': 'register', 'version': v, 'parent_version': m['parent_version'], 'who': who,
                      'why': m.get('notes', 'registered')})
        return v
    finally: self.lock.release()

# %% [markdown]
# `promote` verifies the version, appends the event, then replaces `active.json`. `rollback` points the
# alias back (by default to the version that was active before the current one) as a new event: the
# history is never rewritten, so the trail of who promoted what, when and why survives every rollback.

# %%
#| export
@patch_to(ControllerRegistry)
def _set_active(self, event:str, version, who:str, why:str, extra:dict|None=None) -> dict:
    "Verify `version`, append the event and move the alias (caller holds the lock)."
    for k, s in (('who', who), ('why', why)):
        if not isinstance(s, str) or not s.strip(): raise RegistryError(f"{event} needs a non-empty {k!r} for the audit trail.")
    v = version_name(version); self.verify(v)
    cur = self.active()
    if cur == v: raise RegistryError(f"{v} is already the active version.")
    ev = self._append({'event': event, 'version': v, 'previous': cur, 'who': who, 'why': why, **(extra or {})})
    atomic_write_json(self.root/'active.json', {k: ev[k] for k in ('version', 'seq', 'event', 'who', 'why', 'at')})
    return ev

@patch_to(ControllerRegistry)
def promote(self, version:int|str, who:str, why:str, decision:dict|None=None) -> dict:
    "Make `version` active (after verifying it); returns the history event."
    self._locked()
    try: return self._set_active('promote', version, who, why, {'decision': decision} if decision is not None else None)
    finally: self.lock.release()

@patch_to(ControllerRegistry)
def rollback(self, version:int|str|None=None, who:str='', why:str='') -> dict:
    "Make an earlier version active again (None = the one active before the current); returns the history event."
    self._locked()
    try:
        cur = self.active()
        if cur is None: raise RegistryError("nothing to roll back: no version has been promoted yet.")
        if version is None:
            setter = [e for e in self.history() if e['event'] in ('promote', 'rollback') and e['version'] == cur][-1]
            version = setter['previous']
            if version is None: raise RegistryError(f"{cur} was the first active version; there is nothing before it to roll back to.")
        return self._set_active('rollback', version, who, why)
    finally: self.lock.release()

# %% [markdown]
# A registry of fake checkpoints (random bytes stand in for the network's checkpoint files):

# %%
tmp_root = Path(tempfile.mkdtemp())
def fake_ckpt(i, size=4096):
    p = tmp_root/f"ckpt{i}.pt"; p.write_bytes(np.random.default_rng(i).bytes(size)); return p
META = dict(slm_fingerprint='0123456789abcdef', feature_dim=24, action_names=['CONTINUE', 'THINK_BEGIN', 'THINK_END', 'RESAMPLE', 'STOP'])

reg = ControllerRegistry(tmp_root/'registry', slm_fingerprint='0123456789abcdef', feature_dim=24)
v1 = reg.register(fake_ckpt(1), {**META, 'training_data_ids': ['traj-000'], 'config': load_config(), 'notes': 'first'})
v2 = reg.register(fake_ckpt(2), {**META, 'training_data_ids': ['traj-001', 'traj-002'], 'benchmark': better.summary()['overall']})
test_eq((v1, v2, reg.versions(), reg.active()), ('v0001', 'v0002', ['v0001', 'v0002'], None))
test_eq(reg.meta(v2)['parent_version'], None)
test_eq(reg.meta(v1)['checkpoint']['sha256'], sha256_file(fake_ckpt(1)))
test_eq(reg.meta(v1)['config']['mcts']['n_sims'], load_config().mcts.n_sims)
reg.promote(v1, who='alice', why='bootstrap: first controller')
reg.promote(v2, who='coordinator', why='cycle 1: reward +0.150, p=0.001', decision=dec.to_dict())
v3 = reg.register(fake_ckpt(3), META)
test_eq((reg.active(), reg.meta(v3)['parent_version']), ('v0002', 'v0002'))  # parent defaults to the active version
reg

# %% [markdown]
# Rollback appends: the audit trail keeps every step.

# %%
ev = reg.rollback(who='bob', why='v0002 misbehaves in production')
test_eq((ev['version'], ev['previous'], reg.active()), ('v0001', 'v0002', 'v0001'))
reg.promote(v3, who='coordinator', why='cycle 2')
reg.rollback('v0002', who='bob', why='back to v0002')
test_fail(lambda: reg.promote('v0002', 'x', 'again'), contains='already the active version')
test_fail(lambda: reg.promote('v0009', 'x', 'y'), contains="no version v0009")
test_fail(lambda: reg.promote('v0001', 'x', ''), contains="needs a non-empty 'why'")
hist = reg.history()
test_eq([(e['seq'], e['event'], e['version']) for e in hist],
        [(1, 'register', 'v0001'), (2, 'register', 'v0002'), (3, 'promote', 'v0001'), (4, 'promote', 'v0002'),
         (5, 'register', 'v0003'), (6, 'rollback', 'v0001'), (7, 'promote', 'v0003'), (8, 'rollback', 'v0002')])
test_eq(json.loads((reg.root/'active.json').read_text())['seq'], 8)
[{k: e.get(k) for k in ('seq', 'event', 'version', 'previous', 'who', 'why')} for e in hist if e['event'] != 'register']

# %% [markdown]
# Refusals. A checkpoint whose bytes no longer match its sha256 cannot be promoted or loaded; nor can
# one trained for another SLM or feature set, and bad metadata is refused at registration.

# %%
ck3 = reg.root/'versions'/'v0003'/'checkpoint.pt'
good_bytes = ck3.read_bytes(); ck3.write_bytes(good_bytes[:-1] + bytes([good_bytes[-1] ^ 1]))  # flip one bit
test_fail(lambda: reg.promote('v0003', 'x', 'y'), contains='checkpoint of v0003 is corrupt')
test_fail(lambda: reg.checkpoint('v0003'), contains='is corrupt')
ck3.write_bytes(good_bytes)
test_eq(reg.checkpoint('v0003'), ck3)
test_eq(reg.checkpoint(), reg.root/'versions'/'v0002'/'checkpoint.pt')  # the active one

other_slm = ControllerRegistry(reg.root, slm_fingerprint='ffffffffffffffff')
test_fail(lambda: other_slm.verify('v0001'), contains='trained against SLM 0123456789abcdef but this registry serves SLM ffffffffffffffff')
test_fail(lambda: ControllerRegistry(reg.root, feature_dim=32).promote('v0001', 'x', 'y'), contains='expects 24 features but the engine produces 32')
test_fail(lambda: reg.register(fake_ckpt(4), {**META, 'feature_dim': 32}), contains='expects 32 features')
test_fail(lambda: reg.register(fake_ckpt(4), {'feature_dim': 24}), contains="metadata lacks 'slm_fingerprint'")
test_fail(lambda: reg.register(fake_ckpt(4), {**META, 'version': 'v0007'}), contains='set by the registry')
test_fail(lambda: reg.register(tmp_root/'missing.pt', META), contains='does not exist')
test_eq(reg.versions(), ['v0001', 'v0002', 'v0003'])  # refusals left nothing behind
ck3.write_bytes(b'garbage')
try: reg.promote('v0003', 'x', 'y')
except RegistryError as e: print(e)

# %% [markdown]
# `check` audits the whole registry: every version verifies, the history sequence has no gaps, and the
# alias agrees with the last promote/rollback.

# %%
#| export
@patch_to(ControllerRegistry)
def check(self) -> list:
    "Problems found in the registry (an empty list when it is consistent)."
    probs = []
    for v in self.versions():
        try: self.verify(v)
        except RegistryError as e: probs.append(str(e))
    try: hist = self.history()
    except RegistryError as e: return probs + [str(e)]
    if [e['seq'] for e in hist] != list(range(1, len(hist) + 1)): probs.append("history sequence numbers are not 1..n: events were lost or edited.")
    moves = [e for e in hist if e['event'] in ('promote', 'rollback')]
    for e in moves:
        if not (self.root/'versions'/e['version']).is_dir(): probs.append(f"history event {e['seq']} points to missing version {e['version']}.")
    act = (self.root/'active.json')
    if moves:
        a = json.loads(act.read_text()) if act.exists() else {}
        if (a.get('version'), a.get('seq')) != (moves[-1]['version'], moves[-1]['seq']):
            probs.append(f"active.json ({a.get('version')}, seq {a.get('seq')}) disagrees with the last history event "
                         f"({moves[-1]['version']}, seq {moves[-1]['seq']}).")
    elif act.exists(): probs.append("active.json exists but the history has no promotion.")
    return probs

# %%
problems = reg.check()
test_eq(len(problems), 1); test_eq('checkpoint of v0003 is corrupt' in problems[0], True)
ck3.write_bytes(good_bytes)
test_eq(reg.check(), [])

# %% [markdown]
# ### Two processes promoting at once
# Two subprocesses each register and promote 6 checkpoints as fast as they can, released at the same
# instant once both have started. Without the lock they would pick the same next version number and interleave history
# writes; with it, every version is complete, the history has every event with gapless sequence
# numbers, and the alias points at the last promotion.

# %%
worker = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from research_controller.promotion import ControllerRegistry
    root, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    reg = ControllerRegistry(root, slm_fingerprint='0123456789abcdef', feature_dim=24)
    ck = root.parent/f"{name}.pt"; ck.write_bytes(name.encode() * 1000)
    (root.parent/f"{name}.ready").touch()
    while not (root.parent/'go').exists(): time.sleep(0.001)
    for i in range(n):
        v = reg.register(ck, dict(slm_fingerprint='0123456789abcdef', feature_dim=24, notes=f"{name} #{i}"), who=name)
        time.sleep(0.02)  # a coordinator evaluates between registering and promoting
        reg.promote(v, who=name, why=f"{name} promotion {i}")
        time.sleep(0.02)
''')
croot = Path(tempfile.mkdtemp())/'registry'; ControllerRegistry(croot)
(croot.parent/'worker.py').write_text(worker)
procs = [subprocess.Popen([sys.executable, str(croot.parent/'worker.py'), str(croot), f"proc{k}", '6'],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (1, 2)]
t0 = time.time()
while not all((croot.parent/f"proc{k}.ready").exists() for k in (1, 2)) and time.time() - t0 < 60: time.sleep(0.01)
(croot.parent/'go').touch()  # both processes start writing at the same instant
outs = [p.communicate(timeout=120)[0] for p in procs]
test_eq([p.returncode for p in procs], [0, 0])
creg = ControllerRegistry(croot, slm_fingerprint='0123456789abcdef', feature_dim=24)
ch = creg.history()
test_eq(creg.versions(), [version_name(i) for i in range(1, 13)])
test_eq(len(ch), 24); test_eq(creg.check(), [])
test_eq(sorted(e['who'] for e in ch if e['event'] == 'promote'), ['proc1'] * 6 + ['proc2'] * 6)
test_eq(creg.active(), [e for e in ch if e['event'] == 'promote'][-1]['version'])
interleaved = sum(a['who'] != b['who'] for a, b in zip(ch, ch[1:]))
test_eq(interleaved > 0, True)  # the two processes really ran at the same time
len(ch), interleaved > 0, creg.check()

# %% [markdown]
# ## Training reports
# One JSON per training cycle, accepted or not, written atomically under `promotion.reports_dir` as
# `cycle-00001.json`, `cycle-00002.json`, ... (numbered under a lock).

# %%
#| export
@dataclass
class TrainingReport:
    "What one training cycle did: its data, both controllers' benchmark results, the decision and the outcome."
    started_at: str
    finished_at: str
    trajectory_ids: list  # source trajectories the challenger was trained on
    n_samples: int  # training positions drawn from them
    champion: dict  # {'version', 'summary'}
    challenger: dict  # {'version', 'summary'}
    decision: dict  # PromotionDecision.to_dict()
    promoted_version: Optional[str] = None  # the version made active, None if rejected
    cycle: Optional[int] = None  # set by `write_report` when None
    config_hash: Optional[str] = None
    extra: dict = field(default_factory=dict)
    status: str = 'decided'  # 'promoted', 'rejected', 'dry_run', 'skipped' or 'error' (set by the coordinator)
    error: Optional[str] = None  # 'ExcType: message' when the cycle failed
    @property
    def accepted(self) -> bool: return bool(self.decision.get('accepted'))

def make_report(champion:SuiteResult, challenger:SuiteResult, decision:PromotionDecision, *, started_at:str,
                trajectory_ids:list, n_samples:int, promoted_version:str|None=None, cfg:Config|None=None,
                finished_at:str|None=None, extra:dict|None=None) -> TrainingReport:
    "Build the report of one cycle from the two results and the decision."
    return TrainingReport(started_at, finished_at or _now(), list(trajectory_ids), int(n_samples),
                          {'version': champion.version, 'label': champion.label, 'summary': champion.summary()},
                          {'version': challenger.version, 'label': challenger.label, 'summary': challenger.summary()},
                          decision.to_dict(), promoted_version, None, config_hash(cfg) if cfg else None, dict(extra or {}))

def write_report(report:TrainingReport, reports_dir:str|Path, lock_timeout_s:float=60.0) -> Path:
    "Write `report` atomically as the next `cycle-NNNNN.json` (or its own `cycle`) in `reports_dir`."
    d = Path(reports_dir); d.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d/'reports.lock'), timeout=lock_timeout_s):
        done = [int(m.group(1)) for p in d.glob('cycle-*.json') if (m := re.fullmatch(r'cycle-(\d+)\.json', p.name))]
        cycle = report.cycle if report.cycle is not None else max(done, default=0) + 1
        p = d/f"cycle-{cycle:05d}.json"
        if p.exists(): raise RegistryError(f"report {str(p)!r} already exists; reports are never overwritten.")
        report.cycle = cycle
        return atomic_write_json(p, asdict(report))

def load_reports(reports_dir:str|Path) -> list:
    "Every cycle report in `reports_dir`, in cycle order."
    return [json.loads(p.read_text(encoding='utf-8')) for p in sorted(Path(reports_dir).glob('cycle-*.json'))]

# %%
rdir = tmp_root/'reports'
r1 = write_report(make_report(champ, better, dec, started_at=_now(), trajectory_ids=['traj-001', 'traj-002'],
                              n_samples=512, promoted_version='v0002', cfg=load_config()), rdir)
r2 = write_report(make_report(champ, noisy, d_noisy, started_at=_now(), trajectory_ids=['traj-003'], n_samples=256), rdir)
reps = load_reports(rdir)
test_eq([(r['cycle'], r['decision']['accepted'], r['promoted_version']) for r in reps], [(1, True, 'v0002'), (2, False, None)])
test_eq(reps[1]['decision']['reasons'], d_noisy.reasons)
test_eq(reps[0]['challenger']['summary']['overall']['n'], 40)
test_fail(lambda: write_report(TrainingReport(**{**reps[0], 'cycle': 1}), rdir), contains='never overwritten')
[p.name for p in sorted(rdir.iterdir())]

# %% [markdown]
# ## Resolving a controller by name
# `resolve_controller` is how the CLI, the service and the evaluation turn a name into a controller:
# `None`/`'active'` is the active registry version (loaded as a network-only `PolicyController`), or the
# threshold controller while nothing has been promoted; `'vN'` is that version (its checkpoint verified
# first); a baseline name (`greedy`, `sampling`, `best_of_n`, `threshold`) comes from `engine.make_controller`.

# %%
#| export
def baseline_names() -> set:
    "The baseline controller names the engine offers."
    from research_controller import engine as E
    return set(getattr(E, 'BASELINES', ('greedy', 'sampling', 'best_of_n', 'threshold')))

def registry_if_exists(cfg:Config, registry:ControllerRegistry|None=None) -> ControllerRegistry|None:
    "`registry`, else the configured registry when it exists on disk (None otherwise; nothing is created)."
    if registry is not None: return registry
    return ControllerRegistry.from_config(cfg) if (run_path(cfg, cfg.promotion.registry_dir)/'versions').is_dir() else None

def resolve_controller(cfg:Config, # the config (`promotion.registry_dir`, baselines, ...)
                       spec:str|None=None, # None/'active', 'vN' (or 'N'), or a baseline name
                       registry:ControllerRegistry|None=None, # None = the configured registry
                      ):
    "A controller from a name: the active version (threshold if none), a registry version, or a baseline."
    spec = None if spec in (None, '', 'active') else spec
    if spec is None:
        reg = registry_if_exists(cfg, registry)
        spec = (reg.active() if reg is not None else None) or 'threshold'
    base = baseline_names()
    if isinstance(spec, str) and spec in base:
        from research_controller import engine as E
        if not hasattr(E, 'make_controller'): raise ImportError(f"research_controller.engine has no make_controller; baseline {spec!r} needs it (update the package).")
        return E.make_controller(spec, cfg)
    try: v = version_name(spec)
    except RegistryError: raise ValueError(f"controller {spec!r} is unknown: use a baseline ({', '.join(sorted(base))}), "
                                           f"a registry version such as 'v3', or 'active'.") from None
    reg = registry_if_exists(cfg, registry)
    if reg is None: raise RegistryError(f"there is no registry at {str(run_path(cfg, cfg.promotion.registry_dir))!r}, so no version {v}; run `rc cycle` first.")
    ck = reg.checkpoint(v)  # verified: sha256, SLM fingerprint, feature dim
    from research_controller.selfplay import load_controller
    ctl = load_controller(ck, cfg, name='policy'); ctl.version = v
    return ctl

# %% [markdown]
# A registry of real (tiny) policy/value checkpoints: names resolve to `PolicyController`s of the right version.

# %%
from research_controller.network import PolicyValueNet, save_checkpoint
from research_controller.macro_actions import ACTION_NAMES
FP, DIM = '0123456789abcdef', 24

def tiny_ckpt(path, seed, cfg=None):
    "A real network checkpoint (small net) for the registry tests."
    import torch
    cfg = cfg or load_config(overrides=['network.hidden=16']); torch.manual_seed(seed)
    return save_checkpoint(PolicyValueNet(DIM, len(ACTION_NAMES), cfg.network), path, FP, ACTION_NAMES, cfg)

rtmp = Path(tempfile.mkdtemp())
rcfg = load_config(overrides=[f'paths.runs_dir={rtmp}', 'network.hidden=16'])
test_eq(registry_if_exists(rcfg), None)  # nothing created just by asking
rreg = ControllerRegistry.from_config(rcfg)
for i in (1, 2): rreg.register(tiny_ckpt(rtmp/f'c{i}.pt', i), dict(slm_fingerprint=FP, feature_dim=DIM))
rreg.promote('v0002', who='test', why='resolve demo')
ctl = resolve_controller(rcfg, 'v1')
test_eq((type(ctl).__name__, ctl.name, ctl.version, ctl.net.in_dim), ('PolicyController', 'policy', 'v0001', DIM))
test_eq(resolve_controller(rcfg).version, 'v0002'); test_eq(resolve_controller(rcfg, 'active').version, 'v0002')
test_fail(lambda: resolve_controller(rcfg, 'v7'), contains='no version v0007')
test_fail(lambda: resolve_controller(rcfg, 'smartest'), contains="controller 'smartest' is unknown")
test_eq([type(resolve_controller(rcfg, b)).__name__ for b in ('greedy', 'best_of_n')], ['GreedyBaseline', 'BestOfN'])
empty = load_config(overrides=[f'paths.runs_dir={rtmp}/empty'])
test_eq((resolve_controller(empty).name, resolve_controller(empty, 'active').name), ('threshold', 'threshold'))  # nothing promoted yet
test_eq((rtmp/'empty').exists(), False)
ctl

# %% [markdown]
# ## The online learning cycle
# `OnlineLearningCoordinator.run_cycle` is one turn of the loop: find the self-play trajectories that no
# cycle has used yet (their episode ids, persisted in a JSON state file), skip unless at least
# `promotion.min_new_trajectories` arrived, train a challenger from the champion's checkpoint on them,
# benchmark champion and challenger on the fixed suite, apply the `PromotionPolicy`, register the
# challenger (accepted or not: its benchmark stays on record) and promote it only when it passed, and
# write the report. The champion is the active version (or `baseline_version`), and the threshold
# controller before anything was promoted. A failure anywhere gives an error report, never a crash,
# and leaves the active version and the unused trajectories as they were. One cycle runs at a time
# (a file lock); the registry has its own lock.
#
# Every stage is injectable (`selfplay_fn`, `train_fn`, `evaluate_fn`, `controller_fn`) so the logic is
# tested with fakes here and runs on the real modules by default:
# `run_selfplay(cfg, checkpoint=, buffer_path=, seed=, progress=)`,
# `train(cfg, buffer_path=, init_checkpoint=, out_dir=, episode_ids=, resume=, progress=)` and
# `evaluate_controllers(cfg, controllers, suite=, progress=)`.

# %%
#| export
def buffer_episode_ids(buffer_path:str|Path) -> list:
    "Episode ids in a replay buffer, oldest first (`[]` when there is no buffer yet)."
    p = Path(buffer_path)
    if not (p/'header.json').exists(): return []
    from research_controller.train import open_buffer
    with open_buffer(p) as buf: return [buf.episode_meta(s)['episode_id'] for s in buf.episode_serials()]

def checkpoint_meta(path:str|Path) -> dict:
    "Registry metadata read from a network checkpoint: SLM fingerprint, feature dim, action names."
    from research_controller.network import load_checkpoint
    _, info = load_checkpoint(path)
    return dict(slm_fingerprint=info['slm_fingerprint'], feature_dim=int(info['in_dim']), action_names=list(info['action_names']))

def _default_selfplay(cfg, **kw):
    from research_controller.selfplay import run_selfplay
    return run_selfplay(cfg, **kw)

def _default_train(cfg, **kw):
    from research_controller.train import train
    return train(cfg, **kw)

def _default_evaluate(cfg, controllers, suite=None, progress=True):
    from research_controller.evaluate import evaluate_controllers
    return evaluate_controllers(cfg, controllers, suite=suite, progress=progress)

class OnlineLearningCoordinator:
    "Runs training cycles: new trajectories -> challenger -> benchmark -> promotion gate -> registry and report."
    def __init__(self, cfg:Config, # `promotion`, `train`, `selfplay`, `evaluate`, `paths`
                 registry:ControllerRegistry|None=None, # None = `ControllerRegistry.from_config(cfg)`
                 selfplay_fn=None, # (cfg, checkpoint, buffer_path, seed, progress) -> summary; None = selfplay.run_selfplay
                 train_fn=None, # (cfg, buffer_path, init_checkpoint, out_dir, episode_ids, resume, progress) -> TrainResult; None = train.train
                 evaluate_fn=None, # (cfg, controllers, suite, progress) -> [SuiteResult]; None = evaluate.evaluate_controllers
                 controller_fn=None, # spec ('threshold', 'vN') or checkpoint Path -> controller; None = resolve_controller / load_controller
                 policy:PromotionPolicy|None=None, # None = PromotionPolicy.from_config(cfg)
                 suite=None, # the fixed suite; None = the evaluate module's `get_suite(cfg)`
                 buffer_path:str|Path|None=None, # None = <runs>/<selfplay.out_dir>/buffer (where self-play writes)
                 who:str='coordinator', # recorded in the audit trail
                 reuse_results:bool=True): # reuse the champion's stored benchmark result when suite and config are unchanged
        self.cfg, self.who, self.suite, self.reuse_results = cfg, who, suite, reuse_results
        self.registry = registry if registry is not None else ControllerRegistry.from_config(cfg)
        self.selfplay_fn, self.train_fn = selfplay_fn or _default_selfplay, train_fn or _default_train
        self.evaluate_fn, self.controller_fn = evaluate_fn or _default_evaluate, controller_fn or self._controller
        self.policy = policy or PromotionPolicy.from_config(cfg)
        self.buffer_path = Path(buffer_path) if buffer_path is not None else run_path(cfg, cfg.selfplay.out_dir)/'buffer'
        self.reports_dir = run_path(cfg, cfg.promotion.reports_dir)
        self.state_path = self.reports_dir/'coordinator_state.json'
        self.reports_dir.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.reports_dir/'cycle.lock'), timeout=cfg.promotion.lock_timeout_s)

    def _controller(self, ref):
        if isinstance(ref, Path):
            from research_controller.selfplay import load_controller
            c = load_controller(ref, self.cfg, name='challenger'); c.version = None
            return c
        return resolve_controller(self.cfg, ref, self.registry)

    def __repr__(self):
        return f"OnlineLearningCoordinator(active={self.registry.active()!r}, new trajectories={len(self.new_trajectories())})"

# %% [markdown]
# The state file: the episode ids already used, the number of cycles and of self-play runs. It is only
# written while the cycle lock is held, and atomically.

# %%
#| export
@patch_to(OnlineLearningCoordinator)
def load_state(self) -> dict:
    "The persisted coordinator state (empty at first)."
    if not self.state_path.exists(): return {'seen': [], 'cycles': 0, 'selfplay_runs': 0}
    try: d = json.loads(self.state_path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e: raise RegistryError(f"coordinator state {str(self.state_path)!r} is corrupt ({e}); "
                                                          "delete it to treat every trajectory in the buffer as new.") from None
    return {'seen': [], 'cycles': 0, 'selfplay_runs': 0, **d}

@patch_to(OnlineLearningCoordinator)
def save_state(self, state:dict) -> Path:
    "Write the coordinator state atomically."
    return atomic_write_json(self.state_path, {**state, 'updated_at': _now()})

@patch_to(OnlineLearningCoordinator)
def new_trajectories(self, state:dict|None=None) -> list:
    "Episode ids in the buffer that no finished cycle has used, oldest first."
    seen = set((state or self.load_state())['seen'])
    return [e for e in buffer_episode_ids(self.buffer_path) if e not in seen]

# %% [markdown]
# Benchmark results are kept per controller (`results/<version or threshold>.json` next to the reports),
# stamped with the suite hash and the config hash. The champion was benchmarked when it was a challenger
# (items are generated with per-item seeds, so a rerun gives the same answers): a cycle reuses that result
# while suite and config are unchanged, which halves the benchmark time of every cycle.

# %%
#| export
def relabel_result(res:SuiteResult, name:str, version:str|None) -> SuiteResult:
    "The same result under another controller name/version (a challenger's result, once it is the champion)."
    return SuiteResult(name, version, res.suite, res.suite_hash, res.token_budget,
                       [replace(r, controller=name, version=version) for r in res.records], dict(res.meta))

@patch_to(OnlineLearningCoordinator)
def save_result(self, key:str, res:SuiteResult, suite_hash:str) -> Path:
    "Keep `res` as the benchmark result of `key` (a version or 'threshold') for this suite and config."
    r = SuiteResult(res.controller, res.version, res.suite, res.suite_hash, res.token_budget, res.records,
                    {**res.meta, 'stored_for': {'key': key, 'suite_hash': suite_hash, 'config_hash': config_hash(self.cfg)}})
    return r.save(self.reports_dir/'results'/f"{key}.json")

@patch_to(OnlineLearningCoordinator)
def stored_result(self, key:str, suite_hash:str) -> SuiteResult|None:
    "The kept result of `key` when it was made on this suite with this config, else None."
    p = self.reports_dir/'results'/f"{key}.json"
    if not p.exists(): return None
    try: r = SuiteResult.load(p)
    except Exception: return None
    st = r.meta.get('stored_for') or {}
    ok = st.get('suite_hash') == suite_hash == r.suite_hash and st.get('config_hash') == config_hash(self.cfg)
    return r if ok else None

# %% [markdown]
# Reports of cycles that did not reach a decision (skipped, failed) keep the same shape as the others:

# %%
#| export
@patch_to(OnlineLearningCoordinator)
def _bare_report(self, status:str, started:str, reasons:list, ids:list=(), champion:str|None=None,
                 error:str|None=None, extra:dict|None=None) -> TrainingReport:
    return TrainingReport(started, _now(), list(ids), 0, {'version': champion, 'label': champion or 'threshold'},
                          {'version': None}, {'accepted': False, 'reasons': list(reasons)}, None, None,
                          config_hash(self.cfg), dict(extra or {}), status, error)

# %% [markdown]
# `run_cycle` itself:

# %%
#| export
@patch_to(OnlineLearningCoordinator)
def run_cycle(self, dry_run:bool=False, # decide, but register, promote and write nothing
              baseline_version:str|int|None=None, # champion to beat and train from; None = the active version
              progress:bool=True,
              extra:dict|None=None, # recorded in the report's `extra` (e.g. the self-play summary)
             ) -> TrainingReport:
    "One training cycle; returns its report (written under promotion.reports_dir unless skipped or a dry run)."
    started, t0, times = _now(), time.perf_counter(), {}
    try: self.lock.acquire()
    except Timeout:
        return self._bare_report('skipped', started, [f"SKIP another cycle has held {str(self.lock.lock_file)!r} for more than "
                                                      f"{self.lock.timeout} s; try again when it is done (or raise promotion.lock_timeout_s)."])
    ids, champ_v, step = [], None, 'reading the coordinator state'
    try:
        state = self.load_state()
        step = 'listing the trajectories'
        ids = self.new_trajectories(state); need = self.cfg.promotion.min_new_trajectories
        if len(ids) < need:
            return self._bare_report('skipped', started, [f"SKIP {len(ids)} new trajectories in {str(self.buffer_path)!r}, fewer than "
                                                          f"promotion.min_new_trajectories = {need}; run self-play first."], ids)
        step = 'finding the champion'
        champ_v = version_name(baseline_version) if baseline_version is not None else self.registry.active()
        init = self.registry.checkpoint(champ_v) if champ_v else None
        step = 'training the challenger'; t = time.perf_counter()
        out = run_path(self.cfg, self.cfg.train.checkpoint_dir)/'cycles'/('cycle-' + re.sub(r'[^0-9T]', '', started)[:18])
        tr = self.train_fn(self.cfg, buffer_path=self.buffer_path, init_checkpoint=init, out_dir=out, episode_ids=ids,
                           resume=False, progress=progress)
        times['train_s'] = time.perf_counter() - t
        step = 'benchmarking champion and challenger'; t = time.perf_counter()
        if self.suite is None:
            from research_controller.evaluate import get_suite
            self.suite = get_suite(self.cfg)
        key = champ_v or 'threshold'
        kept = self.stored_result(key, self.suite.hash) if self.reuse_results else None
        ctls = ([] if kept else [self.controller_fn(key)]) + [self.controller_fn(Path(tr.checkpoint))]
        out = self.evaluate_fn(self.cfg, ctls, suite=self.suite, progress=progress)
        res_chall = out[-1]
        res_champ = relabel_result(kept, 'threshold' if champ_v is None else 'policy', champ_v) if kept else out[0]
        if not kept and not dry_run: self.save_result(key, res_champ, self.suite.hash)
        times['evaluate_s'] = time.perf_counter() - t
        step = 'applying the promotion policy'
        dec = self.policy.evaluate(res_champ, res_chall)
        n_samples = getattr(tr, 'positions', 0) or getattr(tr, 'samples', 0)
        extra = dict(extra or {}, baseline_version=champ_v, challenger_checkpoint=str(tr.checkpoint), train_steps=getattr(tr, 'steps', None),
                     final_loss=(tr.losses[-1] if getattr(tr, 'losses', None) else None), dry_run=dry_run, buffer_path=str(self.buffer_path))
        chall_v = promoted = None
        if not dry_run:
            step = 'registering the challenger'
            meta = dict(checkpoint_meta(tr.checkpoint), parent_version=champ_v, training_data_ids=list(ids), config=self.cfg,
                        benchmark=res_chall.summary(), notes=f"challenger of {champ_v or 'threshold'}: {'accepted' if dec.accepted else 'rejected'}")
            chall_v = self.registry.register(tr.checkpoint, meta, who=self.who)
            self.save_result(chall_v, res_chall, self.suite.hash)
            if dec.accepted:
                step = f'promoting {chall_v}'
                m = dec.metrics
                self.registry.promote(chall_v, who=self.who, decision=dec.to_dict(),
                                      why=f"beat {res_champ.label}: reward {m['reward_challenger']:.4f} vs {m['reward_champion']:.4f} "
                                          f"({m['reward_delta']:+.4f}, p={m['p_adj']:.3g}) on {m['n']} items")
                promoted = chall_v
            state = self.load_state()
            self.save_state({**state, 'seen': state['seen'] + [i for i in ids if i not in set(state['seen'])], 'cycles': state['cycles'] + 1})
        extra.update(challenger_version=chall_v, champion_result_reused=bool(kept))
        extra['seconds'] = {**times, 'total_s': time.perf_counter() - t0}
        rep = make_report(res_champ, res_chall, dec, started_at=started, trajectory_ids=ids, n_samples=n_samples,
                          promoted_version=promoted, cfg=self.cfg, extra=extra)
        rep.champion['version'], rep.challenger['version'] = champ_v, chall_v
        rep.status = 'dry_run' if dry_run else ('promoted' if promoted else 'rejected')
        if not dry_run: write_report(rep, self.reports_dir, self.cfg.promotion.lock_timeout_s)
        return rep
    except Exception as e:
        import traceback
        err = f"{type(e).__name__}: {e}"
        rep = self._bare_report('error', started, [f"ERROR while {step}: {err}"], ids, champ_v, err,
                                {**(extra or {}), 'traceback': traceback.format_exc()[-4000:], 'dry_run': dry_run, 'seconds': {**times, 'total_s': time.perf_counter() - t0}})
        if not dry_run:
            try: write_report(rep, self.reports_dir, self.cfg.promotion.lock_timeout_s)
            except Exception as e2: rep.extra['report_write_error'] = f"{type(e2).__name__}: {e2}"
        return rep
    finally: self.lock.release()

# %% [markdown]
# A printable summary of a report (what `rc cycle` prints at the end):

# %%
#| export
def report_table(report:TrainingReport|dict) -> str:
    "A two-column Markdown summary of a cycle report."
    r = asdict(report) if isinstance(report, TrainingReport) else dict(report)
    d, m = r.get('decision') or {}, (r.get('decision') or {}).get('metrics') or {}
    ch, cl = r.get('champion') or {}, r.get('challenger') or {}
    ids = r.get('trajectory_ids') or []
    def f(x, fmt='.4f'): return '—' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)
    rows = [('cycle', r.get('cycle') if r.get('cycle') is not None else '— (not written)'), ('status', r.get('status', '')),
            ('started / finished', f"{r.get('started_at', '')} / {r.get('finished_at', '')}"),
            ('new trajectories', f"{len(ids)}" + (f" ({ids[0]} … {ids[-1]})" if ids else '')), ('training samples', r.get('n_samples', 0)),
            ('champion', f"{ch.get('label') or ch.get('version') or 'threshold'}"),
            ('challenger', f"{cl.get('label', '—')}" + (f" registered as {cl['version']}" if cl.get('version') else ''))]
    if 'reward_delta' in m:
        ci = m.get('reward_ci') or [None, None]
        rows += [('reward champion → challenger', f"{f(m.get('reward_champion'))} → {f(m.get('reward_challenger'))}"),
                 ('Δ reward [CI]', f"{f(m.get('reward_delta'), '+.4f')} [{f(ci[0], '+.4f')}, {f(ci[1], '+.4f')}]"),
                 (f"p ({m.get('test', '')}, {m.get('correction', '')})", f(m.get('p_adj'), '.3g')), ('items', m.get('n')),
                 ('error rate champion / challenger', f"{f(m.get('error_rate_champion'), '.1%')} / {f(m.get('error_rate_challenger'), '.1%')}"),
                 ('latency ms champion / challenger', f"{f(m.get('latency_ms_champion'), '.0f')} / {f(m.get('latency_ms_challenger'), '.0f')}")]
    rows += [('decision', 'ACCEPTED' if d.get('accepted') else 'REJECTED' if r.get('status') in ('rejected', 'dry_run', 'promoted', 'decided') else r.get('status', '').upper()),
             ('active version now', r.get('promoted_version') or '(unchanged)')]
    if r.get('error'): rows.append(('error', r['error']))
    secs = (r.get('extra') or {}).get('seconds') or {}
    if secs: rows.append(('seconds', ', '.join(f"{k[:-2]} {v:.1f}" for k, v in secs.items())))
    out = '| | |\n|---|---|\n' + '\n'.join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)
    return out + '\n\n' + '\n'.join(d.get('reasons', []))

# %% [markdown]
# ### Cycles on fakes
# A real replay buffer holds fake episodes; the fake trainer writes a real (tiny) network checkpoint and
# assigns it a "quality"; the fake benchmark gives each controller the per-item rewards `base + quality +
# noise` (the threshold controller has quality 0). So the cycle's logic is exercised exactly, in seconds.

# %%
from research_controller.buffer import ReplayBuffer
import torch

def add_fake_episodes(cfg, ids, T=3):
    "Append fake episodes with the given ids to the configured self-play buffer."
    with ReplayBuffer(run_path(cfg, cfg.selfplay.out_dir)/'buffer', DIM, 5, 1000, 'float32') as buf:
        rng = np.random.default_rng(len(ids))
        for eid in ids:
            buf.add_episode(rng.normal(size=(T, DIM)), np.ones((T, 5), bool), np.full((T, 5), 0.2), np.zeros(T),
                            {'episode_id': eid, 'controller_version': 'uniform', 'slm_fingerprint': FP})

class FakeWorld:
    "Fake trainer / controllers / benchmark sharing one table of checkpoint qualities."
    def __init__(self, cfg, qualities): self.cfg, self.qualities, self.by_sha, self.calls = cfg, list(qualities), {}, []
    def train(self, cfg, buffer_path, init_checkpoint, out_dir, episode_ids, resume, progress):
        if not self.qualities: raise RuntimeError("the fake trainer ran out of data")
        q = self.qualities.pop(0)
        if q is None: raise RuntimeError("CUDA out of memory (simulated training failure)")
        self.calls.append(dict(init=init_checkpoint and sha256_file(init_checkpoint), n=len(episode_ids), resume=resume))
        ck = tiny_ckpt(Path(out_dir)/'final.pt', seed=len(self.by_sha) + 10, cfg=cfg)
        self.by_sha[sha256_file(ck)] = q
        return SimpleNamespace(checkpoint=str(ck), steps=5, samples=5 * 128, positions=3 * len(episode_ids), losses=[{'total': 1.0}])
    def controller(self, ref):
        if isinstance(ref, Path): return SimpleNamespace(name='challenger', version=None, q=self.by_sha[sha256_file(ref)])
        if ref == 'threshold': return SimpleNamespace(name='threshold', version=None, q=0.0)
        return SimpleNamespace(name='policy', version=ref, q=self.by_sha[sha256_file(self.registry.checkpoint(ref))])
    def evaluate(self, cfg, controllers, suite=None, progress=True):
        noise = np.random.default_rng(7)
        return [fake_result(c.name, base + c.q + noise.normal(0, 0.02, 40), version=c.version) for c in controllers]
    def coordinator(self, **kw):
        c = OnlineLearningCoordinator(self.cfg, train_fn=self.train, evaluate_fn=self.evaluate, controller_fn=self.controller,
                                      suite=SimpleNamespace(hash='a' * 64), **kw)
        self.registry = c.registry
        return c

ctmp = Path(tempfile.mkdtemp())
ccfg = load_config(overrides=[f'paths.runs_dir={ctmp}', 'network.hidden=16', 'promotion.min_new_trajectories=4'])
world = FakeWorld(ccfg, [0.3, 0.0, 0.6, None, 0.5])
coord = world.coordinator()
add_fake_episodes(ccfg, ['ep-000', 'ep-001'])
skip = coord.run_cycle(progress=False)
test_eq((skip.status, skip.cycle, world.calls, coord.registry.versions()), ('skipped', None, [], []))
test_eq('2 new trajectories' in skip.decision['reasons'][0] and 'min_new_trajectories = 4' in skip.decision['reasons'][0], True)
skip.decision['reasons'][0]

# %% [markdown]
# Enough new trajectories: the first challenger (quality +0.3) beats the threshold controller and becomes `v0001`.

# %%
add_fake_episodes(ccfg, [f'ep-{i:03d}' for i in range(2, 6)])
r1 = coord.run_cycle(progress=False)
test_eq((r1.status, r1.cycle, r1.promoted_version, r1.accepted), ('promoted', 1, 'v0001', True))
test_eq((r1.champion['label'], r1.champion['version'], r1.challenger['version']), ('threshold', None, 'v0001'))
test_eq(r1.trajectory_ids, [f'ep-{i:03d}' for i in range(6)]); test_eq(r1.n_samples, 18)
test_eq(r1.extra['champion_result_reused'], False)
test_eq(world.calls[-1], dict(init=None, n=6, resume=False))  # first cycle: a fresh network
test_eq(coord.registry.active(), 'v0001')
test_eq(coord.registry.meta('v0001')['training_data_ids'], r1.trajectory_ids)
test_eq(coord.load_state()['seen'], r1.trajectory_ids)
test_eq(load_reports(coord.reports_dir)[-1]['promoted_version'], 'v0001')
test_eq(coord.run_cycle(progress=False).status, 'skipped')  # the same trajectories are never used twice
print(report_table(r1))

# %% [markdown]
# A challenger without a real gain is registered (its benchmark stays on record) but rejected: the active
# version does not change. It was trained from the champion's checkpoint.

# %%
add_fake_episodes(ccfg, [f'ep-{i:03d}' for i in range(6, 11)])
r2 = coord.run_cycle(progress=False)
test_eq((r2.status, r2.cycle, r2.promoted_version, r2.challenger['version']), ('rejected', 2, None, 'v0002'))
test_eq(coord.registry.active(), 'v0001')
test_eq(world.calls[-1]['init'], sha256_file(coord.registry.checkpoint('v0001')))  # trained from the champion
test_eq(r2.champion['label'], 'policy@v0001')
test_eq(r2.extra['champion_result_reused'], True)  # v0001 was benchmarked as the challenger of cycle 1
test_eq(coord.stored_result('v0001', 'a' * 64).label, 'challenger')  # kept as benchmarked, relabelled when used as champion
test_close(r2.decision['metrics']['reward_champion'], r1.decision['metrics']['reward_challenger'], eps=1e-12)
test_eq(coord.stored_result('v0001', 'b' * 64), None)  # another suite: benchmark again
test_eq(any(r.startswith('FAIL reward_gain') for r in r2.decision['reasons']), True)
test_eq(coord.registry.meta('v0002')['notes'], 'challenger of v0001: rejected')
print(report_table(r2))

# %% [markdown]
# A dry run decides but changes nothing: no version, no report, the trajectories stay new.

# %%
add_fake_episodes(ccfg, [f'ep-{i:03d}' for i in range(11, 16)])
before = (coord.registry.versions(), coord.registry.active(), coord.load_state(), len(load_reports(coord.reports_dir)))
r3 = coord.run_cycle(dry_run=True, progress=False)
test_eq((r3.status, r3.accepted, r3.promoted_version, r3.cycle), ('dry_run', True, None, None))
test_eq((coord.registry.versions(), coord.registry.active(), coord.load_state(), len(load_reports(coord.reports_dir))), before)
test_eq(len(coord.new_trajectories()), 5)
r3.decision['reasons'][2]

# %% [markdown]
# Training fails: an error report is written, nothing is promoted, and the trajectories wait for the next cycle.

# %%
r4 = coord.run_cycle(progress=False)
test_eq((r4.status, r4.cycle, r4.promoted_version, r4.accepted), ('error', 3, None, False))
test_eq(r4.error, 'RuntimeError: CUDA out of memory (simulated training failure)')
test_eq(r4.decision['reasons'], ['ERROR while training the challenger: RuntimeError: CUDA out of memory (simulated training failure)'])
test_eq('Traceback' in r4.extra['traceback'], True)
test_eq((coord.registry.active(), coord.registry.versions(), len(coord.new_trajectories())), ('v0001', ['v0001', 'v0002'], 5))
test_eq(load_reports(coord.reports_dir)[-1]['status'], 'error')
print(report_table(r4))

# %% [markdown]
# `baseline_version` names the champion to beat (and to train from) instead of the active one. Here the
# challenger (quality +0.5) is compared with the rejected `v0002` (quality 0) and promoted.

# %%
r5 = coord.run_cycle(baseline_version='v2', progress=False)
test_eq((r5.status, r5.champion['version'], r5.promoted_version), ('promoted', 'v0002', 'v0003'))
test_eq(world.calls[-1]['init'], sha256_file(coord.registry.checkpoint('v0002')))
test_eq(coord.registry.meta('v0003')['parent_version'], 'v0002')
test_eq(len(coord.new_trajectories()), 0)
coord.registry

# %% [markdown]
# Rollback restores the previous version (an audited event, the history is kept), and names resolve to it:

# %%
ev = coord.registry.rollback(who='operator', why='v0003 answers worse on live traffic')
test_eq((ev['version'], ev['previous'], coord.registry.active()), ('v0001', 'v0003', 'v0001'))
test_eq(resolve_controller(ccfg, 'active', coord.registry).version, 'v0001')
test_eq(coord.registry.check(), [])
test_eq([(e['event'], e['version']) for e in coord.registry.history() if e['event'] != 'register'],
        [('promote', 'v0001'), ('promote', 'v0003'), ('rollback', 'v0001')])
[p.name for p in sorted(coord.reports_dir.iterdir())]

# %% [markdown]
# ### Two cycles started at once
# Two processes run `run_cycle` on the same runs directory (same buffer, registry, state and reports),
# released at the same instant. The cycle lock serialises them: one trains on the 8 new trajectories and
# is promoted, the other then finds nothing new and skips. The registry, the state and the reports
# stay consistent, and no trajectory is used twice.

# %%
cworker = textwrap.dedent('''
    import sys, time, pickle
    from pathlib import Path
    import numpy as np
    from types import SimpleNamespace
    from research_controller.config import load_config
    from research_controller.promotion import OnlineLearningCoordinator, checkpoint_meta
    from research_controller.evaluate import ItemRecord, SuiteResult
    import torch
    from research_controller.network import PolicyValueNet, save_checkpoint
    from research_controller.macro_actions import ACTION_NAMES
    runs, name = Path(sys.argv[1]), sys.argv[2]
    cfg = load_config(overrides=[f"paths.runs_dir={runs}", "network.hidden=16", "promotion.min_new_trajectories=4"])
    def train(cfg, buffer_path, init_checkpoint, out_dir, episode_ids, resume, progress):
        torch.manual_seed(0); time.sleep(0.5)
        ck = save_checkpoint(PolicyValueNet(24, 5, cfg.network), Path(out_dir)/f"{name}.pt", "0123456789abcdef", ACTION_NAMES, cfg)
        return SimpleNamespace(checkpoint=str(ck), steps=1, samples=1, positions=len(episode_ids), losses=[])
    def res(label, q):
        recs = [ItemRecord(label, None, f"i{i}", "squad", "t", {}, {}, 0.5 + q + 0.01 * (i % 3), 10, 1.0) for i in range(20)]
        return SuiteResult(label, None, "toy", "a" * 64, 64, recs)
    def evaluate(cfg, controllers, suite=None, progress=True): return [res("champion", 0.0), res("challenger", 0.3)]
    coord = OnlineLearningCoordinator(cfg, train_fn=train, evaluate_fn=evaluate, controller_fn=lambda ref: ref, who=name)
    (runs/f"{name}.ready").touch()
    while not (runs/"go").exists(): time.sleep(0.001)
    rep = coord.run_cycle(progress=False)
    print(rep.status, rep.cycle, rep.promoted_version, len(rep.trajectory_ids), rep.error)
''')
prun = Path(tempfile.mkdtemp())
pcfg = load_config(overrides=[f'paths.runs_dir={prun}', 'network.hidden=16', 'promotion.min_new_trajectories=4'])
add_fake_episodes(pcfg, [f'ep-{i:03d}' for i in range(8)])
(prun/'cworker.py').write_text(cworker)
procs = [subprocess.Popen([sys.executable, str(prun/'cworker.py'), str(prun), f"proc{k}"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) for k in (1, 2)]
t0 = time.time()
while not all((prun/f"proc{k}.ready").exists() for k in (1, 2)) and time.time() - t0 < 120: time.sleep(0.01)
(prun/'go').touch()
outs = sorted(p.communicate(timeout=180)[0].strip().splitlines()[-1] for p in procs)
test_eq([p.returncode for p in procs], [0, 0])
test_eq(outs, ['promoted 1 v0001 8 None', 'skipped None None 0 None'])
preg = ControllerRegistry.from_config(pcfg)
test_eq((preg.versions(), preg.active(), preg.check()), (['v0001'], 'v0001', []))
preps = load_reports(run_path(pcfg, pcfg.promotion.reports_dir))
test_eq([(r['cycle'], r['status']) for r in preps], [(1, 'promoted')])
test_eq(json.loads((run_path(pcfg, pcfg.promotion.reports_dir)/'coordinator_state.json').read_text())['seen'], [f'ep-{i:03d}' for i in range(8)])
outs

# %% [markdown]
# ## `cycle`: the main job
# `cycle` is `rc cycle`: self-play with the active controller (`selfplay.episodes` episodes at
# `selfplay.max_new_tokens` tokens, each run with a fresh seed so its episode ids are new), then
# `run_cycle`, under one lock. It returns the report and its printable table.

# %%
#| export
class CycleOutcome:
    "What `cycle` did: the self-play summary, the cycle report and its printable table."
    def __init__(self, selfplay, report:TrainingReport, seconds:float):
        self.selfplay, self.report, self.seconds = selfplay, report, seconds
    @property
    def table(self) -> str: return report_table(self.report)
    def __repr__(self):
        sp = self.selfplay
        head = (f"self-play: {sp.episodes} episodes, {sp.positions} positions, mean reward {sp.mean_reward:.3f}, {sp.seconds:.0f} s\n"
                if sp is not None else '')
        return head + self.table + f"\n\ncycle finished in {self.seconds:.0f} s"

def cycle(cfg:Config, # the config (all sections)
          progress:bool=True, # progress bars for self-play, training and the benchmark
          dry_run:bool=False, # decide, but register, promote and write nothing
          coordinator:OnlineLearningCoordinator|None=None, # None = OnlineLearningCoordinator(cfg)
         ) -> CycleOutcome:
    "One online-learning cycle: self-play with the active controller, then train, benchmark and gate a challenger."
    t0, started = time.perf_counter(), _now()
    co = coordinator or OnlineLearningCoordinator(cfg)
    try: co.lock.acquire()
    except Timeout:
        return CycleOutcome(None, co._bare_report('skipped', started, [f"SKIP another cycle is running (lock {str(co.lock.lock_file)!r})."]),
                            time.perf_counter() - t0)
    try:
        try:
            state = co.load_state()
            v = co.registry.active()
            sp = co.selfplay_fn(cfg, checkpoint=co.registry.checkpoint(v) if v else None, buffer_path=co.buffer_path,
                                seed=cfg.selfplay.seed + 1000 * state['selfplay_runs'], progress=progress)
            if not dry_run: co.save_state({**co.load_state(), 'selfplay_runs': state['selfplay_runs'] + 1})
        except Exception as e:
            import traceback
            err = f"{type(e).__name__}: {e}"
            rep = co._bare_report('error', started, [f"ERROR during self-play: {err}"], error=err,
                                  extra={'traceback': traceback.format_exc()[-4000:]})
            if not dry_run: write_report(rep, co.reports_dir, cfg.promotion.lock_timeout_s)
            return CycleOutcome(None, rep, time.perf_counter() - t0)
        spx = {k: getattr(sp, k, None) for k in ('episodes', 'positions', 'mean_reward', 'seconds', 'buffer_path')}
        rep = co.run_cycle(dry_run=dry_run, progress=progress, extra={'selfplay': spx})  # the lock is re-entrant in this process
        return CycleOutcome(sp, rep, time.perf_counter() - t0)
    finally: co.lock.release()

# %% [markdown]
# On fakes: a fake self-play adds 6 episodes whose ids carry the seed; two cycles use different seeds.

# %%
def fake_selfplay(cfg, checkpoint=None, buffer_path=None, seed=0, progress=True):
    ids = [f"sp-s{seed}-e{i:05d}" for i in range(6)]; add_fake_episodes(cfg, ids)
    return SimpleNamespace(episodes=6, positions=18, episode_ids=ids, mean_reward=0.25, seconds=0.1, checkpoint=checkpoint)

stmp = Path(tempfile.mkdtemp())
scfg = load_config(overrides=[f'paths.runs_dir={stmp}', 'network.hidden=16', 'promotion.min_new_trajectories=6'])
sworld = FakeWorld(scfg, [0.3, 0.0])
sco = sworld.coordinator(selfplay_fn=fake_selfplay)
o1 = cycle(scfg, progress=False, coordinator=sco)
o2 = cycle(scfg, progress=False, coordinator=sco)
test_eq([(o.report.status, o.report.cycle, o.report.trajectory_ids[0]) for o in (o1, o2)],
        [('promoted', 1, 'sp-s0-e00000'), ('rejected', 2, 'sp-s1000-e00000')])
test_eq(load_reports(sco.reports_dir)[1]['extra']['selfplay']['episodes'], 6)
test_eq((sco.registry.active(), sco.load_state()['selfplay_runs']), ('v0001', 2))
o1

# %% [markdown]
# ### The real cycle
# On the default configuration (real SLM, self-play with MCTS, training, the full benchmark suite for
# champion and challenger): the README's main command. It runs in a fresh runs directory.

# %%
#| slow
real_runs = Path(tempfile.mkdtemp())
real = cycle(load_config(overrides=[f'paths.runs_dir={real_runs}']), progress=True)
test_eq(real.report.status in ('promoted', 'rejected'), True)
test_eq(len(real.report.trajectory_ids), load_config().selfplay.episodes)
print(real)

# %%
#| hide
for d in (tmp_root, croot.parent, rtmp, ctmp, prun, stmp): shutil.rmtree(d, ignore_errors=True)
