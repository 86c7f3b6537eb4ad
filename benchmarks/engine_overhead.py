"""Engine overhead on the real SLM (bf16 on CPU), measured side by side in one run.

Four ratios (interleaved repetitions, medians), each against its issue target:
  a. CONTINUE-only controlled generation tokens/s vs greedy `model.generate` (KV cache) on the same
     prompts and model                                                       target >= 0.9x
  b. tokens forwarded / (tokens in the final sequences + resampled-away chunks) on a RESAMPLE-heavy run,
     from `engine.counters` (single-state and batched; padding rows reported apart)  target <= 1.02
  c. `fork()` of a 512-token state vs one decode step                          target < 5%
  d. one batched step of 8 states vs the same 8 states stepped one by one (tokens/s)  target >= 2x
  e. single-stream controlled decoding (the engine's greedy controller) vs llama.cpp on the same GGUF file and
     prompts (3 short chat prompts, `--tokens` greedy tokens, prompt processing included, same thread count)
                                                                             target >= 0.5x
     (needs the optional `llama-cpp-python` package, built from its source distribution; skipped without it:
      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX2=ON -DGGML_FMA=ON
      -DGGML_F16C=ON -DGGML_AMX_INT8=OFF" pip install llama-cpp-python==0.3.36   (a native build segfaults here))

Usage:  python benchmarks/engine_overhead.py [--reps 3] [--threads 2] [--tokens 64] [--only abcde]
        [--out benchmarks/results/engine_overhead.json] [--set key=value ...]
Writes the numbers as JSON (atomically) and prints a table. Needs the default SLM (cached by `load_slm`).
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, sys, tempfile, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import torch

PROMPTS = ["Explain why the sky is blue in a few sentences.",
           "Write a short story about a lighthouse keeper.",
           "What are the main causes of the French Revolution?",
           "Describe how a bicycle works.",
           "Give three tips for learning a new language.",
           "What is photosynthesis?",
           "Summarise the plot of Romeo and Juliet.",
           "How do vaccines train the immune system?"]


def _med(xs): return statistics.median(xs)


def bench_generate_vs_engine(model, tok, eng, cfg, n_tokens, reps):
    "(a) tokens/s of greedy model.generate and of CONTINUE-only engine generation, interleaved per prompt and rep."
    from research_controller.slm import encode_prompt
    from research_controller.macro_actions import Action
    gen_tps, eng_tps, agree = [], [], []
    prompts = PROMPTS[:4]
    for r in range(reps):
        gt = gn = et = en = 0
        for p in prompts:
            ids = torch.tensor([encode_prompt(tok, p, cfg)])
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            gt += time.perf_counter() - t; gn += out.shape[1] - ids.shape[1]
            t = time.perf_counter()
            s = eng.new_state(p, max_new_tokens=n_tokens, temperature=0.0)
            while not eng.is_done(s): eng.step(s, Action.CONTINUE)
            et += time.perf_counter() - t; en += eng.tokens_spent(s)
            if r == 0:
                g = out[0, ids.shape[1]:].tolist(); e = list(s.tip.gen_ids())
                n = next((i for i, (x, y) in enumerate(zip(g, e)) if x != y), min(len(g), len(e)))
                agree.append(n)
        gen_tps.append(gn / gt); eng_tps.append(en / et)
    return dict(generate_tok_s=_med(gen_tps), engine_tok_s=_med(eng_tps), ratio=_med(eng_tps) / _med(gen_tps),
                reps_generate=gen_tps, reps_engine=eng_tps, identical_prefix_tokens=agree, target='>= 0.9')


def bench_resample(eng, cfg, n_tokens, batch):
    "(b) forwarded tokens over needed tokens on a RESAMPLE-heavy run (every chunk resampled as often as allowed)."
    from research_controller.macro_actions import Action
    states = eng.new_states(PROMPTS[:batch], max_new_tokens=n_tokens, seed=list(range(batch)), temperature=0.7)
    c0 = dict(eng.counters)
    n_resample = 0
    while True:
        live = [s for s in states if not eng.is_done(s)]
        if not live: break
        acts = [Action.RESAMPLE if eng.legal_mask(s)[Action.RESAMPLE] else Action.CONTINUE for s in live]
        n_resample += sum(a == Action.RESAMPLE for a in acts)
        if batch == 1:
            for s, a in zip(live, acts): eng.step(s, a)
        else: eng.step_batch(live, acts)
    d = {k: eng.counters[k] - c0[k] for k in c0}
    kept = sum(s.ms.kept for s in states)
    needed = sum(eng.tokens_spent(s) for s in states)  # kept + every resampled-away chunk
    return dict(batch=batch, forwarded=d['forwarded'], padded=d['padded'], kept=kept, resampled_away=needed - kept,
                needed=needed, resamples=int(n_resample), ratio=d['forwarded'] / needed,
                ratio_with_padding=(d['forwarded'] + d['padded']) / needed, target='<= 1.02')


def bench_fork(eng, cfg, reps):
    "(c) fork() of a 512-token state vs one decode step (one CONTINUE of one token, same state)."
    from research_controller.config import replace_config
    from research_controller.engine import Engine
    from research_controller.macro_actions import Action
    e1 = Engine(eng.model, eng.tok, replace_config(cfg, ['macro.chunk_tokens=1']))
    from research_controller.slm import encode_prompt
    words = ("the quick brown fox jumps over the lazy dog and keeps running through the quiet forest ") * 60
    extra = len(encode_prompt(e1.tok, "x", cfg)) - len(e1.tok("x", add_special_tokens=False)['input_ids'])  # chat template tokens
    ids = e1.tok(words, add_special_tokens=False)['input_ids'][:512 - extra - 1]
    s = e1.new_state(e1.tok.decode(ids), max_new_tokens=64)  # one prefill of ~511 tokens
    while s.tip.end < 512: e1.step(s, Action.CONTINUE)
    n_fork = 2000
    fork_s, step_s, asm_s = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n_fork): e1.fork(s)
        fork_s.append((time.perf_counter() - t) / n_fork)
        k = e1.fork(s)
        t = time.perf_counter(); e1.step(k, Action.CONTINUE); step_s.append(time.perf_counter() - t)
        # what a chunk pays once (fork or not): copying the 512-token prefix into the batch buffer
        t = time.perf_counter()
        buf = torch.empty(e1.n_layers, 2, 1, e1.n_kv, s.tip.end + 1, e1.head_dim, dtype=e1.dtype)
        for seg in s.tip.chain(): buf[:, :, 0, :, seg.start:seg.end] = seg.kv
        asm_s.append(time.perf_counter() - t)
    return dict(context_tokens=s.tip.end, fork_us=_med(fork_s) * 1e6, step_ms=_med(step_s) * 1e3,
                ratio=_med(fork_s) / _med(step_s), prefix_copy_ms=_med(asm_s) * 1e3,
                prefix_copy_vs_step=_med(asm_s) / _med(step_s), target='< 0.05')


def bench_batch(eng, cfg, n_tokens, reps, batch=8):
    "(d) tokens/s of one step_batch over `batch` states vs stepping the same states one by one."
    from research_controller.config import replace_config
    from research_controller.engine import Engine
    from research_controller.macro_actions import Action
    e = Engine(eng.model, eng.tok, replace_config(cfg, [f'macro.chunk_tokens={n_tokens}', f'engine.batch_size={batch}']))
    base = e.new_states(PROMPTS[:batch], max_new_tokens=n_tokens + 8, temperature=0.0)
    bt, st = [], []
    for _ in range(reps):
        A = [e.fork(s) for s in base]; t = time.perf_counter(); e.step_batch(A, [Action.CONTINUE] * batch)
        dt = time.perf_counter() - t; bt.append(sum(e.tokens_spent(s) for s in A) / dt)
        B = [e.fork(s) for s in base]; t = time.perf_counter()
        for s in B: e.step(s, Action.CONTINUE)
        dt = time.perf_counter() - t; st.append(sum(e.tokens_spent(s) for s in B) / dt)
    return dict(batch=batch, chunk_tokens=n_tokens, batched_tok_s=_med(bt), sequential_tok_s=_med(st),
                ratio=_med(bt) / _med(st), target='>= 2')


def bench_llama_cpp(eng, cfg, n_tokens, reps, threads):
    "(e) tokens/s of the engine's greedy controller and of llama.cpp on the same GGUF file and chat prompts, interleaved."
    try: from llama_cpp import Llama
    except ImportError: return dict(skipped="llama-cpp-python is not installed (an optional benchmark extra; see the docstring)")
    from research_controller.slm import resolve_source
    from research_controller.controllers import make_controller
    src = resolve_source(cfg.slm)
    if not str(src.path).endswith('.gguf'): return dict(skipped=f"slm.source={cfg.slm.source!r} is not a GGUF file")
    llm = Llama(model_path=str(src.path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    greedy = make_controller('greedy', cfg)
    prompts = PROMPTS[:3]
    msgs = lambda p: [dict(role='user', content=p)]
    llm.create_chat_completion(msgs("Warm up."), max_tokens=8, temperature=0.0)
    ll_tps, en_tps, ll_n, en_n = [], [], [], []
    for r in range(reps):
        lt = ln = et = en = 0
        for p in prompts:
            t = time.perf_counter()
            out = llm.create_chat_completion(msgs(p), max_tokens=n_tokens, temperature=0.0, top_k=1)
            lt += time.perf_counter() - t; ln += out['usage']['completion_tokens']
            llm.reset()  # no prompt cache carried to the next request: prompt processing is timed every time
            t = time.perf_counter()
            g = greedy.generate(eng, p, max_new_tokens=n_tokens)
            et += time.perf_counter() - t; en += g.tokens
        ll_tps.append(ln / lt); en_tps.append(en / et); ll_n.append(ln); en_n.append(en)
    return dict(gguf=Path(src.path).name, llama_cpp_tok_s=_med(ll_tps), engine_tok_s=_med(en_tps), ratio=_med(en_tps) / _med(ll_tps),
                reps_llama_cpp=ll_tps, reps_engine=en_tps, tokens_llama_cpp=ll_n, tokens_engine=en_n, threads=threads, target='>= 0.5')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--tokens', type=int, default=64, help="new tokens per generation in (a), (b) and (d)")
    ap.add_argument('--out', default='benchmarks/results/engine_overhead.json')
    ap.add_argument('--only', default='abcde', help="which measurements to run (subset of 'abcde')")
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help="config override")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from research_controller.config import load_config, config_hash
    from research_controller.slm import load_slm, model_fingerprint
    from research_controller.engine import Engine
    cfg = load_config(overrides=a.set)
    model, tok = load_slm(cfg)
    eng = Engine(model, tok, cfg)
    eng.step(eng.new_state("Warm up.", max_new_tokens=8), 0)  # first-call allocations out of the clock
    res = dict(model=cfg.slm.source, dtype=str(model.dtype), fingerprint=model_fingerprint(model), config_hash=config_hash(cfg),
               threads=a.threads, reps=a.reps, tokens=a.tokens, torch=torch.__version__, python=platform.python_version(),
               chunk_tokens=cfg.macro.chunk_tokens)
    def run(key, f, *args):
        t = time.perf_counter(); res[key] = f(*args)
        print(f"{key} ({time.perf_counter() - t:.0f} s): {json.dumps(res[key])}", flush=True)
    if 'a' in a.only: run('a_continue_vs_generate', bench_generate_vs_engine, model, tok, eng, cfg, a.tokens, a.reps)
    if 'b' in a.only:
        run('b_resample_forwarded', bench_resample, eng, cfg, a.tokens, 1)
        run('b_resample_forwarded_batched', bench_resample, eng, cfg, a.tokens, 8)
    if 'c' in a.only: run('c_fork_vs_step', bench_fork, eng, cfg, a.reps)
    if 'd' in a.only: run('d_batch8_vs_sequential', bench_batch, eng, cfg, min(a.tokens, 32), a.reps)
    if 'e' in a.only: run('e_single_stream_vs_llama_cpp', bench_llama_cpp, eng, cfg, a.tokens, a.reps, a.threads)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=out.parent, delete=False, suffix='.tmp') as f:
        json.dump(res, f, indent=2); tmp = f.name
    os.replace(tmp, out)
    rows = []
    if 'a_continue_vs_generate' in res:
        r = res['a_continue_vs_generate']
        rows.append(('a CONTINUE vs generate (tok/s)', f"{r['engine_tok_s']:.1f} vs {r['generate_tok_s']:.1f}", r['ratio'], '>= 0.9', r['ratio'] >= 0.9))
    for k in ('b_resample_forwarded', 'b_resample_forwarded_batched'):
        if k in res:
            r = res[k]
            rows.append((f"b forwarded/needed (batch {r['batch']})", f"{r['forwarded']}/{r['needed']} (+{r['padded']} pad)", r['ratio'], '<= 1.02', r['ratio'] <= 1.02))
    if 'c_fork_vs_step' in res:
        r = res['c_fork_vs_step']
        rows.append((f"c fork({r['context_tokens']} tok) vs step", f"{r['fork_us']:.1f} us vs {r['step_ms']:.1f} ms", r['ratio'], '< 0.05', r['ratio'] < 0.05))
    if 'd_batch8_vs_sequential' in res:
        r = res['d_batch8_vs_sequential']
        rows.append(('d batch 8 vs sequential (tok/s)', f"{r['batched_tok_s']:.1f} vs {r['sequential_tok_s']:.1f}", r['ratio'], '>= 2', r['ratio'] >= 2))
    r = res.get('e_single_stream_vs_llama_cpp')
    if r and 'skipped' not in r:
        rows.append(('e greedy controller vs llama.cpp (tok/s)', f"{r['engine_tok_s']:.1f} vs {r['llama_cpp_tok_s']:.1f}", r['ratio'], '>= 0.5', r['ratio'] >= 0.5))
    elif r: print(f"e skipped: {r['skipped']}")
    print(f"{'measure':36} {'values':34} {'ratio':>8}  target   met")
    for n, v, x, tg, ok in rows: print(f"{n:36} {v:34} {x:8.4f}  {tg:8} {'yes' if ok else 'NO'}")
    print(f"written: {out}")
    return res


if __name__ == '__main__': main()
