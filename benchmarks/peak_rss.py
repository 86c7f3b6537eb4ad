"""Peak resident memory of `rc cycle` and `rc serve` on the default SLM (target: under 6 GB each).

Runs each command as a user would (the installed `rc`, a fresh runs directory) and samples the resident set size of
the whole process tree (the command and every child it starts: self-play workers, Ray, the KenLM tools) every 0.1 s:
  - `rc cycle` on the embedded defaults (the README's main job, with its own runs directory);
  - `rc serve` answering `--requests` POST /generate requests (greedy, the active controller and best-of-N,
    two at a time), then stopped.
Prints the peaks in GB and writes them as JSON.

Usage:  python benchmarks/peak_rss.py [--skip-cycle] [--requests 12] [--out benchmarks/results/peak_rss.json] [--set key=value ...]
"""
from __future__ import annotations
import argparse, json, os, platform, shutil, signal, socket, subprocess, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import psutil


class TreeSampler(threading.Thread):
    "Samples the summed RSS of a process and all its descendants every `every` seconds; `peak` in bytes."
    def __init__(self, pid:int, every:float=0.1):
        super().__init__(daemon=True); self.pid, self.every, self.peak, self.peak_main, self._halt = pid, every, 0, 0, threading.Event()
    def run(self):
        while not self._halt.is_set():
            try:
                p = psutil.Process(self.pid); procs = [p] + p.children(recursive=True)
                rss = [x.memory_info().rss for x in procs if x.is_running()]
                self.peak, self.peak_main = max(self.peak, sum(rss)), max(self.peak_main, rss[0] if rss else 0)
            except psutil.Error: pass
            time.sleep(self.every)
    def stop(self): self._halt.set(); self.join()


def _free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def measure_cycle(rc:str, runs:Path, sets:list) -> dict:
    "Peak RSS of one `rc cycle` on the defaults, with a fresh runs directory."
    cmd = [rc, 'cycle', '--set', f'paths.runs_dir={runs}'] + [x for s in sets for x in ('--set', s)]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    smp = TreeSampler(p.pid); smp.start()
    err = p.communicate()[1]; smp.stop()
    if p.returncode != 0: raise SystemExit(f"rc cycle failed ({p.returncode}): {err[-2000:]}")
    return dict(command=' '.join(cmd), seconds=time.perf_counter() - t, peak_rss_gb=smp.peak/1e9, peak_rss_main_gb=smp.peak_main/1e9)


def measure_serve(rc:str, runs:Path, sets:list, n_requests:int) -> dict:
    "Peak RSS of `rc serve` while it answers `n_requests` /generate requests two at a time."
    import httpx
    port = _free_port()
    cmd = [rc, 'serve', '--port', str(port), '--set', f'paths.runs_dir={runs}'] + [x for s in sets for x in ('--set', s)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    smp = TreeSampler(p.pid); smp.start()
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(600):
            try:
                if httpx.get(f'{url}/health', timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            if p.poll() is not None: raise SystemExit(f"rc serve exited ({p.returncode}): {p.stderr.read()[-2000:]}")
            time.sleep(0.5)
        idle = smp.peak
        controllers = ['greedy', 'active', 'best_of_n']
        prompts = ["What is photosynthesis?", "Write two sentences about the sea.", "Name three prime numbers."]
        def one(i):
            r = httpx.post(f'{url}/generate', json=dict(prompt=prompts[i % 3], controller=controllers[i % 3], max_new_tokens=32), timeout=600)
            return r.status_code
        t = time.perf_counter()
        with ThreadPoolExecutor(2) as ex: codes = list(ex.map(one, range(n_requests)))
        dt = time.perf_counter() - t
    finally:
        p.send_signal(signal.SIGINT)
        try: p.wait(30)
        except subprocess.TimeoutExpired: p.kill()
        smp.stop()
    return dict(command=' '.join(cmd), requests=n_requests, status_codes=sorted(set(codes)), seconds=dt,
                peak_rss_gb=smp.peak/1e9, peak_rss_main_gb=smp.peak_main/1e9, idle_rss_gb=idle/1e9)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--skip-cycle', action='store_true', help='measure `rc serve` only')
    ap.add_argument('--requests', type=int, default=12, help='POST /generate requests sent to `rc serve`')
    ap.add_argument('--out', default='benchmarks/results/peak_rss.json')
    ap.add_argument('--set', action='append', default=[], help='config override key=value, passed to both commands')
    a = ap.parse_args(argv)
    from research_controller.config import atomic_write_json
    rc = shutil.which('rc') or str(Path(sys.executable).with_name('rc'))
    res = dict(benchmark='peak_rss', target_gb=6.0, machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(),
               memory_gb=psutil.virtual_memory().total/1e9), overrides=a.set)
    with tempfile.TemporaryDirectory() as d:
        res['serve'] = measure_serve(rc, Path(d)/'serve_runs', a.set, a.requests)
        print(f"rc serve: peak {res['serve']['peak_rss_gb']:.2f} GB (idle {res['serve']['idle_rss_gb']:.2f} GB) over "
              f"{a.requests} requests in {res['serve']['seconds']:.0f} s", flush=True)
        if not a.skip_cycle:
            res['cycle'] = measure_cycle(rc, Path(d)/'cycle_runs', a.set)
            print(f"rc cycle: peak {res['cycle']['peak_rss_gb']:.2f} GB (main process {res['cycle']['peak_rss_main_gb']:.2f} GB) "
                  f"in {res['cycle']['seconds']:.0f} s", flush=True)
    res['within_target'] = all(v['peak_rss_gb'] < 6.0 for k, v in res.items() if k in ('serve', 'cycle'))
    print(f"under 6 GB: {res['within_target']}")
    print(f"wrote {atomic_write_json(a.out, res)}")
    return res


if __name__ == '__main__':
    main()
