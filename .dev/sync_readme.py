"Write README.md from the markdown cells of nbs/index.ipynb (nbdev-readme needs Quarto, which these machines lack)."
import json
from pathlib import Path
root = Path(__file__).resolve().parent.parent
nb = json.loads((root/'nbs'/'index.ipynb').read_text(encoding='utf-8'))
out = [''.join(c['source']).strip('\n') for c in nb['cells'] if c['cell_type'] == 'markdown']
(root/'README.md').write_text('\n\n'.join(out) + '\n', encoding='utf-8')
