"Test-only controllers shared by the test files (tests/ is on sys.path under pytest's default import mode)."
from research_controller.controllers import Controller
from research_controller.macro_actions import Action


class Thinker(Controller):
    "Opens a thought at once, writes one chunk in it, closes it, then continues: every answer has a hidden thought."
    name = 'thinker'
    def decide(self, engine, s):
        n, m = len(engine.decisions(s)), engine.legal_mask(s)
        a = (Action.THINK_BEGIN, Action.CONTINUE, Action.THINK_END)[n] if n < 3 else Action.CONTINUE
        return (a if m[a] else Action.CONTINUE), None
