"""Load test of the HTTP service on the default SLM.

Starts a real `rc serve`-equivalent uvicorn server (`research_controller.serve.serve`) in a subprocess on
127.0.0.1 and a free port, then, for each concurrency level (default 1, 4 and 16 clients), sends a fixed
set of short requests (fixed prompts, seeds and max_new_tokens) from that many concurrent httpx clients
and measures requests/s, tokens/s and p50/p95 latency. Every response is checked (status 200, token count
within the budget, non-empty text). The levels run one after the other against the same server, after
one warm-up request. Also measures the time to the first streamed chunk (`/generate/stream`) at one client.

Two servers run side by side, interleaved per level: `batched` (concurrent requests' decoding steps merged
into one SLM call within serve.batch_window_ms=5) and `unbatched` (serve.batch_window_ms=0, the default).

Usage:  python benchmarks/serve_load.py [--levels 1 4 16] [--requests 16] [--max-new-tokens 16]
        [--controller threshold] [--variants batched unbatched] [--reps 2] [--out benchmarks/results/serve_load.json] [--set key=value ...]
`--set` passes config overrides to the server (e.g. --set serve.max_concurrency=8).
Writes the numbers as JSON (atomically) and prints a table. Needs the default SLM (cached by `load_slm`).
"""
from __future__ import annotations
import argparse, asyncio, json, os, platform, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1'); os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import httpx

PROMPTS = ["What is the capital of France?", "Explain photosynthesis in one sentence.", "Name three primary colours.",
           "Write a short greeting for a new colleague.", "What is 12 times 7?", "Why is the sky blue?",
           "Give one tip for learning a language.", "Describe a cat in a few words."]

SERVER = """
import sys, json, logging
logging.basicConfig(level=logging.WARNING)
from research_controller.config import load_config
from research_controller.serve import serve
serve(load_config(overrides=json.loads(sys.argv[1])), port=int(sys.argv[2]))
"""


def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def start_server(overrides:list, port:int, timeout_s:float=300.0) -> subprocess.Popen:
    "Start the server subprocess and wait until /health answers."
    p = subprocess.Popen([sys.executable, '-c', SERVER, json.dumps(overrides), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t = time.monotonic()
    while time.monotonic() - t < timeout_s:
        if p.poll() is not None: raise RuntimeError(f"server exited with {p.returncode}: {p.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f'http://127.0.0.1:{port}/health', timeout=2).status_code == 200: return p
        except httpx.HTTPError: pass
        time.sleep(0.5)
    p.kill(); raise RuntimeError(f"server did not answer /health within {timeout_s} s")


def check(resp:httpx.Response, budget:int) -> dict:
    "Check one response; returns its body."
    if resp.status_code != 200: raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:500]}")
    b = resp.json()
    if not (0 < b['tokens'] <= budget): raise RuntimeError(f"tokens={b['tokens']} outside (0, {budget}]")
    if not isinstance(b['text'], str): raise RuntimeError("text is not a string")
    return b


async def run_level(url:str, clients:int, reqs:list, budget:int, timeout_s:float) -> dict:
    "Send `reqs` from `clients` concurrent clients; latencies and wall time."
    q = asyncio.Queue()
    for r in reqs: q.put_nowait(r)
    lat, toks, empty = [], [], 0
    async def worker():
        nonlocal empty
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as c:
            while True:
                try: r = q.get_nowait()
                except asyncio.QueueEmpty: return
                t = time.perf_counter(); resp = await c.post('/generate', json=r); dt = time.perf_counter() - t
                b = check(resp, budget)
                lat.append(dt); toks.append(b['tokens']); empty += not b['text'].strip()
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(clients)])
    wall = time.perf_counter() - t0
    lat_ms = sorted(1000 * x for x in lat)
    pct = lambda p: lat_ms[min(len(lat_ms) - 1, int(round(p * (len(lat_ms) - 1))))]
    return dict(clients=clients, requests=len(lat), wall_s=round(wall, 3), req_per_s=round(len(lat) / wall, 3),
                tok_per_s=round(sum(toks) / wall, 2), p50_ms=round(statistics.median(lat_ms), 1), p95_ms=round(pct(0.95), 1),
                mean_tokens=round(statistics.mean(toks), 2), empty_texts=empty)


def first_chunk_ms(url:str, req:dict, timeout_s:float) -> dict:
    "Time to the first `chunk` event and to the `done` event of one streamed request."
    t = time.perf_counter(); first = None; n = 0
    with httpx.Client(base_url=url, timeout=timeout_s) as c, c.stream('POST', '/generate/stream', json=req) as r:
        if r.status_code != 200: raise RuntimeError(f"stream HTTP {r.status_code}")
        for line in r.iter_lines():
            if line.startswith('event: chunk'):
                n += 1
                if first is None: first = time.perf_counter() - t
            elif line.startswith('event: error'): raise RuntimeError("stream ended with an error event")
    return dict(first_chunk_ms=round(1000 * first, 1) if first is not None else None, total_ms=round(1000 * (time.perf_counter() - t), 1), chunks=n)


VARIANTS = {'batched': ['serve.batch_window_ms=5'], 'unbatched': ['serve.batch_window_ms=0']}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--levels', type=int, nargs='+', default=[1, 4, 16])
    ap.add_argument('--requests', type=int, default=16, help="requests per level (at least the number of clients)")
    ap.add_argument('--max-new-tokens', type=int, default=16)
    ap.add_argument('--controller', default='threshold')
    ap.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS),
                    help="server variants measured side by side (interleaved per level): batched = serve.batch_window_ms=5, unbatched = 0")
    ap.add_argument('--reps', type=int, default=2, help="repetitions of the whole sweep (variant order alternates; ratios pool all reps)")
    ap.add_argument('--timeout', type=float, default=600.0, help="client timeout per request (s)")
    ap.add_argument('--out', default='benchmarks/results/serve_load.json')
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as td:
        servers, procs = {}, []
        try:
            for v in a.variants:
                overrides = [f'paths.runs_dir={td}', f'serve.request_timeout_s={a.timeout}', *a.set, *VARIANTS[v]]
                port = free_port(); t = time.perf_counter(); procs.append(start_server(overrides, port))
                url = f'http://127.0.0.1:{port}'
                servers[v] = dict(url=url, startup_s=round(time.perf_counter() - t, 1), health=httpx.get(f'{url}/health').json(), levels=[])
                warm = dict(prompt=PROMPTS[0], max_new_tokens=a.max_new_tokens, controller=a.controller, seed=0)
                check(httpx.post(f'{url}/generate', json=warm, timeout=a.timeout), a.max_new_tokens)
            for rep in range(a.reps):
                for n in a.levels:
                    reqs = [dict(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=a.max_new_tokens, controller=a.controller, seed=i)
                            for i in range(max(a.requests, n))]
                    for v in (list(servers) if rep % 2 == 0 else list(servers)[::-1]):
                        sv = servers[v]
                        row = dict(rep=rep, **asyncio.run(run_level(sv['url'], n, reqs, a.max_new_tokens, a.timeout))); sv['levels'].append(row)
                        print(f"  rep {rep} {v:>9} {n:>3} clients: {row['req_per_s']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms", flush=True)
            for v, sv in servers.items():
                sv['stream'] = first_chunk_ms(sv['url'], dict(prompt=PROMPTS[1], max_new_tokens=max(32, a.max_new_tokens), controller=a.controller, seed=99), a.timeout)
                h = httpx.get(f"{sv['url']}/health").json(); sv['server_stats'], sv['batching'] = h['stats'], h.get('batching')
        finally:
            for p in procs:
                p.terminate()
                try: p.wait(timeout=20)
                except subprocess.TimeoutExpired: p.kill()
    h0 = next(iter(servers.values()))['health']
    res = dict(benchmark='serve_load', controller=a.controller, max_new_tokens=a.max_new_tokens, overrides=a.set,
               max_concurrency=h0['max_concurrency'], slm=h0['slm'], slm_fingerprint=h0['slm_fingerprint'],
               variants={v: dict(overrides=VARIANTS[v], **{k: x for k, x in sv.items() if k not in ('url', 'health')}) for v, sv in servers.items()},
               machine=dict(python=platform.python_version(), cpus=os.cpu_count(), platform=platform.platform(),
                            loadavg=os.getloadavg() if hasattr(os, 'getloadavg') else None))
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix('.tmp'); tmp.write_text(json.dumps(res, indent=1)); os.replace(tmp, out)
    print(f"\nserve_load: controller={a.controller}, max_new_tokens={a.max_new_tokens}, serve.max_concurrency={h0['max_concurrency']}, "
          f"SLM {h0['slm']} ({h0['slm_fingerprint']}), load average at the end {res['machine']['loadavg']}")
    print("| server | rep | clients | requests | req/s | tok/s | p50 ms | p95 ms | mean tokens |\n|---|---|---|---|---|---|---|---|---|")
    for n in a.levels:
        for v, sv in servers.items():
            for r in (x for x in sv['levels'] if x['clients'] == n):
                print(f"| {v} | {r['rep']} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['mean_tokens']:.1f} |")
    pooled = {v: {n: sum(x['requests'] for x in sv['levels'] if x['clients'] == n) / sum(x['wall_s'] for x in sv['levels'] if x['clients'] == n)
                  for n in a.levels} for v, sv in servers.items()}
    res['pooled_req_per_s'] = {v: {str(n): round(x, 3) for n, x in d.items()} for v, d in pooled.items()}
    tmp.write_text(json.dumps(res, indent=1)); os.replace(tmp, out)
    print("pooled req/s over reps: " + "; ".join(f"{v}: " + ", ".join(f"{n} clients {x:.2f}" for n, x in d.items()) for v, d in pooled.items()))
    if len(servers) == 2:
        A, B = pooled.values()
        print("pooled req/s ratio " + " / ".join(servers) + ": " + ", ".join(f"{n} clients {A[n] / B[n]:.2f}x" for n in a.levels))
    for v, sv in servers.items():
        st = sv['stream']
        print(f"{v}: start {sv['startup_s']} s; stream ({max(32, a.max_new_tokens)} tokens, 1 client): first chunk {st['first_chunk_ms']} ms, "
              f"done {st['total_ms']} ms, {st['chunks']} chunk events; counters {sv['server_stats']}; batching {sv['batching']}")
    print(f"wrote {out}")
    return res


if __name__ == '__main__':
    main()
