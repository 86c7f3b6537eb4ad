"Write README.md from the markdown cells of .dev/drafts/index.py (the source of nbs/index.ipynb)."
import re, sys
from pathlib import Path
src = Path('.dev/drafts/index.py').read_text()
cells = re.split(r'^# %%(.*)$', src, flags=re.M)
out = []
for hdr, body in zip(cells[1::2], cells[2::2]):
    if '[markdown]' not in hdr: continue
    lines = [l[2:] if l.startswith('# ') else l[1:] if l.startswith('#') else l for l in body.strip('\n').splitlines()]
    out.append('\n'.join(lines).strip('\n'))
Path('README.md').write_text('\n\n'.join(out) + '\n')
