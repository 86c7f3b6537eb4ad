"Run nbdev-test over every notebook, print per-notebook timings and a final `N passed, N failed` line."
import os, re, subprocess, sys, time
from pathlib import Path
root = Path(__file__).resolve().parent.parent
nbs = sorted(p for p in (root/'nbs').rglob('*.ipynb') if not re.match(r'^[_.]', p.name) and '.ipynb_checkpoints' not in str(p))
t0 = time.time()
r = subprocess.run(['nbdev-test', '--timing', '--n-workers', os.environ.get('RC_TEST_WORKERS', '2'), *sys.argv[1:]],
                   cwd=root, capture_output=True, text=True)
out = r.stdout + r.stderr
print(out[-20000:])
failed = set()
if 'Failed On The Following Notebooks' in out:
    tail = out.split('Failed On The Following Notebooks', 1)[1]
    failed = {p.name for p in nbs if re.search(rf'^\s*{re.escape(p.name)}\s*$', tail, re.M)}
    if not failed: failed = {'<unknown>'}
elif r.returncode != 0: failed = {'<nbdev-test crashed>'}
print(f"nbdev-test: {len(nbs)} notebooks in {time.time()-t0:.0f}s")
for f in sorted(failed): print(f"FAILED {f}")
print(f"{len(nbs) - len(failed & {p.name for p in nbs})} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
