"""Docs check ("Seeing it"): every notebook renders to HTML, and the rendered tutorial opens in headless Chromium without errors.

    python benchmarks/docs_render.py                  # execute the tutorial's quick cells, render all notebooks, screenshot the tutorial
    python benchmarks/docs_render.py --no-execute     # render the clean notebooks only (fast)

Writes the HTML pages to --html-dir (default: a temporary directory), benchmarks/artifacts/tutorial.png and benchmarks/artifacts/docs_render.json;
exits 1 when a notebook fails to render, a tutorial cell fails, or the page logs a JavaScript error.
Needs nbconvert (`pip install nbconvert`) and Chromium (`apt-get install -y chromium`). This is a script, not an nbdev test.
"""
from __future__ import annotations
import argparse, json, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')

def execute_tutorial(src:Path, dst:Path) -> tuple[bool, float, str]:
    "Run the tutorial the way nbdev-test does (slow/cuda/notest and `eval: false` cells skipped), saving outputs into `dst`."
    from nbdev.test import test_nb
    import io, contextlib
    with tempfile.TemporaryDirectory(prefix='rc-docs-') as d:
        nb = Path(d)/src.name; shutil.copy(src, nb)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            ok, secs = test_nb(nb, skip_flags=['slow', 'cuda', 'notest'], save=True, showerr=True)
        if ok:  # execnb records cell timings as metadata.execution.total (a float), which nbformat's schema rejects
            d_nb = json.loads(nb.read_text(encoding='utf-8'))
            for c in d_nb['cells']: c.get('metadata', {}).pop('execution', None)
            dst.write_text(json.dumps(d_nb, indent=1), encoding='utf-8')
    return ok, secs, err.getvalue()[-3000:]

def render(nb:Path, out_dir:Path) -> dict:
    "Render one notebook to HTML with nbconvert's HTMLExporter; returns {notebook, html, bytes, ok, error}."
    import nbformat
    from nbconvert import HTMLExporter
    t0 = time.perf_counter()
    try:
        node = nbformat.read(nb, as_version=4)
        body, _ = HTMLExporter(embed_images=True).from_notebook_node(node, resources={'metadata': {'name': nb.stem}})
        p = out_dir/(nb.stem + '.html'); p.write_text(body, encoding='utf-8')
        return dict(notebook=nb.name, html=str(p), bytes=len(body.encode()), ok=True, error=None,
                    seconds=round(time.perf_counter() - t0, 2))
    except Exception as e:
        return dict(notebook=nb.name, html=None, bytes=0, ok=False, error=f"{type(e).__name__}: {e}", seconds=round(time.perf_counter() - t0, 2))

def find_chromium(path:str|None=None) -> str:
    "`path` if it exists, else the first Chromium on PATH; exits with the install command when there is none."
    if path and Path(path).exists(): return path
    for c in CHROMIUM:
        if shutil.which(c): return shutil.which(c)
    sys.exit("no Chromium found: apt-get install -y chromium (Debian), put chromium on PATH" + (" or pass --chromium PATH." if path is not None else "."))

JS_ERROR = re.compile(r'CONSOLE[^\]]*\]\s*"(Uncaught[^"]*|[^"]*Error[^"]*)"')

def open_in_chromium(html:Path, png:Path, width:int=1280, height:int=3000, timeout:int=90) -> dict:
    "Load `html` in headless Chromium: JavaScript errors from its console log, the DOM size and a screenshot into `png`."
    exe = find_chromium()
    base = [exe, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', '--enable-logging=stderr', '--v=0',
            '--virtual-time-budget=5000', f'--window-size={width},{height}']
    url = html.resolve().as_uri()
    dom = subprocess.run(base + ['--dump-dom', url], capture_output=True, text=True, timeout=timeout)
    shot = subprocess.run(base + [f'--screenshot={png}', url], capture_output=True, text=True, timeout=timeout)
    errors = sorted({m.group(1) for r in (dom, shot) for m in JS_ERROR.finditer(r.stderr)})
    return dict(url=url, returncode=max(dom.returncode, shot.returncode), dom_chars=len(dom.stdout), js_errors=errors,
                title=(re.search(r'<title>(.*?)</title>', dom.stdout, re.S) or [None, None])[1],
                screenshot=(str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)) if png.exists() else None, screenshot_bytes=png.stat().st_size if png.exists() else 0)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(ROOT/'benchmarks'/'artifacts'), help="artifact directory")
    ap.add_argument('--html-dir', default=None, help="where the HTML pages go (default: a new temporary directory)")
    ap.add_argument('--no-execute', action='store_true', help="render the tutorial without running its quick cells")
    a = ap.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    html_dir = Path(a.html_dir) if a.html_dir else Path(tempfile.mkdtemp(prefix='rc-docs-html-')); html_dir.mkdir(parents=True, exist_ok=True)
    nbs = sorted((ROOT/'nbs').glob('*.ipynb'))
    report = dict(notebooks=[], html_dir=str(html_dir), tutorial_execution=None, chromium=None)
    tut = ROOT/'nbs'/'tutorial.ipynb'
    executed = None
    if tut.exists() and not a.no_execute:
        executed = Path(tempfile.mkdtemp(prefix='rc-docs-exec-'))/'tutorial.ipynb'
        ok, secs, err = execute_tutorial(tut, executed)
        report['tutorial_execution'] = dict(ok=ok, seconds=round(secs, 1), stderr_tail=None if ok else err)
        print(f"tutorial executed: {'ok' if ok else 'FAILED'} in {secs:.1f} s", flush=True)
        if not ok: executed = None
    for nb in nbs:
        src = executed if (nb == tut and executed is not None) else nb
        r = render(src, html_dir); r['executed'] = src is executed
        report['notebooks'].append(r)
        print(f"{nb.name:28} {'ok ' if r['ok'] else 'FAILED'} {r['bytes']:>9} bytes {r['seconds']:>5.1f} s {r['error'] or ''}", flush=True)
    th = html_dir/'tutorial.html'
    if th.exists():
        report['chromium'] = c = open_in_chromium(th, out/'tutorial.png')
        print(f"chromium: rc={c['returncode']} title={c['title']!r} dom={c['dom_chars']} chars, js errors={c['js_errors']}, "
              f"screenshot {c['screenshot']} ({c['screenshot_bytes']} bytes)", flush=True)
    (out/'docs_render.json').write_text(json.dumps(report, indent=1) + '\n')
    failed = [r['notebook'] for r in report['notebooks'] if not r['ok']]
    c = report['chromium'] or {}
    bad = bool(failed) or (report['tutorial_execution'] is not None and not report['tutorial_execution']['ok']) \
          or not c or c['returncode'] != 0 or c['js_errors'] or not c['screenshot_bytes'] or c['dom_chars'] < 1000
    print(f"{len(report['notebooks']) - len(failed)} rendered, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
          f"tutorial page {'FAILED' if bad else 'ok'}")
    return 1 if bad else 0

if __name__ == '__main__': sys.exit(main())
