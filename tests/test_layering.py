"The package's import graph follows notebook order: no module imports a module of a later notebook, and there are no cycles."
import ast, re
from pathlib import Path
import pytest
import research_controller

PKG = Path(research_controller.__file__).resolve().parent
NBS = PKG.parent/'nbs'

def notebook_order() -> dict:
    "Module name -> notebook number ('09', '09a', '10': compared as strings), read from each numbered notebook's `#| default_exp`."
    out = {}
    for nb in sorted(NBS.glob('[0-9][0-9]*_*.ipynb')):
        m = re.search(r'#\|\s*default_exp\s+(\w+)', nb.read_text(encoding='utf-8'))
        assert m, f"{nb.name} has no '#| default_exp' cell"
        out[m.group(1)] = nb.name.split('_')[0]
    return out

def package_imports(source:str, mod:str) -> set:
    "The package modules `source` imports anywhere (top level or inside functions), itself excluded."
    out = set()
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.ImportFrom):
            if n.level == 1 and n.module: out.add(n.module.split('.')[0])
            elif n.level == 1 or n.module == 'research_controller': out |= {a.name for a in n.names}
            elif n.module and n.module.startswith('research_controller.'): out.add(n.module.split('.')[1])
        elif isinstance(n, ast.Import):
            out |= {a.name.split('.')[1] for a in n.names if a.name.startswith('research_controller.')}
    return out - {mod}

def graph() -> dict:
    "Module -> the package modules it imports, for every generated module."
    return {p.stem: package_imports(p.read_text(encoding='utf-8'), p.stem)
            for p in sorted(PKG.glob('*.py')) if p.stem not in ('__init__', '_modidx')}

def layer_violations(g:dict, order:dict) -> list:
    "(module, imported module) pairs where a module imports one of the same or a later notebook."
    return sorted((m, d) for m, deps in g.items() for d in deps if d in order and order[d] >= order[m])

def find_cycle(g:dict) -> list|None:
    "One import cycle as a list of modules, or None."
    state, stack = {}, []
    def visit(m):
        state[m] = 'open'; stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 'open': return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)): return c
        state[m] = 'done'; stack.pop()
        return None
    for m in sorted(g):
        if m not in state and (c := visit(m)): return c
    return None

def test_every_module_has_a_notebook():
    order = notebook_order()
    assert sorted(set(graph()) - set(order)) == [], "modules without a notebook (write them from nbs/NN_name.ipynb)"

def test_imports_follow_notebook_order():
    assert layer_violations(graph(), notebook_order()) == []

def test_no_import_cycles():
    assert find_cycle(graph()) is None

def test_checks_catch_bad_graphs():
    "The checkers themselves: a backward import, an import from a function body, and a cycle are all found."
    src = "import os\ndef f():\n    from research_controller.cli import main\nfrom .config import Config\nfrom research_controller import engine as E\n"
    assert package_imports(src, 'mcts') == {'cli', 'config', 'engine'}
    order = {'config': 0, 'engine': 4, 'mcts': 5, 'cli': 17}
    assert layer_violations({'mcts': {'cli', 'config', 'engine'}}, order) == [('mcts', 'cli')]
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None
