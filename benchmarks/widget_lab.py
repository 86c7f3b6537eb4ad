"""Widget check ("it works in JupyterLab"): the TreeExplorer widget renders in a live JupyterLab and follows real browser clicks.

    python benchmarks/widget_lab.py                   # build a notebook from real data, run it in JupyterLab, click through the widget
    python benchmarks/widget_lab.py --keep            # same, but keep the temporary lab directory (notebook, server log) for a look

Builds a temporary directory with a notebook that runs the default SLM engine and an MCTS-at-inference generation through
`report.search_trees` (macro trace, per-decision search summaries and each decision's search tree), and shows
`TreeExplorer(trace=..., search=..., trees=...)`.
Starts `jupyter lab --no-browser` on 127.0.0.1 (free port, token, a kernelspec for this Python), opens the notebook in headless
Chromium through Playwright, runs all cells from the Run menu and really clicks: ▶, slider drags to the end and back, ◀
(trace pane); a child of decision 1's root, a grandchild, ↑ parent twice, a child, ⌂ root, a child (tree pane); ▶ again and
the tree pane must show decision 2's own tree; then re-runs, from the browser, a cell that prints the kernel-side
`ex.path`/`ex.step` and checks that the kernel followed. Needs the default SLM available offline; ~30 s on 2 cores.
Writes benchmarks/artifacts/widget_lab_*.png and benchmarks/artifacts/widget_lab.json; exits 1 when a check fails or the page
logs a JavaScript error. Needs `pip install jupyterlab playwright` (never `playwright install`: the system Chromium is used,
`apt-get install -y chromium`). This is a script, not an nbdev test.
"""
from __future__ import annotations
import argparse, importlib.metadata as md, importlib.util, json, os, re, secrets, shutil, signal, socket, subprocess, sys, tempfile, time
import urllib.request
from pathlib import Path
from docs_render import find_chromium  # benchmarks/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']
KERNEL = 'rc-widget-lab'
NEEDED = {'jupyterlab': 'jupyterlab', 'playwright': 'playwright', 'ipywidgets': 'ipywidgets', 'ipykernel': 'ipykernel',
          'jupyterlab_widgets': 'jupyterlab_widgets'}
# console errors that are not the widget's fault: a resource the offline lab cannot load (none seen so far; a broken widget
# bundle would also fail the rendering checks). Uncaught page errors always fail.
BENIGN = [re.compile(r'Failed to load resource: .*(404|net::ERR_)')]

# The notebook: real data on the default SLM. A random network, its policy nudged towards answering (CONTINUE/RESAMPLE) and away from STOP,
# drives the search so that the trace shows visible text; every number in it comes from the engine and the search.
SETUP = r'''import os, time
os.environ.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false', TQDM_DISABLE='1')
t0 = time.perf_counter()
import torch
from research_controller.config import load_config
from research_controller.engine import get_engine
from research_controller.macro_actions import N_ACTIONS
from research_controller.network import PolicyValueNet
from research_controller.controllers import MCTSController
from research_controller.report import TreeExplorer, search_trees
torch.set_num_threads(1)  # 2 threads on a shared 2-core machine are 10x slower
cfg = load_config(overrides=['mcts.early_stop=false'])
eng = get_engine(cfg)
torch.manual_seed(2)
net = PolicyValueNet(eng.feature_dim, N_ACTIONS, cfg.network)
with torch.no_grad(): net.policy_head.weight.mul_(0.1); net.policy_head.bias.copy_(torch.tensor([2., 0., 0., 1., -5.]))
mc = MCTSController(net, cfg, n_sims=__SIMS__, search_share=0.6)
res, trees = search_trees(mc, eng, "Explain why the sky is blue.", max_new_tokens=__TOKENS__, seed=0)
print(f"DATA trace={[t['action'] for t in res.macro_trace]} sims={[s['n_sims'] for s in res.meta['search']]} "
      f"trees={ {i: (t['N'], len(t['children'])) for i, t in trees.items()} } seconds={time.perf_counter() - t0:.1f}")'''
SHOW = '''ex = TreeExplorer(trace=res.macro_trace, search=res.meta['search'], trees=trees)
ex'''
STATE = 'print(f"STATE path={ex.path} step={ex.step} slider={ex.slider.value}")'

def missing_packages() -> list[str]:
    return [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]

def version(dist:str) -> str|None:
    try: return md.version(dist)
    except md.PackageNotFoundError: return None

def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def make_lab_dir(d:Path, sims:int, tokens:int) -> Path:
    "Notebook, kernelspec (this Python) and quiet lab settings under `d`; returns the notebook path."
    import nbformat
    from nbformat.v4 import new_notebook, new_code_cell, new_markdown_cell
    env = dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false', OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    cmd = [sys.executable, '-m', 'ipykernel', 'install', '--prefix', str(d/'prefix'), '--name', KERNEL, '--display-name', 'rc widget lab']
    for k, v in env.items(): cmd += ['--env', k, v]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode: raise RuntimeError(f"could not install the kernelspec ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    s = d/'settings'/'@jupyterlab'  # no news/update toasts over the notebook
    (s/'apputils-extension').mkdir(parents=True, exist_ok=True)
    (s/'apputils-extension'/'notification.jupyterlab-settings').write_text(json.dumps(dict(fetchNews='false', checkForUpdates=False)))
    nb = new_notebook(cells=[new_markdown_cell('# TreeExplorer in JupyterLab\n> real trace and tree from the default SLM'),
                             new_code_cell(SETUP.replace('__SIMS__', str(sims)).replace('__TOKENS__', str(tokens))), new_code_cell(SHOW), new_code_cell(STATE)],
                      metadata=dict(kernelspec=dict(name=KERNEL, display_name='rc widget lab', language='python')))
    p = d/'tree_explorer.ipynb'; nbformat.write(nb, p)
    return p

def lab_env(d:Path) -> dict:
    env = dict(os.environ, JUPYTER_PATH=str(d/'prefix'/'share'/'jupyter'), JUPYTER_CONFIG_DIR=str(d/'config'),
               JUPYTER_DATA_DIR=str(d/'data'), JUPYTER_RUNTIME_DIR=str(d/'runtime'), JUPYTERLAB_SETTINGS_DIR=str(d/'settings'),
               JUPYTERLAB_WORKSPACES_DIR=str(d/'workspaces'), IPYTHONDIR=str(d/'ipython'),
               HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    env['PATH'] = str(Path(sys.executable).parent) + os.pathsep + env.get('PATH', '')
    return env

def start_lab(d:Path, port:int, token:str, log) -> subprocess.Popen:
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ip=127.0.0.1', f'--port={port}', '--port-retries=0',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={d}',
           '--LabApp.news_url=', '--LabApp.extension_manager=readonly', '--ServerApp.open_browser=False']
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')  # containers run as root
    return subprocess.Popen(cmd, cwd=d, env=lab_env(d), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

def api(port:int, token:str, path:str, method:str='GET', timeout:float=5):
    req = urllib.request.Request(f'http://127.0.0.1:{port}{path}', method=method, headers={'Authorization': f'token {token}'})
    with urllib.request.urlopen(req, timeout=timeout) as r: return json.loads(r.read() or b'null')

def wait_lab(proc, port:int, token:str, timeout:float) -> dict:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f"jupyter lab exited with code {proc.returncode} before answering (see its log).")
        try: return api(port, token, '/api/status')
        except Exception: time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not answer on 127.0.0.1:{port} within {timeout:.0f} s.")

def stop_lab(proc, port:int, token:str) -> list[str]:
    "Shut the kernels down through the API, then end the server's process group and any process left under it; returns those still alive."
    import psutil
    if proc is None: return []
    kids = []
    try: kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error: pass
    try:
        for k in api(port, token, '/api/kernels'): api(port, token, f"/api/kernels/{k['id']}", 'DELETE', timeout=10)
    except Exception: pass
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None: break
        try: os.killpg(proc.pid, sig)
        except ProcessLookupError: break
        try: proc.wait(wait)
        except subprocess.TimeoutExpired: pass
    for k in kids:
        try: k.kill()
        except psutil.Error: pass
    gone, alive = psutil.wait_procs(kids, timeout=5)
    return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive]

class Checks:
    "Named pass/fail checks with details, printed as they come."
    def __init__(self): self.items, self.t0 = [], time.perf_counter()
    def __call__(self, name:str, ok:bool, detail=None):
        self.items.append(dict(name=name, ok=bool(ok), detail=detail, at_s=round(time.perf_counter() - self.t0, 1)))
        print(f"  {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return bool(ok)
    @property
    def ok(self): return bool(self.items) and all(c['ok'] for c in self.items)

def drive(url:str, exe:str, out:Path, checks:Checks, timings:dict, console:list, a) -> dict:
    "Open the notebook in headless Chromium, run all cells and click through the widget; returns browser facts."
    from playwright.sync_api import sync_playwright
    shots = []
    def shot(name, target=None):
        p = out/f'widget_lab_{name}.png'
        if target is not None:
            try: target.scroll_into_view_if_needed(timeout=5000)
            except Exception: pass
        page.screenshot(path=str(p)); shots.append(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=dict(width=1280, height=900))
            page.on('console', lambda m: console.append(dict(type=m.type, text=m.text[:500])) if m.type in ('error', 'warning') else None)
            page.on('pageerror', lambda e: console.append(dict(type='pageerror', text=str(e)[:500])))
            t = time.perf_counter()
            page.goto(url, timeout=a.timeout*1000)
            page.wait_for_selector('.jp-Notebook .jp-Cell', timeout=a.timeout*1000)
            # the page shows 'idle' before the session has a kernel: wait for the server to report it, connected and idle
            sess = wait_for(lambda: [x for x in api(a.port, a.token, '/api/sessions') if x['path'] == 'tree_explorer.ipynb'
                                     and x['kernel']['name'] == KERNEL and x['kernel']['execution_state'] == 'idle'
                                     and x['kernel']['connections'] >= 1], a.timeout)
            page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=a.timeout*1000)
            timings['lab_page_s'] = round(time.perf_counter() - t, 1)
            if not checks('notebook opens with its kernel', bool(sess), f"kernel {KERNEL} idle after {timings['lab_page_s']} s"):
                raise RuntimeError(f"no idle {KERNEL} kernel for the notebook within {a.timeout} s: {api(a.port, a.token, '/api/sessions')}")
            # Run → Run All Cells, through the menu bar
            t = time.perf_counter()
            page.locator('.lm-MenuBar-itemLabel', has_text=re.compile(r'^Run$')).click()
            page.locator('.lm-Menu-itemLabel', has_text=re.compile(r'^Run All Cells$')).click()
            dialog = page.locator('.jp-Dialog')
            if wait_for(lambda: dialog.count(), 2):  # a kernel chooser would mean the notebook lost its kernel: fail, but go on
                checks('no dialog after Run All Cells', False, dialog.first.inner_text()[:200])
                dialog.locator('select').first.select_option(label='rc widget lab'); dialog.locator('button', has_text='Select').click()
            cells = page.locator('.jp-Notebook .jp-CodeCell')
            tracebacks = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]', has_text=re.compile(r'Traceback|Error'))
            done = wait_for(lambda: ('ok' if cells.nth(2).locator('.jp-OutputArea-output', has_text='STATE path=').count() else None)
                                    or ('error' if tracebacks.count() else None), a.timeout)
            if done != 'ok':  # a cell raised (Run All stops there) or the kernel is too slow
                shot('failed_run'); errs = tracebacks.all_inner_texts()
                raise RuntimeError(f"a notebook cell raised: {errs[0][-1500:]}" if errs else f"Run All Cells did not finish within {a.timeout} s.")
            timings['run_all_s'] = round(time.perf_counter() - t, 1)
            data = cells.nth(0).locator('.jp-OutputArea-output', has_text='DATA').inner_text()
            checks('setup cell built real data', 'DATA trace=' in data, data.strip()[:400])
            # the widget: a Tab with a trace and a tree pane
            view = cells.nth(1).locator('.jupyter-widgets.widget-tab, .jupyter-widget-tab').first
            view.wait_for(timeout=60_000)
            page.locator('.widget-button').first.wait_for(timeout=30_000)
            timings['widget_render_s'] = round(time.perf_counter() - t, 1)
            tabs = [s.strip() for s in view.locator('.lm-TabBar-tab').all_inner_texts()]
            checks('widget rendered with Tab titles', tabs == ['trace', 'tree'], f"tabs={tabs}")
            n_err = cells.nth(1).locator('.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]').count()
            shown = cells.nth(1).locator('.jp-OutputArea').inner_text()
            checks('no error in the widget cell output', n_err == 0 and 'Error displaying widget' not in shown and 'Traceback' not in shown,
                   f"{n_err} stderr outputs; output starts {' | '.join(shown.split(chr(10))[:3])!r}")
            trace_html = lambda: view.locator('.widget-html-content:visible').first.inner_text()
            btn = lambda label: view.locator('.widget-button:visible', has_text=re.compile(label)).first
            first = trace_html(); m = re.search(r'decision 1/(\d+)', first)
            checks('trace pane shows decision 1/N (N >= 3)', m is not None and int(m.group(1)) >= 3, first.splitlines()[0] if first else first)
            n = int(m.group(1)) if m else 0
            shot('1_rendered', view)
            # trace pane: ▶, slider drag to the end, ◀
            btn('^▶$').click()
            ok = wait_text(trace_html, f'decision 2/{n}')
            checks('▶ moves the trace pane to decision 2/N', ok, trace_html().splitlines()[0])
            readout = view.locator('.widget-readout:visible').first
            checks('slider follows ▶ (1-based, like the pane)', wait_for(lambda: readout.inner_text().strip() == '2', 15) is not None, f"readout={readout.inner_text()!r}")
            handle, track = view.locator('.noUi-handle:visible').first, view.locator('.noUi-target:visible, .slider:visible').first
            hb, tb = handle.bounding_box(), track.bounding_box()
            page.mouse.move(hb['x'] + hb['width']/2, hb['y'] + hb['height']/2); page.mouse.down()
            page.mouse.move(tb['x'] + tb['width'] + 20, hb['y'] + hb['height']/2, steps=8); page.mouse.up()
            ok = wait_text(trace_html, f'decision {n}/{n}') and wait_for(lambda: readout.inner_text().strip() == str(n), 15) is not None
            checks('dragging the slider to the end shows decision N/N', ok, f"{trace_html().splitlines()[0]}, readout={readout.inner_text()!r}")
            btn('^◀$').click()
            ok = wait_text(trace_html, f'decision {n-1}/{n}')
            checks('◀ goes back one decision', ok, trace_html().splitlines()[0])
            shot('2_trace_clicked', view)
            hb, tb = handle.bounding_box(), track.bounding_box()
            page.mouse.move(hb['x'] + hb['width']/2, hb['y'] + hb['height']/2); page.mouse.down()
            page.mouse.move(tb['x'] - 20, hb['y'] + hb['height']/2, steps=8); page.mouse.up()
            ok = wait_text(trace_html, f'decision 1/{n}') and wait_for(lambda: readout.inner_text().strip() == '1', 15) is not None
            checks('dragging the slider to the start shows decision 1/N', ok, f"{trace_html().splitlines()[0]}, readout={readout.inner_text()!r}")
            # tree pane: root → child → grandchild → ↑ parent → ↑ parent → child → ⌂ root → child. The HTML pane and the child
            # buttons are separate widget updates (new buttons are new widget models), so every step waits for both to agree.
            view.locator('.lm-TabBar-tab', has_text='tree').click()
            node = lambda: view.locator('.widget-html-content:visible').first.inner_text()
            kids = lambda: [b.strip() for b in view.locator('.widget-button:visible').all_inner_texts() if re.match(r'^[A-Z_]+ \(N=\d+\)$', b.strip())]
            def table():  # the child buttons the node's own table calls for: 'ACTION (N=n)' per row
                rows = [l.split('\t') for l in node().splitlines()[1:]]
                return [f"{r[0].strip()} (N={r[1].strip()})" for r in rows if len(r) > 1 and re.fullmatch(r'[A-Z_]+', r[0].strip()) and r[1].strip().isdigit()]
            def at(where:str, d:int=1) -> tuple[bool, str]:
                "Wait until the pane shows node `where` of decision `d`'s tree and its child buttons match its table; returns (ok, what it shows)."
                ok = wait_for(lambda: node().startswith(f'decision {d}: {where}:') and kids() == table(), 15)
                try: shown = f"{node().splitlines()[0]}; buttons={kids()}"
                except Exception as e: shown = f"unreadable: {e}"
                return bool(ok), shown
            cut = lambda: view.locator('.widget-button:visible').evaluate_all(
                'els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.innerText)')  # labels cut off by the button width
            ok, shown = at('root'); root_kids = kids()
            checks('tree pane shows the root and one button per explored child', ok and len(root_kids) >= 1, shown)
            top = max(root_kids, key=lambda b: int(re.search(r'N=(\d+)', b).group(1)))  # the most visited child
            child = top.split()[0]
            btn(re.escape(top)).click()
            ok, shown = at(f'root → {child}'); sub_kids = kids()
            checks(f'child button goes to root → {child}, its own children as buttons', ok and sub_kids != root_kids, shown)
            clipped = cut()
            checks('button labels are not cut off', not clipped, f"cut: {clipped}" if clipped else 'all labels fit')
            shot('3_tree_child', view)
            if sub_kids:
                g = sub_kids[0].split()[0]; btn(re.escape(sub_kids[0])).click()
                checks(f'grandchild button goes to root → {child} → {g}', *at(f'root → {child} → {g}'))
                btn('parent').click()
                checks('↑ parent goes back one level', *at(f'root → {child}'))
            btn('parent').click()
            ok, shown = at('root'); checks('↑ parent reaches the root', ok and kids() == root_kids, shown)
            btn(re.escape(top)).click(); at(f'root → {child}')
            btn('root').click()
            ok, shown = at('root'); checks('⌂ root goes back to the root', ok and kids() == root_kids, shown)
            btn(re.escape(top)).click()
            checks(f'child button again: root → {child}', *at(f'root → {child}'))
            # the tree pane follows the trace pane: ▶ on the trace tab, and the tree tab shows decision 2's own search from its root
            view.locator('.lm-TabBar-tab', has_text='trace').click(); btn('^▶$').click(); wait_text(trace_html, f'decision 2/{n}')
            view.locator('.lm-TabBar-tab', has_text='tree').click()
            ok, shown = at('root', d=2)
            checks('the tree pane follows the trace pane (decision 2: its own tree, at its root)', ok, shown)
            path = []
            # the kernel followed the clicks: re-run the STATE cell from the browser (click into it, Shift+Enter)
            want = f"STATE path={path!r} step=1 slider=2"
            cells.nth(2).locator('.jp-InputArea-editor').click(); page.keyboard.press('Shift+Enter')
            out_txt = lambda: cells.nth(2).locator('.jp-OutputArea-output').first.inner_text()
            ok = wait_text(out_txt, want, timeout=30)
            checks('kernel state follows the clicks (ex.path, ex.step, slider)', ok, f"got {out_txt().strip()!r}, want {want!r}")
            shot('4_final', view)
            return dict(chromium=browser.version, screenshots=shots, n_decisions=n, root_children=root_kids)
        finally:
            browser.close()

def wait_text(get, text:str, timeout:float=15) -> bool:
    "Poll `get()` until its text contains `text`."
    return wait_for(lambda: text in get(), timeout) is not None

def wait_for(f, timeout:float, every:float=0.25):
    "Poll `f()` until it returns something truthy (returned) or `timeout` seconds pass (None); exceptions count as falsy."
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            v = f()
            if v: return v
        except Exception: pass
        time.sleep(every)
    return None

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(ROOT/'benchmarks'/'artifacts'), help="artifact directory")
    ap.add_argument('--chromium', default='/usr/bin/chromium', help="Chromium executable (Playwright's own browsers are not used)")
    ap.add_argument('--sims', type=int, default=16, help="simulations per decision of the search controller")
    ap.add_argument('--tokens', type=int, default=200, help="total token budget of the generation, search included")
    ap.add_argument('--timeout', type=int, default=300, help="seconds to wait for the lab page and for Run All Cells")
    ap.add_argument('--keep', action='store_true', help="keep the temporary lab directory")
    a = ap.parse_args(argv)
    miss = missing_packages()
    if miss: sys.exit(f"missing Python packages: {', '.join(miss)}. Install them into this environment ({sys.executable}) with:\n"
                      f"    {sys.executable} -m pip install {' '.join(miss)}\n(do not run `playwright install`: the system Chromium is used.)")
    exe = find_chromium(a.chromium)
    os.environ.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    for p in out.glob('widget_lab_*.png'): p.unlink()
    d = Path(tempfile.mkdtemp(prefix='rc-widget-lab-'))
    checks, timings, console = Checks(), {}, []
    report = dict(versions={k: version(k) for k in ('jupyterlab', 'jupyter_server', 'ipywidgets', 'jupyterlab_widgets', 'widgetsnbextension',
                                                    'ipykernel', 'playwright')},
                  checks=checks.items, timings=timings, console=console, errors=[], lab_dir=str(d) if a.keep else None)
    proc = port = token = None; log = None; t_all = time.perf_counter()
    try:
        make_lab_dir(d, a.sims, a.tokens)
        port, token = free_port(), secrets.token_hex(16)
        log = open(d/'lab.log', 'w')
        t = time.perf_counter(); proc = start_lab(d, port, token, log)
        st = wait_lab(proc, port, token, timeout=90)
        timings['lab_start_s'] = round(time.perf_counter() - t, 1)
        checks('jupyter lab answers', True, f"127.0.0.1:{port} in {timings['lab_start_s']} s, {st.get('kernels', 0)} kernels")
        url = f'http://127.0.0.1:{port}/lab/tree/tree_explorer.ipynb?token={token}'
        a.port, a.token = port, token
        report['browser'] = drive(url, exe, out, checks, timings, console, a)
        report['versions']['chromium'] = report['browser']['chromium']
    except Exception as e:
        report['errors'].append(f"{type(e).__name__}: {e}")
        print(f"ERROR {type(e).__name__}: {e}", flush=True)
    finally:
        try:
            left = stop_lab(proc, port, token)
            if proc is not None: checks('jupyter lab and its kernel shut down', proc.poll() is not None and not left, f"left running: {left}" if left else 'nothing left running')
        finally:
            if log: log.close()
            timings['total_s'] = round(time.perf_counter() - t_all, 1)
            lab_log = (d/'lab.log').read_text(errors='replace') if (d/'lab.log').exists() else ''
            report['lab_log_tail'] = lab_log[-3000:] if (report['errors'] or not checks.ok) else None
            if not a.keep: shutil.rmtree(d, ignore_errors=True)
    js = [c for c in console if c['type'] in ('error', 'pageerror')]
    bad_js = [c for c in js if c['type'] == 'pageerror' or not any(b.search(c['text']) for b in BENIGN)]
    checks('no JavaScript errors in the browser console', not bad_js,
           f"{len(bad_js)} errors" + (f": {[c['text'][:200] for c in bad_js]}" if bad_js else '') + f"; {len(js) - len(bad_js)} benign")
    report['benign_console_errors'] = [c['text'] for c in js if c not in bad_js]
    report['ok'] = checks.ok and not report['errors']
    (out/'widget_lab.json').write_text(json.dumps(report, indent=1, ensure_ascii=False) + '\n')
    n_fail = sum(not c['ok'] for c in checks.items) + len(report['errors'])
    print(f"{sum(c['ok'] for c in checks.items)} passed, {n_fail} failed; timings {timings}; report {out/'widget_lab.json'}")
    return 0 if report['ok'] else 1

if __name__ == '__main__': sys.exit(main())
