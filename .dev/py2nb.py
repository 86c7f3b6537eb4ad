"Convert a jupytext percent-format draft into a clean notebook (developer tool); keeps the cell ids of an existing `dst` for unchanged cells."
import sys, hashlib, json, os, jupytext, nbformat
src, dst = sys.argv[1], sys.argv[2]
nb = jupytext.read(src, fmt='py:percent')
nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
old = {}
if os.path.exists(dst):  # unchanged cells keep their ids, so a regenerated notebook diffs only where the draft changed
    for c in json.load(open(dst, encoding='utf-8')).get('cells', []):
        if 'id' in c: old.setdefault((c['cell_type'], ''.join(c['source'])), []).append(c['id'])
used = set()
for c in nb.cells:
    c.metadata = {}
    if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    ids = old.get((c.cell_type, c.source), [])
    if ids: c.id = ids.pop(0)
    else:
        h, k = hashlib.sha1(c.source.encode()).hexdigest(), 0
        while h[k:k+8] in used: k += 1
        c.id = h[k:k+8]
    used.add(c.id)
nbformat.write(nb, dst)
print(f"wrote {dst} ({len(nb.cells)} cells)")
