"Convert a jupytext percent-format draft into a clean notebook (developer tool)."
import sys, jupytext, nbformat
src, dst = sys.argv[1], sys.argv[2]
nb = jupytext.read(src, fmt='py:percent')
nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
for c in nb.cells:
    c.metadata = {}
    if c.cell_type == 'code': c.outputs, c.execution_count = [], None
nbformat.write(nb, dst)
print(f"wrote {dst} ({len(nb.cells)} cells)")
