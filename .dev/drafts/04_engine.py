# %%
#| default_exp engine

# %% [markdown]
# # Engine
# > Generation a controller can steer one macro-action at a time: incremental decoding on a shared, segmented KV cache, O(1) forks, batched steps, hidden thoughts, and the training-free controllers.

# %%
#| export
from __future__ import annotations
import logging, math, time
from dataclasses import dataclass, field, asdict
from typing import Callable, Optional, Sequence
import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from research_controller.config import Config, ConfigError, config_hash, load_config
from research_controller.slm import encode_prompt, model_fingerprint
from research_controller.features import (FEATURE_SCALARS, N_SCALARS, RunningStats, assemble_features, cosine_drift,
                                          feature_dim, feature_names, feature_summary, get_embedder, logit_stats, strip_thoughts)
from research_controller.macro_actions import (ACTION_NAMES, N_ACTIONS, Action, MacroActionError, MacroState, Plan,
                                               apply_plan, check_action, legal_mask, plan_action)

log = logging.getLogger(__name__)

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import os, io, re, copy, json
os.environ.setdefault('HF_HUB_OFFLINE', '1')

# %% [markdown]
# ## How the KV cache is stored
# MCTS forks a generation state thousands of times, and `RESAMPLE` throws the last chunk away. Both are
# cheap when the cache is not one tensor per state but a **tree of immutable segments**: the prompt is one
# segment, and every action that forwards tokens adds one segment (its tokens, their K/V for every layer,
# and what the features need at its end) whose `parent` is the previous one.
#
# - `fork()` copies a pointer to the last segment (plus the RNG state): O(1), whatever the length.
# - `RESAMPLE` regenerates from the last segment's parent: the crop *is* the pointer, nothing is recomputed.
# - Siblings in a search tree share every common prefix segment in memory.
#
# To step a batch of states, the engine assembles one batched buffer per chunk: each state's segments
# are copied once into a pre-allocated `[layers, 2, batch, kv_heads, prefix + chunk, head_dim]` tensor,
# left-padded to the longest prefix (masked, with explicit position ids), then the chunk's tokens are
# decoded one forward per token writing into that buffer in place (no per-step concatenation, unlike
# `DynamicCache`), and finally each state's new K/V is cut out as its new segment. The copy is O(prefix)
# once per chunk, not per token.
#
# `_BufferCache` is the `transformers` cache that makes a model write into and read from that buffer.

# %%
#| export
class _BufferLayer(CacheLayerMixin):
    "One layer's view of a `_BufferCache`: writes new K/V at the cache position, returns the filled prefix."
    is_sliding, is_compileable, is_croppable = False, False, False
    def __init__(self, owner, idx:int):
        super().__init__(); self.owner, self.idx, self.is_initialized = owner, idx, True
    def lazy_initialization(self, key_states, value_states): pass
    def update(self, key_states, value_states, *args, **kwargs):
        o, q = self.owner, key_states.shape[-2]
        k, v = o.buf[self.idx, 0], o.buf[self.idx, 1]
        k[:, :, o.pos:o.pos + q].copy_(key_states); v[:, :, o.pos:o.pos + q].copy_(value_states)
        return k[:, :, :o.pos + q], v[:, :, :o.pos + q]
    def get_mask_sizes(self, query_length:int): return self.owner.pos + query_length, 0
    def get_seq_length(self): return self.owner.pos
    def get_max_length(self): return self.owner.buf.shape[-2]

class _BufferCache(Cache):
    "A KV cache over a pre-allocated `[L, 2, B, H_kv, T, D]` buffer; `pos` is the column the next tokens go to."
    def __init__(self, buf:torch.Tensor, pos:int=0):
        self.buf, self.pos = buf, pos
        super().__init__(layers=[_BufferLayer(self, i) for i in range(buf.shape[0])])

# %% [markdown]
# ## Segments and states

# %%
#| export
class Segment:
    "An immutable span of tokens with its K/V and the running statistics at its end; `parent` links to the prefix."
    __slots__ = ('parent', 'ids', 'kv', 'kind', 'start', 'end', 'logits', 'entropy', 'varentropy', 'logit_gap', 'stats',
                 'hsum', 'hsum_vis', 'n_vis', 'lp_sum', 'lp_n', 'ms', '_gen_ids')
    def __init__(self, parent, ids, kv, kind, logits, ls, stats, hsum, hsum_vis, n_vis, lp_sum, lp_n, ms):
        self.parent, self.ids, self.kv, self.kind = parent, ids, kv, kind
        self.start = parent.end if parent is not None else 0
        self.end = self.start + len(ids)
        self.logits = logits  # raw next-token logits after the last token (model dtype)
        self.entropy, self.varentropy, self.logit_gap = ls
        self.stats, self.hsum, self.hsum_vis, self.n_vis = stats, hsum, hsum_vis, n_vis
        self.lp_sum, self.lp_n, self.ms, self._gen_ids = lp_sum, lp_n, ms, None

    def chain(self) -> list['Segment']:
        "Segments from the prompt to this one."
        out, s = [], self
        while s is not None: out.append(s); s = s.parent
        return out[::-1]

    def gen_ids(self) -> list[int]:
        "Every token generated after the prompt, up to the end of this segment (cached)."
        if self._gen_ids is None:
            self._gen_ids = [] if self.parent is None else self.parent.gen_ids() + list(self.ids)
        return self._gen_ids

    def __repr__(self): return f"Segment({self.kind}, tokens {self.start}:{self.end})"

# %%
#| export
@dataclass
class _Decision:
    "One decision in a state's history (a linked list, shared between forks)."
    parent: Optional['_Decision']
    step: int
    action: Action
    pre_tip: Segment
    pre_ms: MacroState
    post_tip: Segment
    post_ms: MacroState

class GenState:
    "One generation in progress: the last KV segment, macro counters, RNG and history. Opaque outside the engine."
    __slots__ = ('tip', 'root', 'ms', 'last', 'gen', 'seed', 'prompt', 'temperature', 'top_p', 'top_k', 't0', 't_done')
    def __repr__(self):
        m = self.ms
        return (f"GenState(tokens={m.spent}/{m.budget}, kept={m.kept}, in_thought={m.in_thought}, "
                f"decisions={self.last.step + 1 if self.last else 0}, done={m.done}{', ' + m.reason if m.done else ''})")

# %% [markdown]
# ## Generation results

# %%
#| export
@dataclass
class GenerationResult:
    "What a controller returns: the visible text, the macro trace, every token spent, latency, thoughts (if asked), metadata."
    text: str
    macro_trace: list
    tokens: int
    latency_ms: float
    thought_text: Optional[str] = None
    meta: dict = field(default_factory=dict)
    def to_dict(self) -> dict: return asdict(self)

# %% [markdown]
# ## The engine
# `Engine(model, tok, cfg)` wraps a frozen SLM. It supports decoder-only models whose layers all use
# full attention (Llama, SmolLM2, Qwen2-like); others are refused with a clear message.

# %%
#| export
class Engine:
    "Incremental, batched, forkable generation of a frozen SLM steered by macro-actions."
    def __init__(self, model, tok, cfg:Config|None=None):
        self.cfg = cfg or load_config()
        self.model, self.tok = model, tok
        mc = model.config
        lt = getattr(mc, 'layer_types', None)
        if getattr(mc, 'sliding_window', None) or (lt and any(t != 'full_attention' for t in lt)):
            raise ConfigError(f"slm.source={self.cfg.slm.source!r}: the engine supports full-attention decoders only (this model has "
                              f"layer types {sorted(set(lt or ['sliding']))}). Fix: use a Llama/SmolLM2-style model.")
        for a in ('thought_open_id', 'thought_close_id'):
            if getattr(tok, a, None) is None: raise ConfigError(f"tokenizer has no {a}; load models with research_controller.slm.load_slm / tiny_slm.")
        self.n_layers, self.n_kv = mc.num_hidden_layers, mc.num_key_value_heads
        self.head_dim = getattr(mc, 'head_dim', None) or mc.hidden_size // mc.num_attention_heads
        self.hidden_size = mc.hidden_size
        self.max_positions = getattr(mc, 'max_position_embeddings', 1 << 30)
        self.device, self.dtype = model.device, model.dtype
        self.open_id, self.close_id = tok.thought_open_id, tok.thought_close_id
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in [*eos, tok.eos_token_id] if e is not None}
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos_ids)
        self.suppress = torch.tensor([self.open_id, self.close_id], device=self.device)
        self.feature_dim, self.feature_names = feature_dim(self.hidden_size), feature_names(self.hidden_size)
        self.neg = torch.finfo(self.dtype).min
        self.counters = dict(forwarded=0, padded=0, forward_calls=0, prefix_copied=0, prefill=0, chunks=0)
        self._fingerprint = self._cfg_hash = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None: self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def config_hash(self) -> str:
        if self._cfg_hash is None: self._cfg_hash = config_hash(self.cfg)
        return self._cfg_hash

    def __repr__(self):
        return f"Engine({type(self.model).__name__}, layers={self.n_layers}, kv_heads={self.n_kv}, feature_dim={self.feature_dim})"

# %% [markdown]
# The unit checks run on `tiny_slm()` (a 2-layer random Llama with the real tokenizer, fp32): fast, and
# every code path is the same as with the real model.

# %%
from research_controller.slm import tiny_slm, load_slm
cfg = load_config(overrides=['macro.chunk_tokens=4'])
tm, tt = tiny_slm(cfg)
eng = Engine(tm, tt, cfg)
eng

# %% [markdown]
# ### Prefill: `new_state`
# The prompt (chat template applied when configured) is forwarded once, batched over prompts with left
# padding. The prompt segment stores its K/V, the logits after its last token, the sum of its final hidden
# states, and the entropy statistics seeded with the first next-token entropy.

# %%
#| export
def _causal_pad_mask(offsets:list[int], n:int, dtype, neg, device) -> torch.Tensor:
    "Additive [B, 1, n, n] mask: causal, and columns before each row's offset (left padding) masked."
    m = torch.full((n, n), neg, dtype=dtype, device=device).triu(1).expand(len(offsets), 1, n, n).clone()
    for b, off in enumerate(offsets):
        if off: m[b, :, :, :off] = neg
    return m

@torch.inference_mode()
def _next_stats(self:Engine, logits:torch.Tensor):
    "Suppress the thought tokens (only actions emit them), then entropy, varentropy, gap and log-probs, as floats."
    x = logits.to(torch.float32, copy=True)
    x.index_fill_(-1, self.suppress, -float('inf'))
    st = logit_stats(x)
    return x, torch.log_softmax(x, -1), st
Engine._next_stats = _next_stats

@torch.inference_mode()
def new_states(self:Engine, prompts:Sequence[str], max_new_tokens:Optional[int]=None, seed:int|Sequence[int]=0,
               temperature:Optional[float]=None, top_p:Optional[float]=None, top_k:Optional[int]=None) -> list[GenState]:
    "Prefill `prompts` (batched) and return one fresh `GenState` per prompt."
    budget = self.cfg.macro.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    if budget < 1: raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 (it is the total token budget).")
    seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts): raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    out = []
    for i in range(0, len(prompts), self.cfg.engine.batch_size):
        out += self._prefill(prompts[i:i + self.cfg.engine.batch_size], budget, seeds[i:i + self.cfg.engine.batch_size],
                             temperature, top_p, top_k)
    return out
Engine.new_states = new_states

def _prefill(self:Engine, prompts, budget, seeds, temperature, top_p, top_k):
    t0 = time.perf_counter()
    ids = [encode_prompt(self.tok, p, self.cfg) for p in prompts]
    for p, x in zip(prompts, ids):
        if len(x) + budget > self.max_positions:
            raise ValueError(f"prompt of {len(x)} tokens + max_new_tokens={budget} exceeds the model's {self.max_positions} positions. Fix: shorten the prompt or the budget.")
    B, n = len(ids), max(len(x) for x in ids)
    offs = [n - len(x) for x in ids]
    inp = torch.tensor([[self.pad_id] * o + x for o, x in zip(offs, ids)], device=self.device)
    pos = (torch.arange(n, device=self.device)[None] - torch.tensor(offs, device=self.device)[:, None]).clamp_min(0)
    buf = torch.zeros(self.n_layers, 2, B, self.n_kv, n, self.head_dim, dtype=self.dtype, device=self.device)
    cache = _BufferCache(buf, 0)
    h = self.model.model(input_ids=inp, attention_mask=_causal_pad_mask(offs, n, self.dtype, self.neg, self.device),
                         position_ids=pos, past_key_values=cache, use_cache=True).last_hidden_state
    logits = self.model.lm_head(h[:, -1])
    _, _, st = self._next_stats(logits)
    self.counters['prefill'] += sum(len(x) for x in ids); self.counters['forward_calls'] += 1
    states = []
    for b, (p, x, off) in enumerate(zip(prompts, ids, offs)):
        ls = tuple(float(st[k][b]) for k in ('entropy', 'varentropy', 'logit_gap'))
        ms = MacroState(budget=budget)
        seg = Segment(None, tuple(x), buf[:, :, b, :, off:].clone(), 'prompt', logits[b].clone(), ls,
                      RunningStats().push(ls[0]), h[b, off:].float().sum(0), torch.zeros(self.hidden_size), 0, 0.0, 0, ms)
        s = GenState()
        s.tip = s.root = seg; s.ms, s.last, s.prompt = ms, None, p
        s.seed = int(seeds[b]); s.gen = torch.Generator().manual_seed(s.seed)
        mcfg = self.cfg.macro
        s.temperature = mcfg.temperature if temperature is None else float(temperature)
        s.top_p = mcfg.top_p if top_p is None else float(top_p)
        s.top_k = mcfg.top_k if top_k is None else int(top_k)
        s.t0, s.t_done = t0, None
        states.append(s)
    return states
Engine._prefill = _prefill

def new_state(self:Engine, prompt:str, max_new_tokens:Optional[int]=None, seed:int=0, **kw) -> GenState:
    "Prefill one prompt: a fresh `GenState` with `max_new_tokens` of budget (default `macro.max_new_tokens`)."
    return self.new_states([prompt], max_new_tokens, seed, **kw)[0]
Engine.new_state = new_state

# %%
s0 = eng.new_state("What is the capital of France?", max_new_tokens=24)
test_eq(s0.tip.end, len(encode_prompt(tt, "What is the capital of France?", cfg)))
test_eq(tuple(s0.tip.kv.shape), (2, 2, eng.n_kv, s0.tip.end, eng.head_dim))  # [layers, K/V, kv_heads, tokens, head_dim]
s0

# %% [markdown]
# A left-padded batched prefill gives the same K/V and logits as prefilling each prompt alone:

# %%
pa, pb = eng.new_states(["Hi", "Tell me about the history of the Roman empire in detail."], 16)
qa = eng.new_state("Hi", 16)
test_close(pa.tip.kv, qa.tip.kv, eps=1e-4)
test_close(pa.tip.logits, qa.tip.logits, eps=1e-3)
test_eq(pa.tip.end < pb.tip.end, True)

# %% [markdown]
# ### Legality and features
# `legal_mask`, `is_done` and `tokens_spent` read the macro counters (`03_macro_actions`). `features` builds
# the documented vector (`02_features`) from what the last segment cached: the next-token entropy, gap and
# z-score, drift (MiniLM on the visible text, or the SLM's pooled states: `features.drift_embedder`),
# position = tokens spent / budget, the thought flag, and the mean final hidden state over every token the
# SLM has read so far (prompt, answer and thoughts). `features_batch` embeds all the states' texts in one
# MiniLM call; embeddings are cached per text.

# %%
#| export
def legal_mask(self:Engine, s:GenState) -> np.ndarray:
    "Boolean mask over actions legal in `s`."
    return legal_mask_ms(s.ms, self.cfg.macro)
def is_done(self:Engine, s:GenState) -> bool: return s.ms.done
def tokens_spent(self:Engine, s:GenState) -> int:
    "Every token forwarded for this state: kept, resampled-away and thought tokens."
    return s.ms.spent
Engine.legal_mask, Engine.is_done, Engine.tokens_spent = legal_mask, is_done, tokens_spent

# %%
#| export
from research_controller.macro_actions import legal_mask as legal_mask_ms

def visible_ids(self:Engine, tip:Segment) -> list[int]:
    "Generated ids outside thoughts, without end-of-sequence tokens."
    return [t for t in strip_thoughts(tip.gen_ids(), self.open_id, self.close_id) if t not in self.eos_ids]
Engine.visible_ids = visible_ids

def _drifts(self:Engine, items) -> list[float]:
    "Drift of each (tip, root, prompt) item, batched."
    if self.cfg.features.drift_embedder == 'slm':
        out = []
        for tip, root, _ in items:
            out.append(cosine_drift((tip.hsum_vis / tip.n_vis).numpy(), (root.hsum / root.end).numpy()) if tip.n_vis else 0.0)
        return out
    texts = [self.tok.decode(self.visible_ids(tip), skip_special_tokens=True) for tip, _, _ in items]
    need = [i for i, t in enumerate(texts) if t.strip()]
    out = [0.0] * len(items)
    if need:
        emb = get_embedder(self.cfg)
        E = emb.embed([texts[i] for i in need] + sorted({items[i][2] for i in need}))
        P = {p: E[len(need) + j] for j, p in enumerate(sorted({items[i][2] for i in need}))}
        for j, i in enumerate(need): out[i] = cosine_drift(E[j], P[items[i][2]])
    return out
Engine._drifts = _drifts

def _vectors(self:Engine, items) -> np.ndarray:
    "Feature vectors of (tip, ms, root, prompt) items."
    drifts = self._drifts([(t, r, p) for t, _, r, p in items])
    rows = []
    for (tip, ms, root, _), d in zip(items, drifts):
        z = tip.stats.zscore(tip.entropy, self.cfg.features.zscore_min_std)
        rows.append(assemble_features(tip.entropy, tip.logit_gap, z, d, ms.spent / ms.budget, ms.in_thought,
                                      (tip.hsum / tip.end).numpy()))
    return np.stack(rows) if rows else np.zeros((0, self.feature_dim), np.float32)
Engine._vectors = _vectors

def features_batch(self:Engine, states:Sequence[GenState]) -> np.ndarray:
    "Feature vectors [len(states), feature_dim] (float32), drift embedded in one batch."
    return self._vectors([(s.tip, s.ms, s.root, s.prompt) for s in states])

def features(self:Engine, s:GenState) -> np.ndarray:
    "The float32 state vector of `s` in `engine.feature_names` order."
    return self.features_batch([s])[0]

def signals(self:Engine, s:GenState) -> dict:
    "Cheap named signals for hand-written controllers (no drift): entropy, varentropy, gap, z-score and counters."
    t, m = s.tip, s.ms
    return dict(entropy=t.entropy, varentropy=t.varentropy, logit_gap=t.logit_gap,
                entropy_z=t.stats.zscore(t.entropy, self.cfg.features.zscore_min_std), position=m.spent / m.budget,
                in_thought=m.in_thought, thought_len=m.thought_len, n_thoughts=m.n_thoughts, resamples=m.resamples,
                last=m.last, spent=m.spent, left=m.left, chunk_entropy_z=self._chunk_z(t),
                chunk_hidden=bool(t.kind == 'chunk' and t.parent.ms.in_thought))

def _chunk_z(self:Engine, t:Segment) -> float:
    "z-score of the last chunk's mean token entropy against every entropy before it (standard error of a mean); 0 without a chunk or history."
    if t.kind != 'chunk' or t.parent is None: return 0.0
    ref, n = t.parent.stats, len(t.ids)
    if ref.n < 2 or n < 1: return 0.0
    tot = t.stats.n * t.stats.mean - ref.n * ref.mean  # entropies after each chunk token
    mean = (t.parent.entropy + tot - t.entropy) / n  # entropies of the distributions the chunk's tokens were drawn from
    return (mean - ref.mean) / (max(ref.std, self.cfg.features.zscore_min_std) / math.sqrt(n))
Engine._chunk_z = _chunk_z
Engine.features_batch, Engine.features, Engine.signals = features_batch, features, signals

# %%
test_eq(eng.legal_mask(s0).tolist(), [True, True, False, False, True])
f0 = eng.features(s0)
test_eq((f0.shape, f0.dtype), ((eng.feature_dim,), np.float32))
test_eq(f0[2:6].tolist(), [0.0, 0.0, 0.0, 0.0])  # z on the first step, no drift yet, position 0, not in a thought
feature_summary(f0)

# %% [markdown]
# ### Stepping
# `_run` is the decoder. Each job is (prefix segment, plan): the prefix is the state's last segment, or its
# parent for `RESAMPLE`. Per token and per row the next token is forced (thought tokens), sampled, or the
# row is finished (it then feeds padding that nobody reads until the longest row is done). Sampling is
# greedy at temperature 0, otherwise temperature / top-k / top-p with the state's own `torch.Generator`,
# so a seed reproduces a trace. The SLM itself never emits the thought tokens (they are suppressed);
# inside a thought an end-of-sequence token becomes the close token.

# %%
#| export
@dataclass
class _Row:
    "Per-row bookkeeping while a chunk is decoded."
    plan: Plan
    prefix: Segment
    state: GenState
    temperature: float
    toks: list = field(default_factory=list)
    n_sampled: int = 0
    eos: bool = False
    finished: bool = False
    inside: bool = False
    ent: list = field(default_factory=list)
    hsum: Optional[torch.Tensor] = None
    hvis: Optional[torch.Tensor] = None
    n_vis: int = 0
    lp_sum: float = 0.0
    lp_n: int = 0
    logits: Optional[torch.Tensor] = None
    ls: tuple = ()

    def next_kind(self):
        "('forced', id) / ('sample', None) / ('end', None) for the next token."
        p, k = self.plan, len(self.toks)
        if k < len(p.head): return 'forced', p.head[k]
        if self.eos: return 'end', None
        if self.n_sampled < p.n_sample: return 'sample', None
        if p.close_after and p.thought and self.inside: return 'forced', 'close'
        return 'end', None

# %%
#| export
@torch.inference_mode()
def _sample(self:Engine, x:torch.Tensor, rows:list[_Row]) -> list[int]:
    "Sample one token per row of suppressed float logits `x` with each row's temperature / top-k / top-p and generator."
    temps = torch.tensor([r.temperature for r in rows], dtype=x.dtype).unsqueeze(1)
    x = x / temps
    ks = [r.state.top_k for r in rows]
    if any(ks):
        for i, k in enumerate(ks):
            if 0 < k < x.shape[1]: x[i][x[i] < x[i].topk(k).values[-1]] = -float('inf')
    p = torch.softmax(x, -1)
    ps, idx = p.sort(-1, descending=True)
    cum = ps.cumsum(-1)
    top_p = torch.tensor([r.state.top_p for r in rows], dtype=x.dtype).unsqueeze(1)
    ps = ps * ((cum - ps) < top_p)  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
    cum = ps.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=r.state.gen) for r in rows]).to(x.dtype) * cum[:, -1]
    j = torch.searchsorted(cum, u.unsqueeze(1)).clamp_max(x.shape[1] - 1)
    return idx.gather(1, j).squeeze(1).tolist()
Engine._sample = _sample

# %%
#| export
@torch.inference_mode()
def _run(self:Engine, rows:list[_Row]) -> None:
    "Decode the plans of `rows` together: assemble the batched buffer once, one forward per token, cut out new segments."
    B = len(rows)
    P = max(r.prefix.end for r in rows)
    S = max(r.plan.max_tokens for r in rows)
    buf = torch.empty(self.n_layers, 2, B, self.n_kv, P + S, self.head_dim, dtype=self.dtype, device=self.device)
    mask = torch.zeros(B, 1, 1, P + S, dtype=self.dtype, device=self.device)
    for b, r in enumerate(rows):
        off = P - r.prefix.end
        if off: buf[:, :, b, :, :off].zero_(); mask[b, :, :, :off] = self.neg
        for seg in r.prefix.chain(): buf[:, :, b, :, off + seg.start:off + seg.end] = seg.kv
        self.counters['prefix_copied'] += r.prefix.end
        r.inside, r.hsum = r.plan.base.in_thought, torch.zeros(self.hidden_size)
        r.hvis = torch.zeros(self.hidden_size)
    pos = torch.tensor([[r.prefix.end] for r in rows], device=self.device)
    cache = _BufferCache(buf, P)
    x, lp, _ = self._next_stats(torch.stack([r.prefix.logits for r in rows]))
    ids = {'open': self.open_id, 'close': self.close_id}
    for j in range(S):
        kinds = [r.next_kind() for r in rows]
        for r, (k, _) in zip(rows, kinds):
            if k == 'end': r.finished = True
        if all(r.finished for r in rows): break
        toks = [self.pad_id] * B
        greedy = [b for b, (k, _) in enumerate(kinds) if k == 'sample' and rows[b].temperature == 0]
        if greedy:
            am = x[greedy].argmax(-1).tolist()
            for b, t in zip(greedy, am): toks[b] = t
        samp = [b for b, (k, _) in enumerate(kinds) if k == 'sample' and rows[b].temperature > 0]
        if samp:
            for b, t in zip(samp, self._sample(x[samp].clone(), [rows[b] for b in samp])): toks[b] = t
        for b, (k, what) in enumerate(kinds):
            r = rows[b]
            if k == 'forced':
                toks[b] = ids[what]; r.inside = what == 'open'
            elif k == 'sample':
                t = toks[b]; r.n_sampled += 1
                if not r.inside: r.lp_sum += float(lp[b, t]); r.lp_n += 1
                if t in self.eos_ids:
                    r.eos = True
                    if r.inside: toks[b] = self.close_id; r.inside = False
            if k != 'end': r.toks.append(toks[b])
        active = [not r.finished for r in rows]
        cache.pos = P + j
        h = self.model.model(input_ids=torch.tensor(toks, device=self.device)[:, None], attention_mask=mask[..., :P + j + 1],
                             position_ids=pos + j, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        logits = self.model.lm_head(h)
        x, lp, st = self._next_stats(logits)
        hf = h.float()
        n_act = sum(active)
        self.counters['forwarded'] += n_act; self.counters['padded'] += B - n_act; self.counters['forward_calls'] += 1
        ent, ve, gp = st['entropy'].tolist(), st['varentropy'].tolist(), st['logit_gap'].tolist()
        for b, r in enumerate(rows):
            if not active[b]: continue
            t = r.toks[-1]
            r.ent.append(ent[b]); r.hsum += hf[b]
            if not r.inside and t not in self.eos_ids and t not in (self.open_id, self.close_id):
                r.hvis += hf[b]; r.n_vis += 1
            r.logits, r.ls = logits[b], (ent[b], ve[b], gp[b])
    for b, r in enumerate(rows):
        n, pre = len(r.toks), r.prefix
        kind = {Action.THINK_BEGIN: 'open', Action.THINK_END: 'close'}.get(r.plan.action, 'chunk')
        ms = apply_plan(r.plan, r.n_sampled, r.eos)
        r.seg = Segment(pre, tuple(r.toks), buf[:, :, b, :, P:P + n].clone(), kind, r.logits.clone(), r.ls,
                        pre.stats.extend(r.ent), pre.hsum + r.hsum, pre.hsum_vis + r.hvis, pre.n_vis + r.n_vis,
                        pre.lp_sum + r.lp_sum, pre.lp_n + r.lp_n, ms)
    self.counters['chunks'] += 1
Engine._run = _run

# %% [markdown]
# `step_batch` validates every action first (an illegal one raises `MacroActionError` before any work), then
# runs the forwarding actions in groups of at most `engine.batch_size` states (grouped by length so short
# actions such as `THINK_BEGIN` do not wait on long chunks), and updates the states in place. `step` is the
# one-state case, `expand` the MCTS form (forks, then one batched step), and `fork` the O(1) copy.

# %%
#| export
def step_batch(self:Engine, states:Sequence[GenState], actions:Sequence) -> Sequence[GenState]:
    "Apply one action per state (in place), decoding all of them together; returns `states`."
    if len(states) != len(actions): raise ValueError(f"{len(states)} states but {len(actions)} actions")
    if len({id(s) for s in states}) != len(states): raise ValueError("the same GenState appears twice; fork() it first")
    mc = self.cfg.macro
    plans = [plan_action(s.ms, a, mc) for s, a in zip(states, actions)]
    rows = []
    for s, p in zip(states, plans):
        if p.action == Action.STOP: continue
        temp = mc.resample_temperature if p.mode == 'resample' else s.temperature
        rows.append(_Row(p, s.tip.parent if p.drop_last else s.tip, s, temp))
    rows.sort(key=lambda r: (r.plan.max_tokens, r.prefix.end))
    for i in range(0, len(rows), self.cfg.engine.batch_size): self._run(rows[i:i + self.cfg.engine.batch_size])
    new = {id(r.state): r.seg for r in rows}
    for s, p in zip(states, plans):
        pre_tip, pre_ms = s.tip, s.ms
        if p.action == Action.STOP: s.ms = apply_plan(p)
        else: s.tip = new[id(s)]; s.ms = s.tip.ms
        s.last = _Decision(s.last, s.last.step + 1 if s.last else 0, p.action, pre_tip, pre_ms, s.tip, s.ms)
        if s.ms.done and s.t_done is None: s.t_done = time.perf_counter()
        if log.isEnabledFor(logging.DEBUG): log.debug("%s", self._describe(s.last))
    return states

def step(self:Engine, s:GenState, action) -> GenState:
    "Apply `action` to `s` in place (raises `MacroActionError` if illegal); returns `s`."
    return self.step_batch([s], [action])[0]

def fork(self:Engine, s:GenState, seed:Optional[int]=None) -> GenState:
    "An independent copy of `s` sharing its KV segments (O(1)); same RNG state, or re-seeded with `seed`."
    c = GenState()
    for k in GenState.__slots__: setattr(c, k, getattr(s, k))
    if seed is None: c.gen = torch.Generator(); c.gen.set_state(s.gen.get_state())
    else: c.seed, c.gen = int(seed), torch.Generator().manual_seed(int(seed))
    return c

def expand(self:Engine, parents:Sequence[GenState], actions:Sequence) -> list[GenState]:
    "New child states, one per (parent, action), parents untouched; one batched decode for all (the MCTS `env.expand`)."
    kids = [self.fork(p) for p in parents]
    return list(self.step_batch(kids, actions))
Engine.step_batch, Engine.step, Engine.fork, Engine.expand = step_batch, step, fork, expand

# %%
#| export
def _chunk_text(self:Engine, d:_Decision, include_thoughts:bool=False) -> str:
    "Text a decision added; thought content and thought tokens are redacted unless `include_thoughts`."
    if d.post_tip is d.pre_tip: return ''
    ids = list(d.post_tip.ids)
    secret = d.action in (Action.THINK_BEGIN, Action.THINK_END) or (d.post_tip.kind == 'chunk' and d.post_tip.parent.ms.in_thought)
    if secret and not include_thoughts: return '[thought redacted]'
    return self.tok.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=not include_thoughts)
Engine._chunk_text = _chunk_text

def _describe(self:Engine, d:_Decision) -> str:
    "One log line for a decision: never thought text or thought tokens."
    return (f"step {d.step} {d.action.name} tokens={d.post_ms.spent}/{d.post_ms.budget} (+{d.post_ms.spent - d.pre_ms.spent})"
            f"{' done=' + d.post_ms.reason if d.post_ms.done else ''} chunk={self._chunk_text(d)!r}")
Engine._describe = _describe

# %% [markdown]
# A walk through every action on the tiny model (chunk size 4):

# %%
s = eng.new_state("What is the capital of France?", max_new_tokens=24, seed=1)
for a in [Action.CONTINUE, Action.THINK_BEGIN, Action.CONTINUE, Action.THINK_END, Action.CONTINUE, Action.RESAMPLE]:
    eng.step(s, a)
    print(f"{a.name:12} tokens={eng.tokens_spent(s):2} in_thought={s.ms.in_thought!s:5} seq={s.tip.end - s.root.end:2} mask={eng.legal_mask(s).astype(int)}")
test_eq(eng.tokens_spent(s), 4 + 1 + 4 + 1 + 4 + 4)
test_eq(s.tip.end - s.root.end, 4 + 1 + 4 + 1 + 4)  # the resampled chunk replaced the old one
test_fail(lambda: eng.step(s, Action.THINK_END), contains='THINK_END is illegal: no thought is open')
s

# %% [markdown]
# `RESAMPLE` reuses the prefix: the new chunk's parent is the old chunk's parent (same object, no
# recomputation), and the K/V of the kept prefix is identical.

# %%
s = eng.new_state("Name a colour.", max_new_tokens=16, seed=3)
eng.step(s, Action.CONTINUE); old = s.tip
eng.step(s, Action.RESAMPLE)
test_eq(s.tip.parent is old.parent, True)
test_eq(s.tip is old, False)
test_eq(s.ms.resamples, 1)

# %% [markdown]
# ### Thoughts
# Thought tokens condition the SLM but never reach the visible text; the engine closes a thought at
# `macro.max_thought_tokens` and keeps the last token of budget for the close token. `visible_ids` strips them.

# %%
c2 = load_config(overrides=['macro.chunk_tokens=4', 'macro.max_thought_tokens=6'])
e2 = Engine(tm, tt, c2)
s = e2.new_state("Why is the sky blue?", max_new_tokens=20)
e2.step(s, Action.THINK_BEGIN); e2.step(s, Action.CONTINUE); e2.step(s, Action.CONTINUE)  # 4 + 2 then auto-close
test_eq((s.ms.in_thought, s.tip.ids[-1] == tt.thought_close_id), (False, True))
gen = s.tip.gen_ids()
test_eq((gen[0], gen.count(tt.thought_open_id), gen.count(tt.thought_close_id)), (tt.thought_open_id, 1, 1))
test_eq(e2.visible_ids(s.tip), [])
e2.step(s, Action.CONTINUE)
test_eq(len(e2.visible_ids(s.tip)), 4)

# %% [markdown]
# An empty thought (open, then close at once) is legal; the features see `in_thought = 1` right after the
# open token and drift stays 0 because no visible text exists yet.

# %%
s = eng.new_state("Why is the sky blue?", max_new_tokens=20)
eng.step(s, Action.THINK_BEGIN)
f = eng.features(s)
test_eq((f[5], f[3]), (1.0, 0.0))
eng.step(s, Action.THINK_END)
test_eq((eng.features(s)[5], eng.visible_ids(s.tip)), (0.0, []))

# %% [markdown]
# ### Forks are independent
# A fork shares the parent's segments; stepping either never changes the other.

# %%
s = eng.new_state("Count to ten.", max_new_tokens=24, seed=5)
eng.step(s, Action.CONTINUE)
k = eng.fork(s)
test_eq(k.tip is s.tip, True)
eng.step(k, Action.CONTINUE); eng.step(k, Action.THINK_BEGIN)
test_eq((eng.tokens_spent(s), eng.tokens_spent(k)), (4, 9))
test_eq(s.tip.end - s.root.end, 4)
eng.step(s, Action.STOP)
test_eq((eng.is_done(s), eng.is_done(k)), (True, False))

# %% [markdown]
# ### Batched stepping equals sequential stepping
# Eight states with mixed actions in one batched call give the same tokens as stepping each alone (the
# tiny model is fp32, so padding and batching change nothing at this precision).

# %%
prompts = ["Hi", "What is 2+2?", "Name three rivers in Europe.", "Tell me a joke.", "Why?", "Translate 'cat' to French.", "Describe a tree.", "OK"]
acts = [Action.CONTINUE, Action.THINK_BEGIN, Action.CONTINUE, Action.CONTINUE, Action.STOP, Action.CONTINUE, Action.THINK_BEGIN, Action.CONTINUE]
def prep():
    st = eng.new_states(prompts, 24, seed=list(range(8)), temperature=0.8)
    for x in st[:4]: eng.step(x, Action.CONTINUE)  # different prefix lengths
    return st
A, Bs = prep(), prep()
eng.step_batch(A, acts)
for x, a in zip(Bs, acts): eng.step(x, a)
test_eq([x.tip.gen_ids() for x in A], [x.tip.gen_ids() for x in Bs])
FA, FB = np.stack([eng.features(x) for x in A]), eng.features_batch(Bs)
keep = [i for i in range(eng.feature_dim) if i != 2]
test_close(FA[:, keep], FB[:, keep], eps=1e-3)
test_close(FA[:, 2], FB[:, 2], eps=0.05)  # the z-score amplifies float noise: this random model's entropies are all ~log V
[len(x.tip.gen_ids()) for x in A]

# %% [markdown]
# ## Results
# `result` turns a state into the `GenerationResult` every controller returns. The visible `text` has the
# thought spans, the thought tokens and the end-of-sequence token removed. The `macro_trace` has one
# JSON-ready dict per decision: its step, action, the tokens it added, tokens spent so far, the chunk text
# (`[thought redacted]` for thought content unless `include_thoughts`), and the named features of the state
# the decision was taken in (what the controller saw). `tokens` is every token spent, resampled-away chunks
# and thoughts included; `thought_text` (the thought spans, one per line) is only filled when asked.

# %%
#| export
def decisions(self:Engine, s:GenState) -> list[_Decision]:
    "The decisions of `s`, first to last."
    out, d = [], s.last
    while d is not None: out.append(d); d = d.parent
    return out[::-1]

def thought_spans(self:Engine, tip:Segment) -> list[list[int]]:
    "Token ids inside each thought span of the kept sequence (thought tokens excluded; an unclosed span included)."
    spans, cur = [], None
    for t in tip.gen_ids():
        if t == self.open_id: cur = []
        elif t == self.close_id:
            if cur is not None: spans.append(cur)
            cur = None
        elif cur is not None: cur.append(t)
    if cur is not None: spans.append(cur)
    return spans

def trace(self:Engine, s:GenState, include_thoughts:bool=False, # show thought chunks instead of redacting them
          notes:Optional[dict]=None, # {step: {key: value}} extra fields a controller attaches (e.g. why it acted)
         ) -> list[dict]:
    "One JSON-serialisable dict per decision of `s`: step, action, tokens added, spent so far, chunk text and features."
    ds = self.decisions(s)
    feats = self._vectors([(d.pre_tip, d.pre_ms, s.root, s.prompt) for d in ds])
    out = []
    for d, f in zip(ds, feats):
        e = dict(step=d.step, action=d.action.name, tokens=d.post_ms.spent - d.pre_ms.spent, spent=d.post_ms.spent,
                 kept=d.post_ms.kept, chunk=self._chunk_text(d, include_thoughts), features=feature_summary(f))
        if d.post_ms.done: e['done'] = d.post_ms.reason
        if notes and d.step in notes: e.update(notes[d.step])
        out.append(e)
    return out
Engine.decisions, Engine.thought_spans, Engine.trace = decisions, thought_spans, trace

# %%
#| export
def result(self:Engine, s:GenState, include_thoughts:bool=False, # also return the thought text and unredacted thought chunks
           notes:Optional[dict]=None, # {step: {key: value}} extra trace fields from the controller
          ) -> GenerationResult:
    "The `GenerationResult` of `s`: visible text, macro trace, tokens spent, latency since the prefill, metadata."
    tip, ms = s.tip, s.ms
    text = self.tok.decode(self.visible_ids(tip), skip_special_tokens=True)
    thought = ('\n'.join(self.tok.decode(x, skip_special_tokens=True) for x in self.thought_spans(tip))
               if include_thoughts else None)
    tr = self.trace(s, include_thoughts, notes)
    meta = dict(slm_fingerprint=self.fingerprint, config_hash=self.config_hash, seed=s.seed,
                stop=ms.reason if ms.done else None, unclosed_thought=bool(ms.in_thought),
                resamples=sum(e['action'] == 'RESAMPLE' for e in tr), thoughts=ms.n_thoughts, kept_tokens=ms.kept,
                budget=ms.budget, prompt_tokens=s.root.end, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    latency = ((s.t_done if s.t_done is not None else time.perf_counter()) - s.t0) * 1000
    return GenerationResult(text, tr, ms.spent, round(latency, 3), thought, meta)
Engine.result = result

# %% [markdown]
# On the walk through every action above (tiny model): the thought steps are redacted, the text holds
# only the visible tokens, and the whole result survives a JSON round trip.

# %%
s = eng.new_state("What is the capital of France?", max_new_tokens=24, seed=1)
for a in [Action.CONTINUE, Action.THINK_BEGIN, Action.CONTINUE, Action.THINK_END, Action.CONTINUE, Action.RESAMPLE, Action.STOP]:
    eng.step(s, a)
r = eng.result(s)
test_eq([e['action'] for e in r.macro_trace], ['CONTINUE', 'THINK_BEGIN', 'CONTINUE', 'THINK_END', 'CONTINUE', 'RESAMPLE', 'STOP'])
test_eq([e['tokens'] for e in r.macro_trace], [4, 1, 4, 1, 4, 4, 0])
test_eq([e['chunk'] for e in r.macro_trace][1:4], ['[thought redacted]'] * 3)
test_eq((r.tokens, r.thought_text, r.meta['stop'], r.meta['resamples'], r.meta['thoughts']), (18, None, 'stop', 1, 1))
test_eq(r.text, tt.decode(eng.visible_ids(s.tip), skip_special_tokens=True))
test_eq(json.loads(json.dumps(r.to_dict())), r.to_dict())
test_eq(list(r.macro_trace[0]['features']), list(FEATURE_SCALARS) + ['hidden_norm'])
ri = eng.result(s, include_thoughts=True)
test_eq(ri.thought_text, tt.decode(eng.thought_spans(s.tip)[0], skip_special_tokens=True))
test_eq(ri.macro_trace[2]['chunk'] != '[thought redacted]', True)
test_eq(ri.text, r.text)
{k: v for k, v in r.macro_trace[5].items()}

# %% [markdown]
# ## Controllers
# Every controller has `.name`, `.version` (`None` for the training-free ones) and
# `.generate(engine, prompt, max_new_tokens, seed=0, include_thoughts=False, item=None) -> GenerationResult`.
# `max_new_tokens` is the **total** budget: every token forwarded counts, including resampled-away chunks,
# thoughts and every best-of-N candidate. The single-trajectory controllers share one loop: prefill,
# then ask `decide(engine, state) -> (action, why)` until the engine says the episode is over (STOP, EOS
# or budget); `why` goes into the trace. `latency_ms` is the controller's wall time, prefill included.

# %%
#| export
def _budget(engine:Engine, max_new_tokens) -> int:
    "The total token budget: `max_new_tokens`, or `macro.max_new_tokens` when None."
    b = engine.cfg.macro.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int (the total token budget, thoughts and resamples included).")
    return int(b)

class Controller:
    "A training-free controller: `decide` picks one macro-action per decision point, `generate` runs the episode."
    name, version = 'controller', None
    def __init__(self, cfg:Config|None=None): self.cfg = cfg or load_config()
    def __repr__(self): return f"{type(self).__name__}(name={self.name!r})"
    def sampling(self) -> dict:
        "Sampling settings of CONTINUE for `new_state` (empty = the engine's `macro` section)."
        return {}
    def decide(self, engine:Engine, s:GenState) -> tuple:
        "(action, why or None) for state `s`."
        raise NotImplementedError(f"{type(self).__name__} must implement decide(engine, state)")

    def generate(self, engine:Engine, prompt:str, max_new_tokens:Optional[int]=None, seed:int=0,
                 include_thoughts:bool=False, item:Optional[dict]=None) -> GenerationResult:
        "Generate an answer to `prompt` spending at most `max_new_tokens` tokens in total."
        t0 = time.perf_counter()
        s = engine.new_state(prompt, _budget(engine, max_new_tokens), seed=seed, **self.sampling())
        notes = {}
        while not engine.is_done(s):
            a, why = self.decide(engine, s)
            engine.step(s, a)
            if why: notes[s.last.step] = {'why': why}
        r = engine.result(s, include_thoughts, notes)
        r.latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        r.meta['controller'] = self.name
        return r

class GreedyBaseline(Controller):
    "CONTINUE greedily until end-of-sequence or the budget: plain decoding."
    name = 'greedy'
    def sampling(self): return dict(temperature=0.0)
    def decide(self, engine, s): return Action.CONTINUE, None

class SamplingBaseline(Controller):
    "CONTINUE with temperature / nucleus sampling (`baselines.sampling_temperature`, `baselines.sampling_top_p`)."
    name = 'sampling'
    def sampling(self):
        b = self.cfg.baselines
        return dict(temperature=b.sampling_temperature, top_p=b.sampling_top_p, top_k=0)
    def decide(self, engine, s): return Action.CONTINUE, None

# %%
g = GreedyBaseline(cfg).generate(eng, "Name a colour.", 10)
test_eq((g.tokens <= 10, g.meta['controller'], g.meta['temperature'], {e['action'] for e in g.macro_trace}),
        (True, 'greedy', 0.0, {'CONTINUE'}))
test_fail(lambda: GreedyBaseline(cfg).generate(eng, "Name a colour.", 0), contains='max_new_tokens=0 must be a positive int')
g.text, g.tokens, g.meta['stop']

# %% [markdown]
# ### Best-of-N
# N sampled candidates, each with `budget // N` tokens (so the total never exceeds the budget), decoded
# together in batched steps from one shared prefill (forks re-seeded per candidate). The default scorer
# is the mean log-probability of each candidate's visible tokens (cached on the segments as
# `lp_sum / lp_n`, so scoring is free); `scorer(text, item) -> float` plugs in anything else, and
# `baselines.best_of_n_scorer = reward` uses the full reward (`08_rewards.RewardCalculator`). The trace
# holds every candidate's decisions (field `candidate`), `tokens` the sum over all of them.

# %%
#| export
def _mean_logprob(tip:Segment) -> float: return tip.lp_sum / tip.lp_n if tip.lp_n else -math.inf

class BestOfN(Controller):
    "Sample N candidates at equal shares of the budget and return the best-scoring one."
    name = 'best_of_n'
    def __init__(self, cfg:Config|None=None, scorer:Optional[Callable]=None, # (text, item) -> float; None = `baselines.best_of_n_scorer`
                 n:Optional[int]=None): # candidates; None = `baselines.best_of_n`
        super().__init__(cfg)
        self.n = self.cfg.baselines.best_of_n if n is None else int(n)
        if self.n < 1: raise ValueError(f"best-of-N needs n >= 1 (got {self.n}); set baselines.best_of_n.")
        self.scorer, self._reward = scorer, None

    def _scores(self, engine, cands, texts, item) -> list[float]:
        if self.scorer is not None: return [float(self.scorer(t, item)) for t in texts]
        if self.cfg.baselines.best_of_n_scorer == 'reward':
            if self._reward is None:
                from research_controller.rewards import RewardCalculator
                self._reward = RewardCalculator(self.cfg, engine.model, engine.tok)
            return [float(self._reward(t, item, n_tokens=engine.tokens_spent(c), unclosed_thought=c.ms.in_thought).total)
                    for t, c in zip(texts, cands)]
        return [_mean_logprob(c.tip) for c in cands]

    def generate(self, engine:Engine, prompt:str, max_new_tokens:Optional[int]=None, seed:int=0,
                 include_thoughts:bool=False, item:Optional[dict]=None) -> GenerationResult:
        "Generate N candidates with `max_new_tokens // N` tokens each; return the best with every candidate's cost."
        t0 = time.perf_counter()
        budget = _budget(engine, max_new_tokens)
        n = min(self.n, budget)
        per = budget // n
        b = self.cfg.baselines
        root = engine.new_state(prompt, per, seed=seed, temperature=b.sampling_temperature, top_p=b.sampling_top_p, top_k=0)
        seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(n)]
        cands = [engine.fork(root, seed=sd) for sd in seeds]
        while True:
            live = [c for c in cands if not engine.is_done(c)]
            if not live: break
            engine.step_batch(live, [Action.CONTINUE] * len(live))
        texts = [engine.tok.decode(engine.visible_ids(c.tip), skip_special_tokens=True) for c in cands]
        scores = self._scores(engine, cands, texts, item)
        best = int(np.argmax(scores))
        r = engine.result(cands[best], include_thoughts)
        r.macro_trace = [dict(e, candidate=i) for i, c in enumerate(cands)
                         for e in (r.macro_trace if i == best else engine.trace(c, include_thoughts))]
        r.tokens = sum(engine.tokens_spent(c) for c in cands)
        r.latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        r.meta.update(controller=self.name, budget=budget, per_candidate_budget=per, chosen=best,
                      scorer=getattr(self.scorer, '__name__', 'callback') if self.scorer else b.best_of_n_scorer,
                      candidates=[dict(seed=sd, tokens=engine.tokens_spent(c), score=round(float(sc), 6), stop=c.ms.reason)
                                  for sd, c, sc in zip(seeds, cands, scores)])
        return r

# %% [markdown]
# Equal budget: 4 candidates of 25 // 4 = 6 tokens spend at most 24 of 25. With a scorer that prefers
# the longest text, the chosen candidate is the longest one.

# %%
bo = BestOfN(cfg, n=4).generate(eng, "Tell me a joke.", 25, seed=2)
test_eq((bo.meta['per_candidate_budget'], len(bo.meta['candidates'])), (6, 4))
test_eq(bo.tokens, sum(c['tokens'] for c in bo.meta['candidates']))
test_eq(bo.tokens <= 25 and all(c['tokens'] <= 6 for c in bo.meta['candidates']), True)
test_eq(bo.meta['chosen'], int(np.argmax([c['score'] for c in bo.meta['candidates']])))
bl = BestOfN(cfg, scorer=lambda text, item: len(text), n=4).generate(eng, "Tell me a joke.", 25, seed=2)
test_eq(len(bl.text), max(c['score'] for c in bl.meta['candidates']))
test_eq(BestOfN(cfg, n=8).generate(eng, "Hi", 3).meta['per_candidate_budget'], 1)  # more candidates than tokens: 3 of 1
[(c['score'], c['tokens']) for c in bo.meta['candidates']]

# %% [markdown]
# ### The threshold controller
# The strongest training-free competitor: entropix-style hand rules on `engine.signals` at each decision.
#
# 1. **Inside a thought**, keep thinking until the thought has `thought_tokens` tokens, or until the model
#    has settled (at least one chunk thought and next-token entropy below `settle_entropy`); then close it.
# 2. **Resample** the last visible chunk when its mean token entropy is significantly above everything
#    before it: z-score of the chunk mean (standard error of a mean) > `baselines.threshold_resample_zscore`,
#    when legal and when a chunk of budget is left after it.
# 3. **Open a thought** when the model is uncertain *among many options*: next-token entropy >
#    `baselines.threshold_think_entropy` and varentropy > `baselines.threshold_varentropy`, at most
#    `baselines.threshold_max_thoughts` per episode, never right after a thought, and only with room left for
#    the thought and a chunk of answer.
# 4. Otherwise **continue**; the engine ends the episode on EOS or when the budget is spent.
#
# Neither a thought nor a resampled chunk comes before `baselines.threshold_min_visible_tokens` visible answer
# tokens: the first token of an answer always has a high entropy (so an unguarded rule 3 thinks before saying
# anything, and this SLM, never trained on thoughts, then goes on with the thought's sentence), and the chunk
# z-score of rule 2 means little with one chunk of history.

# %%
#| export
class ThresholdController(Controller):
    "Hand rules on entropy, varentropy and the chunk entropy z-score: think when unsure, resample surprising chunks."
    name = 'threshold'
    def __init__(self, cfg:Config|None=None, thought_tokens:Optional[int]=None, # longest thought; None = min(macro.max_thought_tokens, 2 chunks)
                 max_thoughts:Optional[int]=None, # thoughts per episode; None = `baselines.threshold_max_thoughts`
                 settle_entropy:Optional[float]=None, # close a thought early below this entropy; None = half the think threshold
                 min_visible:Optional[int]=None): # visible tokens before a thought or resampled chunk; None = `baselines.threshold_min_visible_tokens`
        super().__init__(cfg)
        mc, b = self.cfg.macro, self.cfg.baselines
        self.thought_tokens = min(mc.max_thought_tokens, 2 * mc.chunk_tokens) if thought_tokens is None else int(thought_tokens)
        self.max_thoughts = b.threshold_max_thoughts if max_thoughts is None else int(max_thoughts)
        self.settle_entropy = b.threshold_think_entropy / 2 if settle_entropy is None else float(settle_entropy)
        self.min_visible = b.threshold_min_visible_tokens if min_visible is None else int(min_visible)

    def decide(self, engine:Engine, s:GenState) -> tuple:
        "(action, why) from the signals of `s`."
        g, m, mc, b = engine.signals(s), engine.legal_mask(s), engine.cfg.macro, self.cfg.baselines
        if g['in_thought']:
            if not m[Action.CONTINUE]: return Action.THINK_END, "no budget left inside the thought"
            if g['thought_len'] >= self.thought_tokens: return Action.THINK_END, f"thought reached {g['thought_len']} tokens"
            if g['thought_len'] >= mc.chunk_tokens and g['entropy'] < self.settle_entropy:
                return Action.THINK_END, f"settled: entropy {g['entropy']:.2f} < {self.settle_entropy:.2f}"
            return Action.CONTINUE, None
        z = g['chunk_entropy_z']
        if (m[Action.RESAMPLE] and not g['chunk_hidden'] and z > b.threshold_resample_zscore and g['left'] > mc.chunk_tokens
                and s.tip.parent.n_vis >= self.min_visible):  # n_vis: visible tokens up to a segment, kept by the engine
            return Action.RESAMPLE, f"chunk entropy z {z:.2f} > {b.threshold_resample_zscore:.2f}"
        if (m[Action.THINK_BEGIN] and g['n_thoughts'] < self.max_thoughts and g['last'] in ('prompt', 'chunk') and not g['chunk_hidden']
                and g['entropy'] > b.threshold_think_entropy and g['varentropy'] > b.threshold_varentropy
                and g['left'] >= self.thought_tokens + 2 + mc.chunk_tokens and s.tip.n_vis >= self.min_visible):
            return Action.THINK_BEGIN, f"entropy {g['entropy']:.2f} > {b.threshold_think_entropy:.2f}, varentropy {g['varentropy']:.2f} > {b.threshold_varentropy:.2f}"
        return Action.CONTINUE, None

# %% [markdown]
# On the tiny random model every next-token distribution is near uniform (entropy ~ log V), so with the
# varentropy threshold at 0 and no visible tokens required first, the controller thinks as soon as it may;
# the trace says why.

# %%
ct = load_config(overrides=['macro.chunk_tokens=4', 'baselines.threshold_varentropy=0', 'features.drift_embedder=slm',
                            'baselines.threshold_min_visible_tokens=0'])
th = ThresholdController(ct)
rt = th.generate(eng, "Why is the sky blue?", 30, seed=0)
test_eq(rt.meta['thoughts'] >= 1 and rt.tokens <= 30, True)
test_eq(rt.macro_trace[0]['action'], 'THINK_BEGIN')
test_eq('varentropy' in rt.macro_trace[0]['why'], True)
[(e['action'], e['tokens'], e.get('why')) for e in rt.macro_trace]

# %% [markdown]
# `min_visible` (`baselines.threshold_min_visible_tokens`) holds thoughts and resamples back: with every threshold
# at 0 the controller would think or resample at once, but with 8 it first writes two visible chunks (of 4), and
# every thought and every resampled chunk comes after at least 8 visible tokens.

# %%
def acts_after_visible(ctl, prompt, budget, seed=0):
    "(action, visible tokens before it) for each THINK_BEGIN / RESAMPLE the controller takes (visible before the replaced chunk for RESAMPLE)."
    s, out = eng.new_state(prompt, budget, seed=seed, **ctl.sampling()), []
    while not eng.is_done(s):
        a, _ = ctl.decide(eng, s)
        test_eq(s.tip.n_vis, len(eng.visible_ids(s.tip)))  # the count the controller reads is the visible text's length
        if a in (Action.THINK_BEGIN, Action.RESAMPLE):
            out.append((a.name, len(eng.visible_ids(s.tip if a == Action.THINK_BEGIN else s.tip.parent))))
        eng.step(s, a)
    return out

c0 = load_config(overrides=['macro.chunk_tokens=4', 'features.drift_embedder=slm', 'baselines.threshold_varentropy=0',
                            'baselines.threshold_think_entropy=0', 'baselines.threshold_resample_zscore=0'])
free, held = ThresholdController(c0, min_visible=0), ThresholdController(c0, min_visible=8)
a0, a8 = acts_after_visible(free, "Why is the sky blue?", 40), acts_after_visible(held, "Why is the sky blue?", 40)
test_eq(a0[0], ('THINK_BEGIN', 0))
test_eq(len(a8) > 0 and all(n >= 8 for _, n in a8), True)
test_eq([e['action'] for e in held.generate(eng, "Why is the sky blue?", 40).macro_trace][:2], ['CONTINUE', 'CONTINUE'])
a0, a8

# %% [markdown]
# ## Factories
# `BASELINES` maps the names `rc generate --controller` and the evaluation accept to the classes;
# `make_controller(name, cfg, **kw)` builds one, `get_engine(cfg)` returns a cached `Engine` over
# `load_slm(cfg)` (one per distinct configuration, the model itself is cached by `load_slm`), and
# `generate_text` is the one-call entry point `rc generate` uses.

# %%
#| export
BASELINES = {'greedy': GreedyBaseline, 'sampling': SamplingBaseline, 'best_of_n': BestOfN, 'threshold': ThresholdController}

def make_controller(name:str, cfg:Config|None=None, **kw) -> Controller:
    "The training-free controller called `name` (a key of `BASELINES`), built with `cfg` and keyword options."
    if name not in BASELINES:
        raise ValueError(f"unknown controller {name!r}; training-free controllers are {sorted(BASELINES)} "
                         f"(trained versions are resolved by promotion.resolve_controller).")
    return BASELINES[name](cfg, **kw)

_ENGINES: dict = {}

def get_engine(cfg:Config|None=None) -> Engine:
    "A cached `Engine` over `load_slm(cfg)`, one per configuration hash."
    from research_controller.slm import load_slm
    cfg = cfg or load_config()
    key = config_hash(cfg)
    if key not in _ENGINES:
        model, tok = load_slm(cfg)
        while len(_ENGINES) >= 4: _ENGINES.pop(next(iter(_ENGINES)))
        _ENGINES[key] = Engine(model, tok, cfg)
    return _ENGINES[key]

def generate_text(cfg:Config|None, prompt:str, controller:str='threshold', # a key of `BASELINES`
                  max_new_tokens:Optional[int]=None, # total budget; None = macro.max_new_tokens
                  seed:int=0, include_thoughts:bool=False) -> GenerationResult:
    "Generate `prompt` on the configured SLM with a training-free controller (what `rc generate` calls)."
    cfg = cfg or load_config()
    ctl = make_controller(controller, cfg)
    return ctl.generate(get_engine(cfg), prompt, max_new_tokens, seed=seed, include_thoughts=include_thoughts)

# %%
test_eq(sorted(BASELINES), ['best_of_n', 'greedy', 'sampling', 'threshold'])
test_fail(lambda: make_controller('beam', cfg), contains="unknown controller 'beam'")
test_eq(make_controller('best_of_n', cfg, n=2).n, 2)
make_controller('threshold', cfg)

# %% [markdown]
# ## Checks
# ### Every controller keeps to the total budget
# Over budgets from 1 token up, with thoughts and resamples forced on (thresholds at 0), the tokens a
# controller reports are exactly the tokens the engine forwarded for it, and never more than the budget.
# (These checks use the SLM's pooled states for drift, `features.drift_embedder=slm`, to stay fast.)

# %%
cz = load_config(overrides=['macro.chunk_tokens=4', 'macro.max_thought_tokens=6', 'baselines.threshold_varentropy=0', 'features.drift_embedder=slm',
                            'baselines.threshold_think_entropy=0', 'baselines.threshold_resample_zscore=0',
                            'baselines.threshold_min_visible_tokens=0'])
ez = Engine(tm, tt, cz)
rows = []
for name in BASELINES:
    c = make_controller(name, cz)
    for budget in (1, 5, 30):
        f0 = ez.counters['forwarded']
        r = c.generate(ez, "Count to ten.", budget, seed=budget)
        test_eq(r.tokens <= budget, True)
        test_eq(r.tokens, ez.counters['forwarded'] - f0)
        rows.append((name, budget, r.tokens, r.meta['resamples'], r.meta['thoughts']))
test_eq(any(x[3] for x in rows if x[0] == 'threshold') and any(x[4] for x in rows if x[0] == 'threshold'), True)
rows[-3:]

# %% [markdown]
# ### Reproducibility
# Same seed, configuration and model fingerprint give the identical trace and text; another seed gives a
# different sample.

# %%
def same(a, b): return (a.text, a.macro_trace, a.tokens, a.meta) == (b.text, b.macro_trace, b.tokens, b.meta)
for name in BASELINES:
    c = make_controller(name, cz)
    test_eq(same(c.generate(ez, "Tell me a story.", 20, seed=7), c.generate(ez, "Tell me a story.", 20, seed=7)), True)
sp = SamplingBaseline(cz)
test_eq(sp.generate(ez, "Tell me a story.", 20, seed=7).text != sp.generate(ez, "Tell me a story.", 20, seed=8).text, True)
sp.generate(ez, "Tell me a story.", 20, seed=7).meta

# %% [markdown]
# ### Thoughts stay hidden
# While a controller that thinks runs, the `research_controller.engine` logger is captured at DEBUG: the
# thought text and the thought token strings appear neither in the log nor in the result, unless
# `include_thoughts=True` asks for them (then they come back in `thought_text` and in the trace only).

# %%
buf = io.StringIO()
h = logging.StreamHandler(buf); h.setLevel(logging.DEBUG)
log.addHandler(h); old_level = log.level; log.setLevel(logging.DEBUG)
try: rh = ThresholdController(cz).generate(ez, "Why is the sky blue?", 30, seed=3)
finally: log.removeHandler(h); log.setLevel(old_level)
rs = ThresholdController(cz).generate(ez, "Why is the sky blue?", 30, seed=3, include_thoughts=True)
test_eq((rh.text, rh.tokens), (rs.text, rs.tokens))
secret = rs.thought_text.strip()
test_eq(rh.meta['thoughts'] >= 1 and len(secret) > 0, True)
out = buf.getvalue() + json.dumps(rh.to_dict())
test_eq(len(buf.getvalue().splitlines()) >= len(rh.macro_trace), True)  # the log did record every decision
for piece in [secret, *[ln for ln in secret.split('\n') if len(ln.strip()) > 3], tt.convert_ids_to_tokens(tt.thought_open_id),
              tt.convert_ids_to_tokens(tt.thought_close_id)]:
    test_eq(piece in out, False)
test_eq(('[thought redacted]' in json.dumps(rh.macro_trace), '[thought redacted]' in json.dumps(rs.macro_trace)), (True, False))
buf.getvalue().splitlines()[:3]

# %% [markdown]
# ## On the real SLM
# SmolLM2-135M-Instruct in bf16 (`load_slm(load_config())`). Greedy CONTINUE through the engine gives the
# same tokens as `model.generate` greedy on the same prompt for the first chunks (both bf16; after a few
# dozen tokens bf16 kernels may round differently, see `PERF_NOTES.md`, so only 16 tokens are compared).

# %%
creal = load_config()
model, tok = load_slm(creal)
er = Engine(model, tok, creal)
q = "What is the capital of France?"
ids = torch.tensor([encode_prompt(tok, q, creal)])
with torch.inference_mode():
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
sg = er.new_state(q, 16, temperature=0.0)
while not er.is_done(sg): er.step(sg, Action.CONTINUE)
n = min(len(ref), len(sg.tip.gen_ids()))
test_eq(n >= 8, True)
test_eq(sg.tip.gen_ids()[:n], ref[:n])
gr = GreedyBaseline(creal).generate(er, q, 16)
test_eq(gr.text, tok.decode(ref, skip_special_tokens=True))
gr.text

# %% [markdown]
# The threshold controller on a real question, its trace as a table (what it did, why, and what it saw):

# %%
import pandas as pd
rq = ThresholdController(creal).generate(er, "If a train travels 60 km in 1.5 hours, what is its average speed?", 48, seed=0)
test_eq(rq.tokens <= 48 and rq.meta['slm_fingerprint'] == model_fingerprint(model), True)
test_eq('[thought redacted]' in rq.text, False)
print(rq.text)
pd.DataFrame([dict(step=e['step'], action=e['action'], tokens=e['tokens'], spent=e['spent'], chunk=e['chunk'],
                   entropy=e['features']['entropy'], entropy_z=e['features']['entropy_z'], why=e.get('why', ''))
              for e in rq.macro_trace])

# %% [markdown]
# With the defaults tuned on a dev set (`benchmarks/threshold_sweep.py`) the controller writes a visible chunk
# before it may think, so on the France question it answers as greedy does instead of thinking at the first token
# (whose entropy is always high) and then going on with the thought's sentence.

# %%
rf = ThresholdController(creal).generate(er, q, 64)
test_eq((rf.macro_trace[0]['action'], 'Paris' in rf.text), ('CONTINUE', True))
rf.text
