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
from platformdirs import user_cache_dir
from research_controller.config import Config, ConfigError, load_config, data_path, run_path, project_root, replace_config

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
# and the boost headers; `scripts/build_kenlm_tools.sh` installs those on Debian/Ubuntu and then calls
# `kenlm_tools`.

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

def build_kenlm_tools(cfg:Config, jobs:int|None=None) -> dict[str, Path]:
    "Download the kenlm sdist from PyPI and build `lmplz` and `build_binary` into the tools cache."
    d = kenlm_tools_dir(cfg); d.mkdir(parents=True, exist_ok=True)
    missing = [t for t in ('cmake', 'make', 'c++') if not shutil.which(t)]
    if missing: raise RuntimeError(f"building the KenLM tools needs {missing}. Fix (Debian/Ubuntu, as root): apt-get update && {KENLM_APT}")
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        tmp = Path(tmp)
        # --no-binary kenlm (not :all:, which would also compile cmake from source) and no build isolation
        _run([sys.executable, '-m', 'pip', 'download', KENLM_SDIST, '--no-deps', '--no-binary', 'kenlm',
              '--no-build-isolation', '-d', tmp], 'downloading the kenlm sdist (pip download)')
        sdist = next(tmp.glob('kenlm-*.tar.gz'))
        with tarfile.open(sdist) as tf: tf.extractall(tmp, filter='data')
        src = next(p for p in tmp.iterdir() if p.is_dir() and p.name.startswith('kenlm-'))
        bld = src/'build'; bld.mkdir()
        try:
            _run(['cmake', '..', '-DCMAKE_BUILD_TYPE=Release', '-DKENLM_MAX_ORDER=6'], 'cmake (configuring KenLM)', cwd=bld)
            _run(['make', f'-j{jobs or os.cpu_count() or 1}', *_TOOLS], 'make (compiling lmplz, build_binary)', cwd=bld)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nMost often the boost headers are missing. Fix (Debian/Ubuntu, as root): apt-get update && {KENLM_APT}") from None
        (d/'bin').mkdir(exist_ok=True)
        for t in _TOOLS:
            shutil.copy2(bld/'bin'/t, d/'bin'/f'.{t}.tmp'); os.replace(d/'bin'/f'.{t}.tmp', d/'bin'/t)
    return find_kenlm_tools(cfg)

def kenlm_tools(cfg:Config, build:bool=True) -> dict[str, Path]:
    "`lmplz` and `build_binary`: found, or built from the sdist when `build`."
    found = find_kenlm_tools(cfg)
    if found: return found
    if not build: raise FileNotFoundError(f"lmplz/build_binary not found (looked in $KENLM_BIN, {kenlm_tools_dir(cfg)/'bin'}, PATH). "
                                          "Fix: run scripts/build_kenlm_tools.sh, or call kenlm_tools(cfg, build=True).")
    return build_kenlm_tools(cfg)

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

def _sha256_file(p:Path) -> str:
    h = hashlib.sha256()
    with open(p, 'rb') as f:
        for b in iter(lambda: f.read(1 << 20), b''): h.update(b)
    return h.hexdigest()

def _atomic_write(p:Path, text:str):
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp"); tmp.write_text(text); os.replace(tmp, p)

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
        if all(old.get(k) == v for k, v in key.items()) and old.get('binary_sha256') == _sha256_file(out): return out
    tools = kenlm_tools(cfg, build=build_tools)
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
    meta = dict(**key, binary_sha256=_sha256_file(out), binary_bytes=out.stat().st_size,
                corpus_lines=corpus.count('\n'), corpus_tokens=len(corpus.split()), corpus_bytes=len(corpus.encode()),
                corpus_sources=('default: lm_corpus(cfg) = train-split WikiText-2 raw articles (valid+test files), '
                                'train-split SQuAD contexts, GSM8K train questions+solutions' if lines is None else 'custom lines'),
                eval_fraction=cfg.tasks.eval_fraction, kenlm=KENLM_SDIST,
                commands=[' '.join(map(rel, lmplz)) + ' < $TMP/corpus.txt > $TMP/model.arpa', ' '.join(map(rel, bb)),
                          f'mv $TMP/model.bin {out.name}'],
                seconds=dict(lmplz=round(t1 - t0, 2), build_binary=round(t2 - t1, 2)))
    _atomic_write(side, json.dumps(meta, indent=1) + '\n')
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
                                "(research_controller.rewards.build_lm(cfg)); lmplz/build_binary come from scripts/build_kenlm_tools.sh.")
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
