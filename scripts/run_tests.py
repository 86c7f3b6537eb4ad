"Run nbdev-test over every notebook, then pytest over tests/; print timings and one closing `N passed, N failed` line for both."
import os, re, subprocess, sys, tempfile, time
import xml.etree.ElementTree as ET
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
nb_pass, nb_fail = len(nbs) - len(failed & {p.name for p in nbs}), len(failed)
print(f"nbdev-test: {len(nbs)} notebooks in {time.time()-t0:.0f}s: {nb_pass} passed, {nb_fail} failed")
for f in sorted(failed): print(f"FAILED {f}")

t1 = time.time()
with tempfile.TemporaryDirectory() as d:
    xml = Path(d)/'pytest.xml'
    p = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--junitxml={xml}', 'tests'], cwd=root)
    if xml.exists():
        suites = ET.parse(xml).getroot()
        suites = [suites] if suites.tag == 'testsuite' else list(suites)
        n = sum(int(s.get('tests', 0)) for s in suites); bad = sum(int(s.get('failures', 0)) + int(s.get('errors', 0)) for s in suites)
        skipped = sum(int(s.get('skipped', 0)) for s in suites)
        py_pass, py_fail = n - bad - skipped, bad
    else: py_pass, py_fail, skipped = 0, 1, 0  # pytest did not run
if p.returncode not in (0, 1) and py_fail == 0: py_fail = 1  # collection error, interrupted, or no tests (exit 5)
print(f"pytest: {py_pass} passed, {py_fail} failed, {skipped} skipped in {time.time()-t1:.0f}s")
if os.environ.get('RC_TEST_START'): print(f"== total {time.time() - int(os.environ['RC_TEST_START']):.0f}s")
print(f"{nb_pass + py_pass} passed, {nb_fail + py_fail} failed")
sys.exit(1 if nb_fail + py_fail else 0)
