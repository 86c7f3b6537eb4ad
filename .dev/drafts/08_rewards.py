# %%
#| default_exp rewards

# %% [markdown]
# # Rewards
# > Task items, and the reward terms every episode is scored with: KenLM fluency, a G-Eval coherence judge, task scores and penalties.

# %%
#| export
from __future__ import annotations
import collections, dataclasses, functools, hashlib, json, math, os, random, re, shutil, sqlite3, string, subprocess, sys
import tarfile, tempfile, time, unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional
import numpy as np
from fastcore.basics import patch
from platformdirs import user_cache_dir
from research_controller.config import (Config, ConfigError, atomic_write_text, data_path, load_config, project_root,
                                        replace_config, run_path, sha256_file)

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

# %% [markdown]
# Self-play, training and evaluation score every episode with the terms defined here, so they are built
# (and checked against hacking) before the search that optimises them. The notebook has four parts:
#
# 1. **Task items**: the prompts and references of SQuAD, GSM8K, NQ-Open and WikiText, with a train/eval
#    split that never overlaps.
# 2. **Fluency**: a real KenLM n-gram model built from the project's own training text (`rc build-lm`).
# 3. **Coherence**: a G-Eval style judge (the frozen SLM rates the answer 1-5; the score is the
#    probability-weighted mean rating).
# 4. **Task scores, penalties and `RewardCalculator`**, which combines all terms with configurable weights
#    and returns each of them, followed by the anti-hacking checks on real items.

# %%
cfg = load_config()

# %% [markdown]
# ## 1. Task items
# Every task item is a plain dict `{"id", "task", "prompt", "references", "meta"}`; `prompt` is built from the
# `cfg.tasks` templates. Which items are for evaluation is decided by a stable hash, never by file order or
# a random seed, so the split is the same on every machine and in every process:
#
# | task | file(s) in `data/` | unit of the split | eval split |
# | --- | --- | --- | --- |
# | `squad` | `squad_v1.1/dev.jsonl` | article title | hash(title) < `eval_fraction` |
# | `gsm8k` | `gsm8k/train.jsonl`, `gsm8k/test.jsonl` | file | all of `test.jsonl` (the official test set); train = `train.jsonl` |
# | `nq_open` | `nq_open/dev.jsonl` | question | hash(id) < `eval_fraction` |
# | `wikitext` | `wiki.valid.raw` + `wiki.test.raw` | article title | hash(title) < `eval_fraction` |
#
# SQuAD and WikiText are split by article so that no passage of an evaluation article (nor a paraphrase of
# it from the same article) is seen in training, nor in the KenLM corpus. GSM8K ships an official test set,
# which is the natural evaluation split. WikiText pools both shipped files and splits them by article, so the
# KenLM corpus keeps ~80% of their text instead of only one file.

# %%
#| export
TASKS = ('squad', 'gsm8k', 'nq_open', 'wikitext')
SPLITS = ('train', 'eval')

def stable_unit(key:str) -> float:
    "A number in [0, 1) fixed by `key` alone (first 8 bytes of its sha256)."
    return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big') / 2**64

def in_eval(task:str, key:str, frac:float) -> bool:
    "Whether the split unit `key` of `task` belongs to the evaluation split."
    return stable_unit(f"{task}:{key}") < frac

def _short_id(prefix:str, s:str) -> str: return f"{prefix}-{hashlib.sha256(s.encode('utf-8')).hexdigest()[:16]}"

# %%
test_eq(stable_unit('abc'), stable_unit('abc'))
test_eq(0 <= stable_unit('abc') < 1, True)
_us = [stable_unit(str(i)) for i in range(10000)]
test_close(np.mean(np.array(_us) < 0.2), 0.2, eps=0.02)  # the hash split keeps the requested share
stable_unit('abc')

# %% [markdown]
# ### Reading the files
# `_jsonl` reads (and caches) a JSONL file of the data directory; a missing file is an error that says where
# the data should be.

# %%
#| export
@functools.lru_cache(maxsize=16)
def _read_text(path:str) -> str:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file {path} is missing. The project's data/ directory ships it (see data/README.md); "
                                "check paths.data_dir in the config.")
    return p.read_text(encoding='utf-8')

def _jsonl(path:Path) -> list[dict]:
    return [json.loads(l) for l in _read_text(str(path)).splitlines() if l.strip()]

# %% [markdown]
# ### SQuAD
# A SQuAD passage can be long; `cut_context` keeps at most `tasks.max_context_chars` characters, in a window
# around the first reference answer (cut at word boundaries and marked with `...`), so the answer is always
# in the prompt.

# %%
#| export
def cut_context(context:str, answer:str, max_chars:int) -> str:
    "At most `max_chars` characters of `context` around the first occurrence of `answer`, cut at spaces."
    if len(context) <= max_chars: return context
    i = max(context.find(answer), 0)
    mid = i + len(answer) // 2
    lo = max(0, min(mid - max_chars // 2, len(context) - max_chars)); hi = lo + max_chars
    if lo > 0: lo = context.find(' ', lo) + 1 or lo
    if hi < len(context): hi = context.rfind(' ', lo, hi) if context.rfind(' ', lo, hi) > i + len(answer) else hi
    return ('...' if lo > 0 else '') + context[lo:hi].strip() + ('...' if hi < len(context) else '')

# %%
_ctx = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
test_eq(cut_context(_ctx, 'zeta', 100), _ctx)
_cut = cut_context(_ctx, 'kappa', 24)
test_eq('kappa' in _cut and len(_cut) <= 24 + 6, True)
_cut

# %%
#| export
def _squad_items(cfg:Config) -> list[dict]:
    t = cfg.tasks; out = []
    for r in _jsonl(data_path(cfg, 'squad_v1.1', 'dev.jsonl')):
        ctx = cut_context(r['context'], r['answers'][0], t.max_context_chars)
        out.append(dict(id=r['id'], task='squad', prompt=t.squad_template.format(context=ctx, question=r['question'].strip()),
                        references=list(r['answers']), meta=dict(title=r['title'], question=r['question'].strip(), context=ctx),
                        _unit=r['title']))
    return out

# %% [markdown]
# ### GSM8K
# The reference of a GSM8K item is the final number after `####` in the worked solution (thousands
# separators removed); the solution itself stays in `meta`.

# %%
#| export
def gsm8k_reference(solution:str) -> str:
    "The final answer of a GSM8K solution: the number after '####', without thousands separators."
    if '####' not in solution: raise ValueError(f"GSM8K solution has no '####' final answer: {solution[-80:]!r}")
    return solution.rsplit('####', 1)[1].strip().replace(',', '').rstrip('.')

def _gsm8k_items(cfg:Config, split:str) -> list[dict]:
    fn = 'test.jsonl' if split == 'eval' else 'train.jsonl'
    return [dict(id=_short_id('gsm8k', r['question']), task='gsm8k', prompt=cfg.tasks.gsm8k_template.format(question=r['question'].strip()),
                 references=[gsm8k_reference(r['answer'])], meta=dict(question=r['question'].strip(), solution=r['answer'], file=fn),
                 _unit=None)
            for r in _jsonl(data_path(cfg, 'gsm8k', fn))]

# %%
test_eq(gsm8k_reference("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"), '72')
test_eq(gsm8k_reference("... so $1,250 in total.\n#### 1,250"), '1250')
test_fail(lambda: gsm8k_reference("no final answer"), contains="no '####'")

# %% [markdown]
# ### NQ-Open
# Questions are lower-cased without a question mark in the data; the template adds it back. Each question is
# its own split unit, its id a hash of the question.

# %%
#| export
def _nq_items(cfg:Config) -> list[dict]:
    out = []
    for r in _jsonl(data_path(cfg, 'nq_open', 'dev.jsonl')):
        i = _short_id('nq', r['question'])
        out.append(dict(id=i, task='nq_open', prompt=cfg.tasks.nq_open_template.format(question=r['question'].strip()),
                        references=list(r['answer']), meta=dict(question=r['question'].strip()), _unit=i))
    return out

# %% [markdown]
# ### WikiText
# WikiText-2 raw is tokenised text (`game 's`, `1 @,@ 000`, spaces around punctuation). `wikitext_detok`
# undoes that so prompts look like the text a model would see; the KenLM corpus goes through the same function.
# `wikitext_articles` splits a file into `(title, paragraphs)` at the ` = Title = ` lines (sub-headings
# ` = = Section = = ` are dropped).

# %%
#| export
def wikitext_detok(s:str) -> str:
    "Undo WikiText's tokenisation: `@-@` joins, spaces around punctuation and clitics."
    s = s.replace(' @-@ ', '-').replace(' @,@ ', ',').replace(' @.@ ', '.')
    s = re.sub(r' (n\'t|\'s|\'re|\'ve|\'ll|\'d|\'m|\')(?=\W)', r'\1', s + ' ').rstrip(' ')
    s = re.sub(r'" ([^"]*?) "', r'"\1"', s)
    s = re.sub(r' ([.,;:!?%)\]}])', r'\1', s)
    s = re.sub(r'([(\[{$]) ', r'\1', s)
    return re.sub(r'\s+', ' ', s).strip()

def wikitext_articles(text:str) -> list[tuple[str, list[str]]]:
    "Split WikiText raw text into `(title, [paragraph, ...])` articles (detokenised)."
    arts = []
    for line in text.split('\n'):
        s = line.strip()
        if not s: continue
        if re.fullmatch(r'= [^=].*[^=] =', s): arts.append((wikitext_detok(s[2:-2]), [])); continue
        if s.startswith('= ') and s.endswith(' ='): continue  # a section heading
        if arts: arts[-1][1].append(wikitext_detok(s))
    return arts

# %%
test_eq(wikitext_detok("the game 's 1 @,@ 000 copies ( in 2010 ) , a \" hit \" ."), 'the game\'s 1,000 copies (in 2010), a "hit".')
test_eq(wikitext_detok("they do n't know the state @-@ of @-@ the @-@ art"), "they don't know the state-of-the-art")
_arts = wikitext_articles(" \n = Lobster = \n \n A lobster , big .\n = = Biology = = \n It eats .\n = Crab = \n Crabs walk .\n")
test_eq(_arts, [('Lobster', ['A lobster, big.', 'It eats.']), ('Crab', ['Crabs walk.'])])

# %% [markdown]
# A WikiText item is one paragraph long enough to hold a prompt: its first `tasks.wikitext_context_chars`
# characters (cut at a space) are the prompt context, and the rest of the paragraph is the reference
# continuation.

# %%
#| export
def _wikitext_items(cfg:Config) -> list[dict]:
    n = cfg.tasks.wikitext_context_chars; out = []
    for fn in ('wiki.valid.raw', 'wiki.test.raw'):
        for title, paras in wikitext_articles(_read_text(str(data_path(cfg, 'wikitext-2-raw', fn)))):
            for k, p in enumerate(paras):
                if len(p) < n + 100: continue
                cut = p.rfind(' ', 0, n)
                ctx, ref = p[:cut], p[cut + 1:]
                out.append(dict(id=f"wikitext/{title}/{k}", task='wikitext', prompt=cfg.tasks.wikitext_template.format(context=ctx),
                                references=[ref], meta=dict(title=title, file=fn, context=ctx), _unit=title))
    return out

# %% [markdown]
# ### `load_task_items`
# All items of a split come back in file order; `n` draws a seeded sample of that many. The private `_unit`
# (the split unit) is dropped from the public dicts.

# %%
#| export
_ITEMS_CACHE = {}

def _all_items(cfg:Config, task:str, split:str) -> tuple:
    "Every item of `task`/`split`, cached per data directory and `tasks` section."
    key = (str(data_path(cfg)), json.dumps(dataclasses.asdict(cfg.tasks), sort_keys=True), task, split)
    if key not in _ITEMS_CACHE:
        if task == 'gsm8k': rows = _gsm8k_items(cfg, split)
        else:
            want = split == 'eval'
            rows = [r for r in dict(squad=_squad_items, nq_open=_nq_items, wikitext=_wikitext_items)[task](cfg)
                    if in_eval(task, r['_unit'], cfg.tasks.eval_fraction) == want]
        _ITEMS_CACHE[key] = tuple({k: v for k, v in r.items() if k != '_unit'} for r in rows)
    return _ITEMS_CACHE[key]

def load_task_items(cfg:Config, # the config (`tasks` templates, `paths.data_dir`)
                    task:str, # one of TASKS: 'squad', 'gsm8k', 'nq_open', 'wikitext'
                    split:str='train', # 'train' (self-play, KenLM corpus) or 'eval' (held out from both)
                    n:int|None=None, # a seeded sample of this many items; None = all
                    seed:int=0, # sample seed
                   ) -> list[dict]:
    "Task items `{id, task, prompt, references, meta}` of one split, from the project's data/."
    if task not in TASKS: raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}.")
    if split not in SPLITS: raise ValueError(f"unknown split {split!r}; choose 'train' or 'eval'.")
    items = _all_items(cfg, task, split)
    if n is not None:
        if n < 0: raise ValueError(f"n must be >= 0, got {n}.")
        idx = sorted(random.Random(f"{seed}:{task}:{split}").sample(range(len(items)), min(n, len(items))))
        items = [items[i] for i in idx]
    return [json.loads(json.dumps(it)) for it in items]  # deep copies: callers may mutate them

# %%
_sizes = {t: (len(load_task_items(cfg, t, 'train')), len(load_task_items(cfg, t, 'eval'))) for t in TASKS}
_sizes

# %% [markdown]
# The splits never overlap, in ids nor in split units (SQuAD and WikiText articles, GSM8K questions), and the
# eval share is close to `eval_fraction` (by articles for SQuAD and WikiText, so it wobbles more):

# %%
for t in TASKS:
    tr, ev = load_task_items(cfg, t, 'train'), load_task_items(cfg, t, 'eval')
    test_eq(len({i['id'] for i in tr} & {i['id'] for i in ev}), 0)
    test_eq(len(tr) > 0 and len(ev) > 0, True)
    if t in ('squad', 'wikitext'): test_eq(len({i['meta']['title'] for i in tr} & {i['meta']['title'] for i in ev}), 0)
    if t == 'gsm8k': test_eq(len({i['meta']['question'] for i in tr} & {i['meta']['question'] for i in ev}), 0)
    if t == 'nq_open': test_close(len(ev) / (len(tr) + len(ev)), cfg.tasks.eval_fraction, eps=0.03)
test_eq(load_task_items(cfg, 'squad', n=5, seed=1), load_task_items(cfg, 'squad', n=5, seed=1))
test_fail(lambda: load_task_items(cfg, 'squadd'), contains="choose one of")
test_fail(lambda: load_task_items(cfg, 'squad', split='test'), contains="choose 'train' or 'eval'")

# %% [markdown]
# One item of each task:

# %%
for t in TASKS:
    it = load_task_items(cfg, t, 'train', n=1, seed=0)[0]
    print(f"--- {t} {it['id']}\n{it['prompt'][:300]}{'...' if len(it['prompt']) > 300 else ''}\n  references: {it['references'][:3]}")

# %% [markdown]
# ## 2. Fluency: a KenLM n-gram model
# Fluency is the mean log10 probability per token of the answer under a KenLM model, mapped linearly from
# `[rewards.fluency_floor, rewards.fluency_ceiling]` to `[0, 1]` (and clipped). The model is built once from the
# text the project ships, restricted to the **train** split, and never from an evaluation question:
#
# - WikiText-2 raw (valid and test files) articles of the train split (detokenised);
# - the SQuAD contexts of train-split articles (SQuAD questions are not used at all);
# - GSM8K `train.jsonl` questions and worked solutions (calculator annotations `<<...>>` removed; the test file
#   is the GSM8K evaluation split and is not used). NQ-Open contributes nothing: it is only evaluation questions.
#
# ### Tokenisation
# The corpus and every scored answer go through the same `lm_sentences`: NFKC, lower-case, every digit mapped
# to `0` (numbers are about the maths, not about fluency, and a small corpus cannot cover them), sentences
# split after `.`, `!` or `?`, then tokens are words (with their clitics: `game's`, `don't`) and single
# punctuation marks. One sentence per line, as `lmplz` expects; KenLM adds `<s>` and `</s>`.

# %%
#| export
LM_TOKENIZER_VERSION = 1  # bump when lm_sentences changes: binaries built with another version are refused
_SENT_SPLIT = re.compile(r'(?<=[.!?])\s+(?=["\'(\[]?[\w])')
_LM_TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")

def lm_sentences(text:str) -> list[list[str]]:
    "KenLM tokens of `text`, one list per sentence (lower-cased, digits mapped to 0)."
    t = re.sub(r'\d', '0', unicodedata.normalize('NFKC', text).lower()).replace('’', "'")
    return [toks for s in _SENT_SPLIT.split(t) if (toks := _LM_TOKEN.findall(s))]

# %%
test_eq(lm_sentences("The game's 1,250 copies sold. It was a hit!  Wasn't it?"),
        [['the', "game's", '0', ',', '000', 'copies', 'sold', '.'], ['it', 'was', 'a', 'hit', '!'], ["wasn't", 'it', '?']])
test_eq(lm_sentences("   "), [])
lm_sentences("Dr. Smith paid $4.50 (twice).")

# %% [markdown]
# ### The corpus
# `lm_corpus` yields the corpus lines in a fixed order, so its sha256 identifies the model's training data.

# %%
#| export
def lm_corpus(cfg:Config) -> Iterable[str]:
    "Lines of the KenLM training corpus (train split only: WikiText articles, SQuAD contexts, GSM8K train)."
    f = cfg.tasks.eval_fraction
    def lines(text):
        for toks in lm_sentences(text): yield ' '.join(toks)
    for fn in ('wiki.valid.raw', 'wiki.test.raw'):
        for title, paras in wikitext_articles(_read_text(str(data_path(cfg, 'wikitext-2-raw', fn)))):
            if in_eval('wikitext', title, f): continue
            for p in paras: yield from lines(p)
    seen = set()
    for r in _jsonl(data_path(cfg, 'squad_v1.1', 'dev.jsonl')):
        if r['context'] in seen or in_eval('squad', r['title'], f): continue
        seen.add(r['context']); yield from lines(r['context'])
    for r in _jsonl(data_path(cfg, 'gsm8k', 'train.jsonl')):
        yield from lines(r['question'])
        yield from lines(re.sub(r'<<[^>]*>>', '', r['answer'].rsplit('####', 1)[0]))

# %%
_corpus = list(lm_corpus(cfg))
_ntok = sum(l.count(' ') + 1 for l in _corpus)
print(f"{len(_corpus):,} sentences, {_ntok:,} tokens, {len(set(t for l in _corpus for t in l.split())):,} types")
_corpus[:2]

# %% [markdown]
# No evaluation question or passage is in the corpus. Checked on real items: we count the long sentences
# (12+ tokens) of evaluation questions, passages and WikiText continuations found in the corpus. Only a
# handful of generic sentences recur between GSM8K train and test problems (e.g. "some of the stamps had a
# snowflake design, ..."); no item has more than one such sentence:

# %%
_cset = set(_corpus)
def _long_lines(text): return [' '.join(s) for s in lm_sentences(text) if len(s) >= 12]
_leak = {}
for t in ('squad', 'gsm8k', 'nq_open', 'wikitext'):
    hits, n = [], 0
    for it in load_task_items(cfg, t, 'eval', n=300, seed=0):
        src = it['meta'].get('question', '') + ' ' + it['meta'].get('context', '') + ' ' + (it['references'][0] if t == 'wikitext' else '')
        ls = _long_lines(src); n += len(ls); hits.append(sum(l in _cset for l in ls))
    _leak[t] = (sum(hits), n)
    test_eq(max(hits) <= 1 and sum(hits) <= 0.01 * n, True)
_tr = load_task_items(cfg, 'gsm8k', 'train', n=20, seed=0)  # ...while train text is in it
test_eq(sum(l in _cset for it in _tr for l in _long_lines(it['meta']['question'])) > 0, True)
_leak  # (eval sentences found in the corpus, eval sentences checked)

# %% [markdown]
# ### The KenLM tools
# The `kenlm` Python module (a dependency of the package) only *queries* models. Building one needs the `lmplz`
# and `build_binary` programs, which `kenlm_tools` finds or builds from the kenlm 0.3.0 sdist on PyPI with cmake
# (about 2 minutes on 2 cores). They are looked for in `$KENLM_BIN`, then in the tools cache
# (`rewards.kenlm_tools_dir`, default: the user cache dir), then on `PATH`. Building needs a C++ compiler, cmake
# and the boost headers (on Debian/Ubuntu: the `KENLM_APT` packages below); `rc build-lm` builds the tools on
# first use, printing what it does.

# %%
#| export
KENLM_SDIST = 'kenlm==0.3.0'
KENLM_APT = ('apt-get install -y cmake g++ libboost-program-options-dev libboost-system-dev libboost-thread-dev '
             'libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev')
_TOOLS = ('lmplz', 'build_binary')

def kenlm_tools_dir(cfg:Config) -> Path:
    "Where `lmplz` and `build_binary` are built and cached."
    d = cfg.rewards.kenlm_tools_dir
    return Path(d).expanduser() if d else Path(user_cache_dir('research_controller'))/'kenlm-0.3.0'

def find_kenlm_tools(cfg:Config) -> dict[str, Path]|None:
    "Paths of `lmplz` and `build_binary` from $KENLM_BIN, the tools cache or PATH; None if either is missing."
    for d in [os.environ.get('KENLM_BIN'), kenlm_tools_dir(cfg)/'bin']:
        if d and all((Path(d)/t).is_file() for t in _TOOLS): return {t: Path(d)/t for t in _TOOLS}
    found = {t: shutil.which(t) for t in _TOOLS}
    return {t: Path(p) for t, p in found.items()} if all(found.values()) else None

# %%
#| export
def _run(cmd:list, what:str, **kw) -> subprocess.CompletedProcess:
    "Run `cmd`; on failure raise an error with the tail of its output."
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        tail = '\n'.join((r.stdout + '\n' + r.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return r

def build_kenlm_tools(cfg:Config, jobs:int|None=None, verbose:bool=True) -> dict[str, Path]:
    "Download the kenlm sdist from PyPI and build `lmplz` and `build_binary` into the tools cache."
    from tqdm.auto import tqdm
    d = kenlm_tools_dir(cfg); d.mkdir(parents=True, exist_ok=True)
    missing = [t for t in ('cmake', 'make', 'c++') if not shutil.which(t)]
    if missing: raise RuntimeError(f"building the KenLM tools needs {missing}. Fix (Debian/Ubuntu, as root): apt-get update && {KENLM_APT}")
    pbar = tqdm(total=4, desc=f'kenlm tools -> {d}', disable=not verbose)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        tmp = Path(tmp); pbar.set_postfix_str('pip download'); pbar.refresh()
        # --no-binary kenlm (not :all:, which would also compile cmake from source) and no build isolation
        _run([sys.executable, '-m', 'pip', 'download', KENLM_SDIST, '--no-deps', '--no-binary', 'kenlm',
              '--no-build-isolation', '-d', tmp], 'downloading the kenlm sdist (pip download)')
        sdist = next(tmp.glob('kenlm-*.tar.gz'))
        with tarfile.open(sdist) as tf: tf.extractall(tmp, filter='data')
        src = next(p for p in tmp.iterdir() if p.is_dir() and p.name.startswith('kenlm-'))
        bld = src/'build'; bld.mkdir(); pbar.update(1); pbar.set_postfix_str('cmake'); pbar.refresh()
        try:
            _run(['cmake', '..', '-DCMAKE_BUILD_TYPE=Release', '-DKENLM_MAX_ORDER=6'], 'cmake (configuring KenLM)', cwd=bld)
            pbar.update(1); pbar.set_postfix_str('make lmplz build_binary'); pbar.refresh()
            _run(['make', f'-j{jobs or os.cpu_count() or 1}', *_TOOLS], 'make (compiling lmplz, build_binary)', cwd=bld)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nMost often the boost headers are missing. Fix (Debian/Ubuntu, as root): apt-get update && {KENLM_APT}") from None
        pbar.update(1); pbar.set_postfix_str('install'); (d/'bin').mkdir(exist_ok=True)
        for t in _TOOLS:
            shutil.copy2(bld/'bin'/t, d/'bin'/f'.{t}.tmp'); os.replace(d/'bin'/f'.{t}.tmp', d/'bin'/t)
    pbar.update(1); pbar.close()
    return find_kenlm_tools(cfg)

def kenlm_tools(cfg:Config, build:bool=True, verbose:bool=True) -> dict[str, Path]:
    "`lmplz` and `build_binary`: found, or built from the sdist when `build`."
    found = find_kenlm_tools(cfg)
    if found: return found
    if not build: raise FileNotFoundError(f"lmplz/build_binary not found (looked in $KENLM_BIN, {kenlm_tools_dir(cfg)/'bin'}, PATH). "
                                          "Fix: run `rc build-lm` (it builds them from the kenlm sdist), or call kenlm_tools(cfg, build=True).")
    return build_kenlm_tools(cfg, verbose=verbose)

# %%
find_kenlm_tools(cfg) is not None  # True on a machine where the tools were built

# %% [markdown]
# ### `build_lm`
# `build_lm` is what `rc build-lm` runs. It writes the corpus, runs
# `lmplz -o <order> -S <memory> --discount_fallback` and `build_binary -q 8 -b 8 trie` (8-bit quantised
# probabilities and backoffs in a trie: a few MB), and moves the binary into place atomically next to a JSON
# sidecar that records the corpus sha256, its sources, the exact commands and timings. The build is cached:
# when the binary exists and its sidecar matches the corpus and settings, nothing is rebuilt (unless `force`).

# %%
#| export
def asset_path(p:str|Path) -> Path:
    "Resolve a project asset path (relative paths are relative to the project root)."
    p = Path(p).expanduser()
    if p.is_absolute(): return p
    root = project_root()
    return (root/p) if root else p

# %%
#| export
def build_lm(cfg:Config, # the config: `rewards.kenlm_path`, `kenlm_order`, `kenlm_memory`
             out:str|Path|None=None, # where the binary goes; None = `rewards.kenlm_path`
             lines:Iterable[str]|None=None, # corpus lines (already tokenised); None = `lm_corpus(cfg)`
             force:bool=False, # rebuild even when the cached binary matches
             prune:str|None=None, # lmplz --prune thresholds, e.g. '0 0 1'; None = no pruning
             build_tools:bool=True, # build lmplz/build_binary from the sdist when they are missing
             verbose:bool=True, # show a progress bar
            ) -> Path:
    "Build the KenLM fluency model from the train-split corpus (cached; atomic)."
    from tqdm.auto import tqdm
    r = cfg.rewards
    out = asset_path(out or r.kenlm_path); side = out.with_suffix('.json')
    corpus = '\n'.join(lines if lines is not None else lm_corpus(cfg)) + '\n'
    if len(corpus.split()) < 1: raise ValueError("the KenLM corpus is empty.")
    key = dict(corpus_sha256=hashlib.sha256(corpus.encode()).hexdigest(), order=r.kenlm_order, prune=prune,
               tokenizer_version=LM_TOKENIZER_VERSION, quantization='build_binary -q 8 -b 8 trie')
    if not force and out.exists() and side.exists():
        old = json.loads(side.read_text())
        if all(old.get(k) == v for k, v in key.items()) and old.get('binary_sha256') == sha256_file(out):
            if verbose: print(f"build-lm: {out} is up to date (corpus sha256 {key['corpus_sha256'][:12]}...)")
            return out
    tools = kenlm_tools(cfg, build=build_tools, verbose=verbose)
    out.parent.mkdir(parents=True, exist_ok=True)
    pbar = tqdm(total=3, desc='build-lm', disable=not verbose)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix='.build-lm-') as tmp:
        tmp = Path(tmp); arpa, binp = tmp/'model.arpa', tmp/'model.bin'
        (tmp/'corpus.txt').write_text(corpus); pbar.set_postfix_str('lmplz'); pbar.update(1)
        lmplz = [tools['lmplz'], '-o', r.kenlm_order, '-S', r.kenlm_memory, '-T', tmp, '--discount_fallback'] + (['--prune', *prune.split()] if prune else [])
        t0 = time.time()
        with open(tmp/'corpus.txt') as fi, open(arpa, 'w') as fo:
            p = subprocess.run([str(c) for c in lmplz], stdin=fi, stdout=fo, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0: raise RuntimeError(f"lmplz failed (exit {p.returncode}): {' '.join(map(str, lmplz))}\n{p.stderr[-2000:]}")
        t1 = time.time(); pbar.set_postfix_str('build_binary'); pbar.update(1)
        bb = [tools['build_binary'], '-q', '8', '-b', '8', 'trie', arpa, binp]
        _run(bb, 'build_binary'); t2 = time.time()
        os.replace(binp, out); pbar.update(1); pbar.close()
    rel = lambda c: str(c).replace(str(tmp), '$TMP').replace(str(Path(tools['lmplz']).parent), '$KENLM_BIN')
    meta = dict(**key, binary_sha256=sha256_file(out), binary_bytes=out.stat().st_size,
                corpus_lines=corpus.count('\n'), corpus_tokens=len(corpus.split()), corpus_bytes=len(corpus.encode()),
                corpus_sources=('default: lm_corpus(cfg) = train-split WikiText-2 raw articles (valid+test files), '
                                'train-split SQuAD contexts, GSM8K train questions+solutions' if lines is None else 'custom lines'),
                eval_fraction=cfg.tasks.eval_fraction, kenlm=KENLM_SDIST,
                commands=[' '.join(map(rel, lmplz)) + ' < $TMP/corpus.txt > $TMP/model.arpa', ' '.join(map(rel, bb)),
                          f'mv $TMP/model.bin {out.name}'],
                seconds=dict(lmplz=round(t1 - t0, 2), build_binary=round(t2 - t1, 2)))
    atomic_write_text(side, json.dumps(meta, indent=1) + '\n')
    if verbose: print(f"build-lm: wrote {out} ({meta['binary_bytes']:,} bytes, {meta['corpus_tokens']:,} corpus tokens)")
    return out

# %% [markdown]
# Building a tiny model end to end takes a second once the tools exist (a `slow` cell: CI has no `lmplz`
# unless it builds it). A second call is a cache hit and returns at once:

# %%
#| slow
with tempfile.TemporaryDirectory() as d:
    _tiny_lines = [' '.join(s) for it in load_task_items(cfg, 'wikitext', 'train', n=40) for s in lm_sentences(it['references'][0])]
    t0 = time.time(); p = build_lm(cfg, out=Path(d)/'tiny.bin', lines=_tiny_lines, verbose=False); t_build = time.time() - t0
    t0 = time.time(); build_lm(cfg, out=Path(d)/'tiny.bin', lines=_tiny_lines, verbose=False); t_cached = time.time() - t0
    _side = json.loads(p.with_suffix('.json').read_text())
    test_eq(_side['corpus_lines'], len(_tiny_lines))
    test_eq(t_cached < t_build, True)
    import kenlm
    test_eq(kenlm.Model(str(p)).order, cfg.rewards.kenlm_order)
    print(f"tiny LM: {p.stat().st_size:,} bytes, built in {t_build:.1f}s, cache hit in {t_cached:.2f}s")
    print(_side['commands'])

# %% [markdown]
# The real model is built by `rc build-lm` (the cell below, `slow`). It is small enough to be committed with the
# project (`assets/kenlm/fluency.bin`, see `assets/kenlm/README.md`), so CI and users need only the `kenlm` module.
# Rebuilding from a clean checkout reproduces it byte for byte (same corpus sha256, same binary sha256).

# %%
#| slow
_committed = json.loads(asset_path(cfg.rewards.kenlm_path).with_suffix('.json').read_text()) if asset_path(cfg.rewards.kenlm_path).with_suffix('.json').exists() else None
with tempfile.TemporaryDirectory() as d:
    t0 = time.time(); p = build_lm(cfg, out=Path(d)/'fluency.bin', verbose=False); t_full = time.time() - t0
    _side = json.loads(p.with_suffix('.json').read_text())
    print(f"full LM: {_side['corpus_tokens']:,} tokens -> {p.stat().st_size/1e6:.1f} MB in {t_full:.1f}s (lmplz+build_binary: {_side['seconds']})")
    if _committed: test_eq((_side['corpus_sha256'], _side['binary_sha256']), (_committed['corpus_sha256'], _committed['binary_sha256']))

# %% [markdown]
# **From a clean checkout.** With no tools cached anywhere, `build_lm` first builds `lmplz` and `build_binary`
# (pip download of the sdist, cmake, make: about 35 s on this 2-core machine once the boost headers are installed),
# then the model, and reproduces the committed binary byte for byte. A fresh tools directory is given with the
# `rewards.kenlm_tools_dir` override:

# %%
#| slow
with tempfile.TemporaryDirectory() as d:
    _cfg_clean = load_config(overrides=[f'rewards.kenlm_tools_dir={d}/tools'])
    _env_bin = os.environ.pop('KENLM_BIN', None)
    try:
        test_eq(find_kenlm_tools(_cfg_clean) is None or shutil.which('lmplz') is not None, True)
        t0 = time.time(); p = build_lm(_cfg_clean, out=Path(d)/'fluency.bin'); t_clean = time.time() - t0
    finally:
        if _env_bin is not None: os.environ['KENLM_BIN'] = _env_bin
    test_eq(sorted(x.name for x in (Path(d)/'tools'/'bin').iterdir()), ['build_binary', 'lmplz'])
    _side = json.loads(p.with_suffix('.json').read_text())
    if _committed: test_eq(_side['binary_sha256'], _committed['binary_sha256'])
    print(f"clean build (tools + LM): {t_clean:.0f}s")

# %% [markdown]
# ### Scoring
# `Fluency` loads the binary once (a missing `kenlm` module or binary is a clear error that says how to get
# it: there is no silent constant score) and scores text by its mean log10 probability per token, `</s>`
# included, so that stopping a sentence is scored too. An answer with no token gets fluency 0.

# %%
#| export
KENLM_PIP = "pip install kenlm==0.3.0 (it compiles: needs a C++ compiler, cmake, zlib and the boost headers; " \
            f"on Debian/Ubuntu: {KENLM_APT})"

@functools.lru_cache(maxsize=4)
def _kenlm_model(path:str):
    try: import kenlm
    except ImportError: raise ImportError(f"fluency needs the `kenlm` Python module, which is not installed. Fix: {KENLM_PIP}") from None
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"KenLM model {path} not found (rewards.kenlm_path). Fix: build it once with `rc build-lm` "
                                "(research_controller.rewards.build_lm(cfg)), which also builds lmplz/build_binary from the kenlm sdist when they are missing.")
    side = p.with_suffix('.json')
    if side.exists() and json.loads(side.read_text()).get('tokenizer_version') != LM_TOKENIZER_VERSION:
        raise ValueError(f"KenLM model {path} was built with another LM tokeniser version. Fix: rebuild it with `rc build-lm --force`.")
    return kenlm.Model(str(p))

class Fluency:
    "KenLM fluency: mean log10 probability per token, mapped to [0, 1]."
    def __init__(self, cfg:Config, path:str|Path|None=None):
        self.cfg, self.path = cfg, asset_path(path or cfg.rewards.kenlm_path)
        self.lm = _kenlm_model(str(self.path))
    def logprob(self, text:str) -> tuple[float, int]:
        "Total log10 probability of `text` and its number of scored tokens (words, punctuation, one `</s>` a sentence)."
        tot = n = 0
        for s in lm_sentences(text): tot += self.lm.score(' '.join(s), bos=True, eos=True); n += len(s) + 1
        return tot, n
    def mean_logprob(self, text:str) -> float:
        "Mean log10 probability per token; -inf for text without tokens."
        tot, n = self.logprob(text)
        return tot / n if n else -math.inf
    def __call__(self, text:str) -> float:
        "Fluency in [0, 1]."
        lo, hi = self.cfg.rewards.fluency_floor, self.cfg.rewards.fluency_ceiling
        return float(np.clip((self.mean_logprob(text) - lo) / (hi - lo), 0.0, 1.0))
    def __repr__(self): return f"Fluency({self.path.name}, order={self.lm.order})"

# %%
flu = Fluency(cfg)
flu

# %%
test_fail(lambda: Fluency(cfg, path='no/such/model.bin'), contains='rc build-lm')
test_eq(flu(''), 0.0)
test_eq(flu.mean_logprob('   '), -math.inf)
test_close(flu.logprob('The cat sat.')[1], 5)  # the, cat, sat, ., </s>
flu("The river flows through the city."), flu("river city The flows the through.")

# %% [markdown]
# **Grammatical beats shuffled.** On held-out text (sentences of *evaluation*-split WikiText continuations and
# SQuAD passages, which the model never saw), every text scores higher than the same words shuffled within
# each sentence:

# %%
def _shuffled(text, rng):
    out = []
    for s in lm_sentences(text): s = s[:]; rng.shuffle(s); out.append(' '.join(s))
    return ' '.join(out)
_rng = random.Random(0)
_held = [it['references'][0] for it in load_task_items(cfg, 'wikitext', 'eval', n=40, seed=0)] + \
        [it['meta']['context'] for it in load_task_items(cfg, 'squad', 'eval', n=40, seed=0)]
_g = np.array([flu.mean_logprob(t) for t in _held]); _s = np.array([flu.mean_logprob(_shuffled(t, _rng)) for t in _held])
test_eq((_g > _s).mean(), 1.0)
test_eq(np.mean([flu(t) for t in _held]) > np.mean([flu(_shuffled(t, _rng)) for t in _held]) + 0.2, True)
print(f"mean log10 p/token: grammatical {_g.mean():.2f} (5-95%: {np.percentile(_g, 5):.2f}..{np.percentile(_g, 95):.2f}), "
      f"shuffled {_s.mean():.2f} (5-95%: {np.percentile(_s, 5):.2f}..{np.percentile(_s, 95):.2f})")

# %%
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(6, 2.6))
ax.hist(_g, bins=25, alpha=.7, label='held-out text'); ax.hist(_s, bins=25, alpha=.7, label='same words, shuffled')
for v in (cfg.rewards.fluency_floor, cfg.rewards.fluency_ceiling): ax.axvline(v, color='k', ls=':')
ax.set_xlabel('mean log10 p per token (dotted: fluency 0 and 1)'); ax.legend(fontsize=8); plt.tight_layout()

# %% [markdown]
# The same holds sentence by sentence, and for the degenerate outputs a controller might learn to emit:

# %%
_cases = {'grammatical': "The river flows through the centre of the city.", 'shuffled': "centre the flows of river city The the through.",
          'repeated word': "the the the the the the the the", 'repeated phrase': "of the city of the city of the city of the city",
          'keyboard mash': "asdf qwer zxcv uiop hjkl"}
_fl = {k: round(flu(v), 3) for k, v in _cases.items()}
test_eq(_fl['grammatical'] > max(_fl['shuffled'], _fl['repeated word'], _fl['keyboard mash']), True)
_fl

# %% [markdown]
# ## 3. Coherence: a G-Eval judge
# Following G-Eval (Liu et al., 2023), a language model reads the request and the answer together with the
# evaluation criteria and rates the answer from 1 to 5. Instead of sampling a rating, the judge reads the
# probabilities of the five rating tokens `"1"`..`"5"` at the rating position of **one forward pass**,
# renormalises them, and takes the probability-weighted mean rating $\bar r = \sum_i i\,p_i$; coherence is
# $(\bar r - 1)/4 \in [0, 1]$. The judge is the frozen SLM itself (or `rewards.judge_model`).
#
# One prompt wording is one more source of noise, so the judge averages `rewards.judge_paraphrases` paraphrased
# prompts (the same criteria in other words) and reports their variance. All paraphrases of several answers go
# through the model as one left-padded batch, and every rating is cached in sqlite, keyed by the model
# fingerprint and the hash of the prompt tokens, so a text scored once is never scored again (self-play scores
# the same final texts many times).

# %%
#| export
JUDGE_INSTRUCTIONS = (
    "You rate the coherence of a response to a request on a scale of 1 to 5. Coherence: the response is well "
    "organised, stays on the topic of the request and its sentences build a clear answer; repeated, jumbled, "
    "unrelated or meaningless text is incoherent. 1 = incoherent, 5 = fully coherent. Reply with one digit.",
    "You are a strict grader. Judge how coherent and sensible each response is as an answer to its request: "
    "1 = nonsense, repetition or unrelated text, 3 = partly sensible, 5 = a clear, relevant answer. Answer with a single digit.",
    "Evaluate coherence from 1 (worst) to 5 (best). A coherent response hangs together logically, addresses what "
    "was asked and avoids rambling, repetition and nonsense. Give only the score digit.",
    "Score each response for coherence, 1 to 5. High scores go to focused, well-structured responses whose ideas "
    "follow from each other and from the request; low scores to disjointed, repetitive or off-topic text. One digit only.",
    "Read the request and the response, then rate how coherent the response is (1 = not coherent at all, "
    "5 = completely coherent: logical, on topic, no repeated or meaningless words). Reply with the digit.",
)
JUDGE_SHOTS = (  # (request, response, rating): rated examples shown to the judge before the answer
    ("what is the capital of France?", "Paris is the capital of France.", 5),
    ("who painted the mona lisa?", "mona mona mona mona mona mona mona mona", 1),
    ("Solve: Tom has 3 apples and buys 2 more. How many apples does he have?", "Tom has 3 apples and buys 2 more, so 3 + 2 = 5. The answer is 5.", 5),
    ("when did world war 2 end?", "The cat likes milk. Trains are fast. Blue blue green the.", 1),
    ("who discovered penicillin?", "It was found by some scientist, I think, in a lab, a long time ago, maybe.", 3),
    ("how many legs does a spider have?", "Spiders have eight legs.", 5),
    ("Continue this Wikipedia article.\n\nThe Nile is a major river in north-eastern Africa.", "river the of and Africa flows is north sea the", 1),
)
JUDGE_PREFIX = "Score: "
NO_REQUEST = "(none: free text, judge the response on its own)"

def judge_messages(j:int, request:str, answer:str) -> list[dict]:
    "Chat messages of judge paraphrase `j`: instruction `j`, the rated examples rotated by `2j`, then the answer."
    shots = JUDGE_SHOTS[2 * j % len(JUDGE_SHOTS):] + JUDGE_SHOTS[:2 * j % len(JUDGE_SHOTS)]
    msgs = [{'role': 'system', 'content': JUDGE_INSTRUCTIONS[j]}]
    for q, a, r in shots: msgs += [{'role': 'user', 'content': f"Request: {q}\nResponse: {a}"}, {'role': 'assistant', 'content': f"{JUDGE_PREFIX}{r}"}]
    return msgs + [{'role': 'user', 'content': f"Request: {request}\nResponse: {answer}"}]

def _clip_chars(s:str, n:int) -> str:
    "`s` cut to at most `n` characters (at a space, marked with '...')."
    s = s.strip()
    if len(s) <= n: return s
    cut = s.rfind(' ', 0, n - 3)
    return s[:cut if cut > n // 2 else n - 3] + '...'

# %%
test_eq(len(JUDGE_INSTRUCTIONS), 5)
_m = judge_messages(1, "who wrote hamlet?", "Shakespeare.")
test_eq((len(_m), _m[0]['content'], _m[1]['content'], _m[-1]['content']),
        (2 + 2 * len(JUDGE_SHOTS), JUDGE_INSTRUCTIONS[1], f"Request: {JUDGE_SHOTS[2][0]}\nResponse: {JUDGE_SHOTS[2][1]}", "Request: who wrote hamlet?\nResponse: Shakespeare."))
test_eq(_clip_chars("one two three four", 12), 'one two...')
test_eq(_clip_chars("short", 12), 'short')

# %% [markdown]
# ### The rating cache
# `JudgeCache` is a small sqlite table `key -> probabilities of "1".."5"`. It is safe for several processes
# (self-play workers) at once: WAL journal, a busy timeout, `INSERT OR IGNORE` inside `BEGIN IMMEDIATE`, and a
# connection per process (a forked worker opens its own).

# %%
#| export
class JudgeCache:
    "sqlite cache of judge rating probabilities, safe for several processes."
    def __init__(self, path:str|Path):
        self.path = Path(path); self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con, self._pid = None, None
    def _db(self) -> sqlite3.Connection:
        if self._con is None or self._pid != os.getpid():
            con = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            con.execute('PRAGMA journal_mode=WAL'); con.execute('PRAGMA busy_timeout=60000')
            con.execute('CREATE TABLE IF NOT EXISTS ratings (key TEXT PRIMARY KEY, probs TEXT NOT NULL, fingerprint TEXT NOT NULL)')
            self._con, self._pid = con, os.getpid()
        return self._con
    def get_many(self, keys:list[str]) -> dict[str, list[float]]:
        "The cached probabilities of those `keys` that are in the cache."
        out, db = {}, self._db()
        for i in range(0, len(keys), 500):
            ks = keys[i:i + 500]
            q = f"SELECT key, probs FROM ratings WHERE key IN ({','.join('?' * len(ks))})"
            out.update({k: json.loads(v) for k, v in db.execute(q, ks)})
        return out
    def put_many(self, rows:dict[str, list[float]], fingerprint:str):
        "Store `rows` (key -> probabilities); keys already present are kept."
        if not rows: return
        db = self._db(); db.execute('BEGIN IMMEDIATE')
        try:
            db.executemany('INSERT OR IGNORE INTO ratings (key, probs, fingerprint) VALUES (?, ?, ?)',
                           [(k, json.dumps([float(x) for x in v]), fingerprint) for k, v in rows.items()])
            db.execute('COMMIT')
        except BaseException: db.execute('ROLLBACK'); raise
    def __len__(self): return self._db().execute('SELECT COUNT(*) FROM ratings').fetchone()[0]
    def __repr__(self): return f"JudgeCache({self.path.name}, {len(self)} ratings)"

# %% [markdown]
# Two processes writing 300 ratings each at the same time, 100 of them the same keys: nothing is lost and
# nothing is stored twice.

# %%
_code = """
import sys; from research_controller.rewards import JudgeCache
c = JudgeCache(sys.argv[1])
for i in range(0, 300, 10): c.put_many({f'{sys.argv[2]}{j}': [0.2]*5 for j in range(i, i + 10)}, 'fp')
"""
with tempfile.TemporaryDirectory() as d:
    _db = Path(d)/'judge.sqlite'
    _procs = [subprocess.Popen([sys.executable, '-c', _code, str(_db), pre]) for pre in ('a', 'b')]
    _jc = JudgeCache(_db)
    for i in range(0, 100, 10): _jc.put_many({f'a{j}': [0.2]*5 for j in range(i, i + 10)}, 'fp')  # the same keys as process 'a'
    test_eq([p.wait() for p in _procs], [0, 0])
    test_eq(len(_jc), 600)
    test_eq(_jc.get_many(['a5', 'b299', 'c1']), {'a5': [0.2]*5, 'b299': [0.2]*5})
    _r = repr(_jc)
_r

# %% [markdown]
# ### `Judge`
# `Judge.prompt_ids` builds one judge prompt: the paraphrased instructions in the chat template, with the answer
# turn opened by `JUDGE_PREFIX`, so the next token is the rating. The request and the answer are each cut to
# `rewards.judge_max_chars` characters.

# %%
#| export
class Judge:
    "G-Eval coherence judge: probability-weighted 1-5 rating from one forward pass per prompt, cached."
    def __init__(self, cfg:Config, # `rewards.judge_*` settings; `slm` when no model is given
                 model=None, tok=None, # the judge model (the steered SLM); ignored when `rewards.judge_model` is set; None = `load_slm(cfg)`
                 batch_size:int=12, # prompts per forward pass
                ):
        import torch
        r = cfg.rewards
        if r.judge_model: model, tok = load_slm_for_judge(cfg)
        elif model is None or tok is None:
            from research_controller.slm import load_slm
            model, tok = load_slm(cfg)
        from research_controller.slm import model_fingerprint
        self.cfg, self.model, self.tok, self.batch_size = cfg, model, tok, int(batch_size)
        self.fingerprint = model_fingerprint(model)
        self.rating_ids = [tok.convert_tokens_to_ids(str(i)) for i in range(1, 6)]
        if any(i is None or i == tok.unk_token_id or tok.decode([i]).strip() != str(k + 1) for k, i in enumerate(self.rating_ids)):
            raise ValueError(f"the judge tokenizer has no single tokens '1'..'5' (rewards.judge_model={r.judge_model!r}). "
                             "Fix: use a judge model whose tokenizer splits digits (SmolLM2, Llama 3, Gemma do).")
        self.templates = JUDGE_INSTRUCTIONS[:r.judge_paraphrases]
        self.cache = JudgeCache(run_path(cfg, r.judge_cache)) if r.judge_cache else None
        self.stats = collections.Counter()
        self._chat = tok.chat_template is not None
        self._prefix = tok(JUDGE_PREFIX, add_special_tokens=False)['input_ids']
        self._torch, self._prefix_ids, self._kv = torch, {}, {}

    def prompt_ids(self, request:str|None, answer:str, j:int=0) -> list[int]:
        "Token ids of judge prompt `j` for `answer` to `request`, ending where the rating token goes."
        n = self.cfg.rewards.judge_max_chars
        msgs = judge_messages(j, _clip_chars(request, n) if request and request.strip() else NO_REQUEST, _clip_chars(answer, n))
        if self._chat:
            out = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = list(out['input_ids'] if hasattr(out, 'keys') else out)
        else:  # a base model: the same turns as plain text
            ids = self.tok('\n\n'.join(m['content'] for m in msgs) + '\n', add_special_tokens=True)['input_ids']
        return ids + self._prefix

    def __repr__(self): return f"Judge({self.fingerprint}, paraphrases={len(self.templates)}, cache={self.cache!r})"

def load_slm_for_judge(cfg:Config):
    "The `rewards.judge_model` as a frozen model and tokenizer (same loader and dtype rules as the SLM)."
    from research_controller.slm import load_slm
    return load_slm(replace_config(cfg, {'slm.source': cfg.rewards.judge_model}))

# %%
from research_controller.slm import load_slm
model, tok = load_slm(cfg)
_jdir = tempfile.mkdtemp()
jcfg = load_config(overrides=[f'rewards.judge_cache={_jdir}/judge.sqlite'])
judge = Judge(jcfg, model, tok)
_ids = judge.prompt_ids("Answer the question in a few words.\n\nQuestion: who wrote hamlet?", "William Shakespeare.", 0)
test_eq(tok.decode(_ids[-len(judge._prefix):]), JUDGE_PREFIX)
test_eq(judge.rating_ids, [tok.convert_tokens_to_ids(d) for d in '12345'])
print(tok.decode(_ids)[-420:])

# %% [markdown]
# `rating_probs` runs the forward passes. The instructions and rated examples of a paraphrase are the same for
# every answer, so their keys and values are computed once per judge and reused; only each answer's own turn is
# run, sorted by length, in left-padded batches (position ids count real tokens only), and only the last
# position's logits are computed. It returns the full-vocabulary probabilities of the five rating tokens, from the
# sqlite cache when they are there.

# %%
#| export
def _key(fingerprint:str, ids:list[int]) -> str:
    return hashlib.sha256(f"{fingerprint}:{','.join(map(str, ids))}".encode()).hexdigest()

_PREFIX_KV = {}  # (model fingerprint, prefix hash) -> keys/values of a judge prompt's shared prefix

@patch
def _shared_prefix(self:Judge, j:int) -> list[int]:
    "Token ids of paraphrase `j` up to the answer's turn (instructions and rated examples), the same for every answer."
    if j not in self._prefix_ids:
        msgs = judge_messages(j, 'x', 'y')[:-1]
        if self._chat:
            out = self.tok.apply_chat_template(msgs, tokenize=True)
            self._prefix_ids[j] = list(out['input_ids'] if hasattr(out, 'keys') else out)
        else: self._prefix_ids[j] = []
    return self._prefix_ids[j]

@patch
def _rows(self:Judge, ids, mask, pos, kv=None):
    "Rating-token probabilities after each row (last position only)."
    torch, dev = self._torch, self.model.device
    if kv is not None:
        import copy
        kv = copy.deepcopy(kv); kv.batch_repeat_interleave(ids.shape[0])
    logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), past_key_values=kv,
                        use_cache=kv is not None, logits_to_keep=1).logits[:, -1]
    self.stats['forward_rows'] += ids.shape[0]; self.stats['forward_batches'] += 1
    return torch.softmax(logits.float(), -1)[:, self.rating_ids].cpu().numpy()

@patch
def _forward(self:Judge, seqs:list[list[int]]) -> np.ndarray:
    "Probabilities of the rating tokens after each sequence: the shared prefix once, the rest batched and left-padded."
    torch = self._torch
    out = np.zeros((len(seqs), 5), dtype=np.float64)
    pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
    groups = collections.defaultdict(list)  # prefix index (-1: none) -> sequence indices
    for i, s in enumerate(seqs):
        j = next((j for j in range(len(self.templates)) if (p := self._shared_prefix(j)) and s[:len(p)] == p and len(s) > len(p)), -1)
        groups[j].append(i)
    with torch.inference_mode():
        for j, members in groups.items():
            P = len(self._shared_prefix(j)) if j >= 0 else 0
            if P and j not in self._kv:
                key = (self.fingerprint, _key(self.fingerprint, self._shared_prefix(j)))  # shared by every judge on this model
                if key not in _PREFIX_KV:
                    while len(_PREFIX_KV) >= 16: _PREFIX_KV.pop(next(iter(_PREFIX_KV)))
                    _PREFIX_KV[key] = self.model(input_ids=torch.tensor([self._shared_prefix(j)], device=self.model.device), use_cache=True).past_key_values
                    self.stats['prefix_forwards'] += 1
                self._kv[j] = _PREFIX_KV[key]
            members = sorted(members, key=lambda i: len(seqs[i]))
            for b in range(0, len(members), self.batch_size):
                idx = members[b:b + self.batch_size]; L = max(len(seqs[i]) for i in idx) - P
                ids = torch.full((len(idx), L), pad, dtype=torch.long); mask = torch.zeros((len(idx), P + L), dtype=torch.long)
                mask[:, :P] = 1
                for r, i in enumerate(idx):
                    suf = seqs[i][P:]; ids[r, L - len(suf):] = torch.tensor(suf); mask[r, P + L - len(suf):] = 1
                pos = (mask.cumsum(-1) - 1)[:, P:].clamp(min=0)
                out[idx] = self._rows(ids, mask, pos, self._kv[j] if P else None)
    return out

@patch
def rating_probs(self:Judge, seqs:list[list[int]]) -> np.ndarray:
    "Probabilities of '1'..'5' after each prompt (cached per model fingerprint and prompt)."
    keys = [_key(self.fingerprint, s) for s in seqs]
    got = self.cache.get_many(list(set(keys))) if self.cache is not None else {}
    todo = sorted({k: i for i, k in enumerate(keys) if k not in got}.items(), key=lambda kv: kv[1])
    self.stats['cache_hits'] += sum(k in got for k in keys)
    if todo:
        p = self._forward([seqs[i] for _, i in todo])
        new = {k: p[j].tolist() for j, (k, _) in enumerate(todo)}
        if self.cache is not None: self.cache.put_many(new, self.fingerprint)
        got.update(new)
    return np.array([got[k] for k in keys], dtype=np.float64)

# %% [markdown]
# `score` turns those into coherence: for each answer, the expected rating under each paraphrase, their mean
# mapped to [0, 1], the variance over paraphrases, and how much probability the judge put on the rating tokens
# at all (`digit_mass`, a check that the prompt works: near 1 means the judge answers with a digit). An empty
# answer has nothing to rate: its coherence is 0 without a forward pass.

# %%
#| export
@dataclass
class JudgeScore:
    "Coherence of one answer: mean over paraphrases, their variance and the expected ratings."
    score: float                # (mean expected rating - 1) / 4, in [0, 1]
    var: float                  # variance of the per-paraphrase scores
    ratings: list               # expected rating (1-5) under each paraphrase
    digit_mass: float           # mean probability on the tokens '1'..'5'

@patch
def score(self:Judge, answers:list[str], requests:list[str|None]|None=None) -> list[JudgeScore]:
    "Coherence of each answer to its request (None = free text), all paraphrases in one batched pass."
    requests = requests if requests is not None else [None] * len(answers)
    if len(requests) != len(answers): raise ValueError(f"score got {len(answers)} answers but {len(requests)} requests.")
    k = len(self.templates)
    live = [i for i, a in enumerate(answers) if a and a.strip()]
    seqs = [self.prompt_ids(requests[i], answers[i], j) for i in live for j in range(k)]
    p = self.rating_probs(seqs) if seqs else np.zeros((0, 5))
    out = [JudgeScore(0.0, 0.0, [1.0] * k, 0.0) for _ in answers]
    for n, i in enumerate(live):
        pi = p[n * k:(n + 1) * k]; mass = pi.sum(1)
        r = (pi / np.maximum(mass, 1e-30)[:, None]) @ np.arange(1, 6)
        s = (r - 1) / 4
        out[i] = JudgeScore(float(s.mean()), float(s.var()), [round(float(x), 4) for x in r], float(mass.mean()))
    return out

# %%
_req = load_task_items(cfg, 'nq_open', 'eval', n=1, seed=3)[0]
_answers = [_req['references'][0] + '.', "the the the the the the the the the the the the", "",
            "Bananas are yellow. My car is blue. " * 3]
t0 = time.time(); _js = judge.score(_answers, [_req['prompt']] * len(_answers)); t_cold = time.time() - t0
t0 = time.time(); _js2 = judge.score(_answers, [_req['prompt']] * len(_answers)); t_hot = time.time() - t0
test_eq([j.score for j in _js], [j.score for j in _js2])  # the cached ratings are the computed ones
test_eq(judge.stats['forward_rows'], 3 * len(judge.templates))  # the empty answer costs no forward pass
test_eq(_js[2].score, 0.0)
test_eq(all(0 <= j.score <= 1 for j in _js), True)
test_eq(_js[0].score > _js[1].score, True)  # a right short answer beats a repeated word
print(f"{_req['prompt']!r}\ncold {t_cold:.2f}s, cached {t_hot*1000:.0f} ms")
[(a[:40], round(j.score, 3), round(j.var, 4), j.ratings, round(j.digit_mass, 3)) for a, j in zip(_answers, _js)]

# %% [markdown]
# **How much can a 135M judge tell?** Measured once (2026-11-23) on 8 real evaluation items (4 NQ-Open, 4 SQuAD,
# `/tmp` script, not a test): the reference answer got a higher coherence than the first word repeated 15 times
# on 7 of 8 items, than off-topic sentences on 7 of 8 and than keyboard mash on 6 of 8, with mean margins of only
# about 0.03 (on [0, 1]); the paraphrases agree closely (mean variance 0.0005) and put 93% of the probability on
# the rating tokens. An earlier zero-shot prompt did no better than chance, hence the rated examples. The SLM is a
# weak judge: coherence is one term among fluency, task score and penalties (which carry the anti-hacking checks
# below), and `rewards.judge_model` can name a stronger local model.

# %% [markdown]
# Neither batching nor the shared prefix changes the result: each answer rated alone (batch of one, no padding)
# and the whole prompt run from scratch (no reused prefix) give the same score as the left-padded batch, up to
# bf16 rounding.

# %%
import torch
_alone = Judge(load_config(overrides=["rewards.judge_cache="]), model, tok, batch_size=1)
_js1 = _alone.score(_answers[:1], [_req['prompt']])
for a, b in zip(_js1, _js[:1]): test_close(a.score, b.score, eps=0.03)
_full = _alone._rows(*((lambda s: (torch.tensor([s]), torch.ones((1, len(s)), dtype=torch.long), torch.arange(len(s))[None]))(judge.prompt_ids(_req['prompt'], _answers[0], 0))))
test_close(_full[0], judge.rating_probs([judge.prompt_ids(_req['prompt'], _answers[0], 0)])[0], eps=0.02)
[(round(a.score, 4), round(b.score, 4)) for a, b in zip(_js1, _js[:1])]

# %% [markdown]
# ## 4. Task scores
# The official metrics, re-implemented from their definitions:
#
# - **SQuAD v1.1** (`evaluate-v1.1.py`): answers are normalised (lower-case, punctuation removed, the articles
#   *a/an/the* removed, whitespace collapsed); EM is 1 when the normalised prediction equals a normalised
#   reference; F1 is the token-overlap F1 (bag of tokens); both take the max over the references.
# - **NQ-Open**: exact match after the same normalisation, max over the answers.
# - **GSM8K**: the predicted number is the first number after the last "The answer is" (the prompt asks for that
#   form) or, failing that, the last number in the answer; thousands separators removed; it is right when it
#   equals the reference number.

# %%
#| export
def normalize_answer(s:str) -> str:
    "SQuAD v1.1 normalisation: lower-case, no punctuation, no articles, single spaces."
    s = s.lower()
    s = ''.join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r'\b(a|an|the)\b', ' ', s)
    return ' '.join(s.split())

def _f1(pred:str, ref:str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    same = sum((collections.Counter(p) & collections.Counter(r)).values())
    if same == 0: return 0.0
    prec, rec = same / len(p), same / len(r)
    return 2 * prec * rec / (prec + rec)

def squad_em(pred:str, refs:list[str]) -> float:
    "SQuAD exact match, max over references."
    return float(max(normalize_answer(pred) == normalize_answer(r) for r in refs))

def squad_f1(pred:str, refs:list[str]) -> float:
    "SQuAD token F1, max over references."
    return max(_f1(pred, r) for r in refs)

# %% [markdown]
# Checked on three real evaluation items against values worked out by hand from the definition:
#
# - `It airs from 7:00 to 9:00 a.m.` normalises to `it airs from 700 to 900 am` (7 tokens). Against the reference
#   `7:00 to 9:00 a.m` (`700 to 900 am`, 4 tokens) all 4 tokens are shared: P = 4/7, R = 1, F1 = 8/11; against
#   `7:00 to 9:00 a.m. weekdays` (5 tokens) F1 = 2/3; the max is 8/11. EM = 0.
# - `Lessig` against `Alan Dershowitz and Lawrence Lessig`: P = 1, R = 1/5, F1 = 1/3.
#   `The Lawrence Lessig.` -> `lawrence lessig`: P = 1, R = 2/5, F1 = 4/7.
# - `the rotation` -> `rotation`, equal to the reference `rotation`: EM = 1. `rotational inertia of the body`
#   -> `rotational inertia of body` against `rotational inertia`: P = 2/4, R = 1, F1 = 2/3 (the other references
#   give 1/4 and 1/5).

# %%
_sq = {it['id']: it for it in load_task_items(cfg, 'squad', 'eval', n=3, seed=0)}
_tv, _hv, _rot = (_sq['572764855951b619008f8953'], _sq['5727e21e4b864d1900163f35'], _sq['5737a4511c456719005744df'])
test_eq(_tv['references'], ['7:00 to 9:00 a.m. weekdays', '7:00 to 9:00 a.m', '7:00 to 9:00 a.m.'])
test_eq(normalize_answer("It airs from 7:00 to 9:00 a.m."), 'it airs from 700 to 900 am')
test_close(squad_f1("It airs from 7:00 to 9:00 a.m.", _tv['references']), 8/11, eps=1e-12)
test_eq(squad_em("It airs from 7:00 to 9:00 a.m.", _tv['references']), 0.0)
test_eq((squad_em("7:00 to 9:00 A.M.", _tv['references']), squad_f1("7:00 to 9:00 A.M.", _tv['references'])), (1.0, 1.0))
test_close(squad_f1("Lessig", _hv['references']), 1/3, eps=1e-12)
test_close(squad_f1("The Lawrence Lessig.", _hv['references']), 4/7, eps=1e-12)
test_eq(squad_em("the rotation", _rot['references']), 1.0)
test_close(squad_f1("rotational inertia of the body", _rot['references']), 2/3, eps=1e-12)
test_eq(squad_f1("", _hv['references']), 0.0)
squad_f1("It airs from 7:00 to 9:00 a.m.", _tv['references'])

# %%
#| export
_NUM = re.compile(r'-?\d[\d,]*(?:\.\d+)?')

def gsm8k_extract(text:str) -> str|None:
    "The predicted GSM8K number: first number after the last 'The answer is', else the last number; commas removed."
    m = list(re.finditer(r'the answer is', text, flags=re.I))
    nums = _NUM.findall(text[m[-1].end():]) if m else []
    nums = nums[:1] or _NUM.findall(text)[-1:]
    return nums[0].replace(',', '') if nums else None

def _as_number(s:str|None) -> float|None:
    try: return float(s.replace(',', '').rstrip('.')) if s is not None else None
    except ValueError: return None

def gsm8k_acc(pred:str, refs:list[str]) -> float:
    "1.0 when the predicted final number equals a reference number."
    p = _as_number(gsm8k_extract(pred))
    return float(p is not None and any(p == _as_number(r) for r in refs))

def nq_em(pred:str, refs:list[str]) -> float:
    "NQ-Open exact match after SQuAD normalisation, max over answers."
    return squad_em(pred, refs)

# %% [markdown]
# GSM8K and NQ-Open on real evaluation items (`4`, `85`, `50`; `Hugo von Mohl`, `September 4, 2000`):

# %%
_g = load_task_items(cfg, 'gsm8k', 'eval', n=3, seed=0)
test_eq([it['references'] for it in _g], [['4'], ['85'], ['50']])
test_eq(gsm8k_acc("He needs 8 more inches, which takes 4 years. The answer is 4.", _g[0]['references']), 1.0)
test_eq(gsm8k_acc("The answer is 4 years, since 48 - 40 = 8.", _g[0]['references']), 1.0)   # after 'The answer is'
test_eq(gsm8k_acc("Adam needs 48 inches.", _g[0]['references']), 0.0)                          # last number: 48
test_eq(gsm8k_acc("So he has $1,085. The answer is $85.00.", _g[1]['references']), 1.0)
test_eq(gsm8k_acc("She spends 50% of 12 hours, that is 6 hours", _g[2]['references']), 0.0)   # last number: 6
test_eq(gsm8k_acc("I do not know.", _g[2]['references']), 0.0)
test_eq([gsm8k_extract(s) for s in ("It costs 1,250 dollars.", "The answer is -3.5", "none")], ['1250', '-3.5', None])
_nq = load_task_items(cfg, 'nq_open', 'eval', n=3, seed=0)
test_eq(_nq[0]['references'], ['Hugo von Mohl', 'German botanist Hugo von Mohl'])
test_eq([nq_em(p, _nq[0]['references']) for p in ("Hugo von Mohl.", "Mohl", "the German botanist Hugo von Mohl")], [1.0, 0.0, 1.0])
test_eq([nq_em(p, _nq[1]['references']) for p in ("september 4 2000", "It first aired on September 4, 2000.")], [1.0, 0.0])

# %% [markdown]
# `task_score(item, text)` gives the metrics of an item's task; the reward's task term is the task's primary
# metric (`TASK_PRIMARY`: SQuAD F1, GSM8K accuracy, NQ-Open EM). WikiText continuations have no task metric.

# %%
#| export
TASK_PRIMARY = dict(squad='f1', gsm8k='acc', nq_open='em')

def task_score(item:dict, # a task item (`task`, `references`)
               text:str, # the answer
              ) -> dict[str, float]:
    "Task metrics of `text` for `item`: squad {em, f1}, gsm8k {acc}, nq_open {em}, wikitext {}."
    task = item.get('task') if isinstance(item, dict) else None
    if task not in TASKS: raise ValueError(f"item['task'] is {task!r}; a task item needs one of {list(TASKS)} (see load_task_items).")
    if task == 'wikitext': return {}
    refs = item.get('references') or []
    if not refs: raise ValueError(f"item {item.get('id')!r} has no references; item['references'] must list the gold answers.")
    if task == 'squad': return dict(em=squad_em(text, refs), f1=squad_f1(text, refs))
    if task == 'gsm8k': return dict(acc=gsm8k_acc(text, refs))
    return dict(em=nq_em(text, refs))

# %%
test_eq(task_score(_tv, "7:00 to 9:00 a.m"), dict(em=1.0, f1=1.0))
test_eq(task_score(_g[1], "The answer is 85."), dict(acc=1.0))
test_eq(task_score(_nq[0], "Mohl"), dict(em=0.0))
test_eq(task_score(load_task_items(cfg, 'wikitext', 'eval', n=1)[0], "anything"), {})
test_fail(lambda: task_score({'task': 'trivia', 'references': ['x']}, 'x'), contains="item['task']")
test_fail(lambda: task_score({'id': 'q1', 'task': 'squad', 'references': []}, 'x'), contains="no references")
task_score(_hv, "The Lawrence Lessig.")

# %% [markdown]
# ## 5. Penalties
# Three penalties, each in [0, 1] (subtracted with their weights):
#
# - **length**: with `n` tokens, `(min_tokens - n) / min_tokens` below `rewards.min_tokens` (1 for an empty answer),
#   0 up to `rewards.target_tokens`, then growing linearly to 1 at twice the target;
# - **repetition**: the n-gram repeat rate `1 - distinct / total` over the answer's words
#   (`n = rewards.repetition_ngram`), 0 for text shorter than n words;
# - **unclosed thought**: 1 when the episode ended inside a hidden thought.

# %%
#| export
_WORD = re.compile(r"\w+(?:['’]\w+)*")

def length_penalty(n_tokens:int, target:int, min_tokens:int) -> float:
    "0 between `min_tokens` and `target` tokens; linear to 1 for an empty answer and at twice the target."
    if n_tokens < 0: raise ValueError(f"n_tokens must be >= 0, got {n_tokens}.")
    if n_tokens < min_tokens: return (min_tokens - n_tokens) / min_tokens
    return float(min(1.0, max(0, n_tokens - target) / target))

def repetition_rate(text:str, n:int=3) -> float:
    "Share of repeated word n-grams: 1 - distinct/total (0 when shorter than n words)."
    w = _WORD.findall(text.lower())
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0

# %%
test_eq([length_penalty(n, 48, 2) for n in (0, 1, 2, 48, 72, 96, 500)], [1.0, 0.5, 0.0, 0.0, 0.5, 1.0, 1.0])
test_eq(repetition_rate("a b c a b c a b c", 3), 1 - 3/7)
test_eq(repetition_rate("the cat sat on the mat", 3), 0.0)
test_eq(repetition_rate("too short", 3), 0.0)
test_fail(lambda: length_penalty(-1, 48, 2), contains='n_tokens must be')
repetition_rate("of the city of the city of the city of the city", 3)

# %% [markdown]
# ## 6. `RewardCalculator`
# The reward is a list of **terms**, ordered callbacks with a `name`, an `order`, a `kind` (`'bonus'` or
# `'penalty'`) and `__call__(ctx) -> float in [0, 1]` (or `None` when the term does not apply, e.g. the task term
# without a task item). A term may also have `batch(ctxs) -> list` (the judge does: one batched forward for all
# answers). Weights come from `rewards.w_<name>` (or the term's own `weight` attribute):
#
# $$\text{total} = \sum_{\text{bonus } b \text{ that apply}} \tilde w_b\, v_b \;-\; \sum_{\text{penalties } p} w_p\, v_p, \qquad
# \tilde w_b = w_b \frac{\sum_{\text{all bonus}} w}{\sum_{\text{bonus that apply}} w}$$
#
# so when a bonus term does not apply (a free prompt or a WikiText continuation has no task score) the other
# bonus weights are scaled up and the total keeps its range
# **[-(w_length + w_repetition + w_unclosed_thought), w_fluency + w_coherence + w_task]** (by default [-2.5, 4]),
# which is what self-play maps onto [-1, 1]. `RewardBreakdown` keeps every term value, the weights used and
# diagnostics (the judge's variance over paraphrases, the raw KenLM log-probability, the token count).

# %%
#| export
@dataclass
class RewardContext:
    "What a reward term sees: the answer, its item, tokens spent, thought state, and diagnostics to fill."
    text: str
    item: dict|None
    n_tokens: int
    unclosed_thought: bool
    info: dict = field(default_factory=dict)

@dataclass
class RewardBreakdown:
    "A reward total and every term that made it (values in [0, 1]; `weights` signed: penalties negative)."
    total: float
    terms: dict
    weights: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    @property
    def contributions(self) -> dict:
        "Each term's signed, weighted share of the total."
        return {k: self.weights[k] * v for k, v in self.terms.items()}
    def __repr__(self):
        return f"RewardBreakdown(total={self.total:.4f}, terms={{{', '.join(f'{k}: {v:.4f}' for k, v in self.terms.items())}}})"

class RewardTerm:
    "Base of the built-in reward terms: name, order, kind and the config weight `rewards.w_<name>`."
    name, order, kind = 'term', 0, 'bonus'
    def weight(self, cfg:Config) -> float: return float(getattr(cfg.rewards, f'w_{self.name}'))
    def batch(self, ctxs:list[RewardContext]) -> list: return [self(c) for c in ctxs]
    def __repr__(self): return f"{type(self).__name__}(order={self.order})"

# %% [markdown]
# The six built-in terms:

# %%
#| export
class FluencyTerm(RewardTerm):
    "KenLM fluency of the answer."
    name, order = 'fluency', 10
    def __init__(self, cfg:Config): self.flu = Fluency(cfg)
    def __call__(self, ctx:RewardContext) -> float:
        ctx.info['lm_logprob_per_token'] = self.flu.mean_logprob(ctx.text)
        return self.flu(ctx.text)

class CoherenceTerm(RewardTerm):
    "G-Eval coherence judge (the request is the item's prompt; free text is judged alone)."
    name, order = 'coherence', 20
    def __init__(self, cfg:Config, model=None, tok=None): self.cfg, self._mt, self._judge = cfg, (model, tok), None
    @property
    def judge(self) -> Judge:
        "The judge, built on first use (it loads the SLM if none was given)."
        if self._judge is None: self._judge = Judge(self.cfg, *self._mt)
        return self._judge
    def batch(self, ctxs:list[RewardContext]) -> list[float]:
        js = self.judge.score([c.text for c in ctxs], [(c.item or {}).get('prompt') for c in ctxs])
        for c, j in zip(ctxs, js): c.info.update(coherence_var=j.var, judge_ratings=j.ratings, judge_digit_mass=j.digit_mass)
        return [j.score for j in js]
    def __call__(self, ctx:RewardContext) -> float: return self.batch([ctx])[0]

class TaskTerm(RewardTerm):
    "The task's primary metric (SQuAD F1, GSM8K accuracy, NQ-Open EM); None without a scored task."
    name, order = 'task', 30
    def __call__(self, ctx:RewardContext) -> float|None:
        if not ctx.item or ctx.item.get('task') not in TASK_PRIMARY: return None
        m = task_score(ctx.item, ctx.text); ctx.info['task_metrics'] = m
        return m[TASK_PRIMARY[ctx.item['task']]]

class LengthPenalty(RewardTerm):
    "Brevity below `min_tokens`, excess beyond `target_tokens`."
    name, order, kind = 'length', 40, 'penalty'
    def __init__(self, cfg:Config): self.cfg = cfg
    def __call__(self, ctx:RewardContext) -> float:
        # an answer with no visible text is empty however many (thought) tokens it spent
        n = ctx.n_tokens if ctx.text.strip() else 0
        return length_penalty(n, self.cfg.rewards.target_tokens, self.cfg.rewards.min_tokens)

class RepetitionPenalty(RewardTerm):
    "Word n-gram repeat rate."
    name, order, kind = 'repetition', 50, 'penalty'
    def __init__(self, cfg:Config): self.n = cfg.rewards.repetition_ngram
    def __call__(self, ctx:RewardContext) -> float: return repetition_rate(ctx.text, self.n)

class UnclosedThoughtPenalty(RewardTerm):
    "1 when the episode ended inside a hidden thought."
    name, order, kind = 'unclosed_thought', 60, 'penalty'
    def __call__(self, ctx:RewardContext) -> float: return float(ctx.unclosed_thought)

def default_terms(cfg:Config, model=None, tok=None) -> list:
    "The built-in terms whose weight is not zero."
    r = cfg.rewards
    terms = [FluencyTerm(cfg) if r.w_fluency else None, CoherenceTerm(cfg, model, tok) if r.w_coherence else None,
             TaskTerm() if r.w_task else None, LengthPenalty(cfg) if r.w_length else None,
             RepetitionPenalty(cfg) if r.w_repetition else None, UnclosedThoughtPenalty() if r.w_unclosed_thought else None]
    return [t for t in terms if t is not None]

# %% [markdown]
# `RewardCalculator` runs the terms in `order`. `calc(text, item, n_tokens, unclosed_thought)` scores one answer;
# `calc.batch(texts, items, n_tokens, unclosed)` scores many, with one judge pass for all of them. `n_tokens` is
# what the episode spent (the engine's count, thoughts and resamples included); `None` counts the answer's own
# SLM tokens. The calculator itself is callable like `calc`, and its `bounds` is the total's range, so it can be
# handed to self-play as the reward function.

# %%
#| export
class _Calc:
    "`calc(...)` scores one answer; `calc.batch(...)` many."
    def __init__(self, rc): self.rc = rc
    def __call__(self, text:str, item:dict|None=None, n_tokens:int|None=None, unclosed_thought:bool=False) -> RewardBreakdown:
        return self.rc._run([text], [item], [n_tokens], [unclosed_thought])[0]
    def batch(self, texts:list[str], items:list|None=None, n_tokens:list|None=None, unclosed:list|None=None) -> list[RewardBreakdown]:
        n = len(texts)
        items, n_tokens, unclosed = items or [None] * n, n_tokens or [None] * n, unclosed or [False] * n
        if not len(items) == len(n_tokens) == len(unclosed) == n:
            raise ValueError(f"calc.batch got {n} texts but {len(items)} items, {len(n_tokens)} n_tokens, {len(unclosed)} unclosed flags.")
        return self.rc._run(list(texts), list(items), list(n_tokens), list(unclosed))

class RewardCalculator:
    "Scores a finished answer with ordered reward terms and configured weights; keeps every term."
    def __init__(self, cfg:Config, # `rewards` weights and settings
                 model=None, tok=None, # the SLM (judge and token counts); None = `load_slm(cfg)` when first needed
                 callbacks:list|None=None, # reward terms; None = `default_terms(cfg, model, tok)`
                ):
        self.cfg, self.model, self._tok = cfg, model, tok
        terms = default_terms(cfg, model, tok) if callbacks is None else list(callbacks)
        for t in terms:
            for a in ('name', 'order'):
                if not hasattr(t, a): raise TypeError(f"reward callback {t!r} has no `{a}`; a term needs name, order and __call__(ctx).")
            if getattr(t, 'kind', 'bonus') not in ('bonus', 'penalty'): raise ValueError(f"reward term {t.name!r}: kind must be 'bonus' or 'penalty'.")
        if len({t.name for t in terms}) != len(terms): raise ValueError(f"reward term names must be unique, got {[t.name for t in terms]}.")
        self.terms = sorted(terms, key=lambda t: t.order)
        self.weights = {t.name: self._weight(t) for t in self.terms}
        self.kinds = {t.name: getattr(t, 'kind', 'bonus') for t in self.terms}
        self.calc = _Calc(self)
    def _weight(self, t) -> float:
        w = getattr(t, 'weight', None)
        if callable(w): w = w(self.cfg)
        if w is None and hasattr(self.cfg.rewards, f'w_{t.name}'): w = getattr(self.cfg.rewards, f'w_{t.name}')
        if w is None: raise ValueError(f"reward term {t.name!r} has no weight: give it a `weight` attribute or set rewards.w_{t.name}.")
        if not (math.isfinite(w) and w >= 0): raise ValueError(f"weight of reward term {t.name!r} must be a finite number >= 0, got {w}.")
        return float(w)
    @property
    def bounds(self) -> tuple[float, float]:
        "(lowest, highest) total: minus the penalty weights, plus the bonus weights."
        return (-sum(w for k, w in self.weights.items() if self.kinds[k] == 'penalty'),
                sum(w for k, w in self.weights.items() if self.kinds[k] == 'bonus'))
    @property
    def tok(self):
        "The tokenizer that counts answer tokens (the SLM's)."
        if self._tok is None:
            from research_controller.slm import load_slm
            self.model, self._tok = load_slm(self.cfg)
        return self._tok
    def __call__(self, text:str, item:dict|None=None, n_tokens:int|None=None, unclosed_thought:bool=False) -> RewardBreakdown:
        return self.calc(text, item, n_tokens, unclosed_thought)
    def __repr__(self): return f"RewardCalculator({', '.join(f'{k}={w:g}' for k, w in self.weights.items())}; bounds={self.bounds})"

# %%
#| export
@patch
def _run(self:RewardCalculator, texts, items, n_tokens, unclosed) -> list[RewardBreakdown]:
    "Run every term over all answers (terms with `batch` see them all at once) and combine them."
    ctxs = []
    for t, it, n, u in zip(texts, items, n_tokens, unclosed):
        if not isinstance(t, str): raise TypeError(f"reward text must be a str, got {type(t).__name__}.")
        if n is None: n = len(self.tok(t, add_special_tokens=False)['input_ids']) if t else 0
        ctxs.append(RewardContext(t, it, int(n), bool(u), {'n_tokens': int(n)}))
    vals = {}
    for term in self.terms:
        vs = term.batch(ctxs) if hasattr(term, 'batch') else [term(c) for c in ctxs]
        for v in vs:
            if v is not None and not (0 <= v <= 1): raise ValueError(f"reward term {term.name!r} returned {v}; terms must be in [0, 1] (or None).")
        vals[term.name] = vs
    bonus_all = sum(w for k, w in self.weights.items() if self.kinds[k] == 'bonus')
    out = []
    for i, c in enumerate(ctxs):
        terms = {k: float(v[i]) for k, v in vals.items() if v[i] is not None}
        live = sum(self.weights[k] for k in terms if self.kinds[k] == 'bonus')
        scale = bonus_all / live if live > 0 else 0.0
        w = {k: (self.weights[k] * scale if self.kinds[k] == 'bonus' else -self.weights[k]) for k in terms}
        out.append(RewardBreakdown(float(sum(w[k] * terms[k] for k in terms)), terms, w, c.info))
    return out

@patch
def task_metrics(self:RewardCalculator, text:str, item:dict|None) -> dict[str, float]:
    "Task metrics for evaluation: squad {em, f1}, gsm8k {acc}, nq_open {em}, wikitext or no item {}."
    return task_score(item, text) if item else {}

# %% [markdown]
# With cheap terms only (no judge), every term is checked against its own function, and the no-item
# renormalisation keeps the weights' sum:

# %%
rc0 = RewardCalculator(cfg, model, tok, callbacks=[t for t in default_terms(cfg, model, tok) if t.name != 'coherence'])
_it = _nq[0]
_rb = rc0.calc("Hugo von Mohl.", _it)
test_eq(_rb.terms['task'], 1.0)
test_close(_rb.terms['fluency'], flu("Hugo von Mohl."), eps=1e-9)
test_eq(_rb.info['n_tokens'], len(tok("Hugo von Mohl.", add_special_tokens=False)['input_ids']))
test_close(_rb.total, 1.0 * _rb.terms['fluency'] + 2.0 * 1.0 - 0.5 * _rb.terms['length'], eps=1e-9)
_free = rc0.calc("Hugo von Mohl.")  # no item: no task term, fluency carries all 3 bonus points
test_eq('task' in _free.terms, False)
test_close(_free.weights['fluency'], 3.0, eps=1e-9)
test_eq(rc0.bounds, (-2.5, 3.0))
test_eq(rc0.calc("", _it, n_tokens=30).terms['length'], 1.0)  # thought tokens spent, nothing visible: still empty
_pen = rc0.calc("the city of the city of the city of the city", _it, n_tokens=96, unclosed_thought=True)
test_eq((_pen.terms['length'], _pen.terms['unclosed_thought']), (1.0, 1.0))
test_close(_pen.terms['repetition'], repetition_rate("the city of the city of the city of the city", 3), eps=1e-12)
test_eq(rc0.task_metrics("Mohl", _it), {'em': 0.0})
test_eq(rc0.task_metrics("x", None), {})
test_eq([b.total for b in rc0.calc.batch(["Hugo von Mohl.", "no"], [_it, _it])], [_rb.total, rc0.calc("no", _it).total])
test_fail(lambda: rc0.calc.batch(["a", "b"], [_it]), contains='2 texts but 1 items')
_rb

# %% [markdown]
# A custom term is any object with `name`, `order`, `kind` and `__call__`; its weight comes from a `weight`
# attribute when the config has no `w_<name>`. Bad terms fail with an error that says what is missing:

# %%
class Politeness:
    name, order, kind, weight = 'politeness', 70, 'bonus', 0.5
    def __call__(self, ctx): return float('please' in ctx.text.lower())
rcp = RewardCalculator(cfg, model, tok, callbacks=[Politeness(), UnclosedThoughtPenalty()])
test_eq(rcp.calc("yes please").total, 0.5)
test_eq(rcp.calc("yes please", unclosed_thought=True).total, -0.5)
class _NoWeight: name, order = 'mystery', 1
test_fail(lambda: RewardCalculator(cfg, model, tok, callbacks=[_NoWeight()]), contains='rewards.w_mystery')
class _Bad(Politeness): name = 'bad'; __call__ = lambda self, ctx: 2.0
test_fail(lambda: RewardCalculator(cfg, model, tok, callbacks=[_Bad()]).calc('x'), contains='must be in [0, 1]')
rcp

# %% [markdown]
# A missing KenLM model is an error at construction time, never a silent constant:

# %%
test_fail(lambda: RewardCalculator(load_config(overrides=['rewards.kenlm_path=no/such.bin']), model, tok), contains='rc build-lm')

# %% [markdown]
# ## 7. Anti-hacking checks on real items
# The full calculator (real SLM as judge) on real evaluation items: the reference answer against three answers a
# controller could learn to produce if the reward let it: a degenerate repetition, an empty answer, and a long
# rambling answer that contains the reference somewhere in the middle. Each must score below the reference.

# %%
rc = RewardCalculator(jcfg, model, tok)
def _ramble(ref, rng):
    filler = [it['references'][0] for it in load_task_items(cfg, 'wikitext', 'train', n=3, seed=rng)]
    words = ' '.join(filler).split()
    return ' '.join(words[:60]) + f" Anyway, {ref}, " + ' '.join(words[60:120])
_items = [load_task_items(cfg, 'nq_open', 'eval', n=1, seed=5)[0], load_task_items(cfg, 'gsm8k', 'eval', n=1, seed=5)[0]]
def _reference(it):
    if it['task'] == 'gsm8k':  # the worked solution, calculator notes removed, ending the way the prompt asks
        return re.sub(r'<<[^>]*>>', '', it['meta']['solution'].rsplit('####', 1)[0]).strip() + f" The answer is {it['references'][0]}."
    return it['references'][0] + '.'
def _anti_hacking(items):
    "Score reference, repeated, empty and rambling answers of each item; check each bad one is below its reference."
    rows, texts, its = [], [], []
    for k, it in enumerate(items):
        ref = _reference(it)
        for kind, text in [('reference', ref), ('repeated', ' '.join([ref.split()[0]] * 40)), ('empty', ''), ('rambling', _ramble(ref, k))]:
            rows.append((it['task'], kind)); texts.append(text); its.append(it)
    t0 = time.time(); bd = rc.calc.batch(texts, its); dt = time.time() - t0
    tab = pd.DataFrame([dict(item=f"{t}:{it['id'][:14]}", answer=k, total=round(b.total, 3), **{n: round(v, 3) for n, v in b.terms.items()},
                             judge_var=round(b.info.get('coherence_var', 0.0), 4)) for (t, k), it, b in zip(rows, its, bd)])
    for _, g in tab.groupby('item', sort=False):
        ref = g[g.answer == 'reference'].total.item()
        for k in ('repeated', 'empty', 'rambling'): test_eq(g[g.answer == k].total.item() < ref, True)
    print(f"{len(texts)} answers scored in {dt:.1f}s")
    return tab
import pandas as pd
_anti_hacking(_items)

# %% [markdown]
# The same on more items, SQuAD included (`slow`: about a minute of judge forwards on 2 cores):

# %%
#| slow
_anti_hacking(load_task_items(cfg, 'squad', 'eval', n=2, seed=5) + load_task_items(cfg, 'nq_open', 'eval', n=2, seed=6)
              + load_task_items(cfg, 'gsm8k', 'eval', n=2, seed=6))
