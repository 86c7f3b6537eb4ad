"Promotion from canary evidence, end to end on the tiny random model: a real app serves the active version and a registered canary to a share of the traffic (the real served-trajectory log), the answers are rated through POST /feedback, and `rc promote --from-canary` sends that evidence through the same promotion gate and registry as a cycle: refused while the canary is rated worse, promoted (audited, evidence 'canary') once it is rated better."
import json
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from research_controller.cli import run_main
from research_controller.config import load_config, run_path
from research_controller.engine import Engine
from research_controller.macro_actions import ACTION_NAMES, N_ACTIONS
from research_controller.network import PolicyValueNet, save_checkpoint
from research_controller.promotion import load_reports
from research_controller.registry import ControllerRegistry
from research_controller.serve import create_app, load_served_trajectories
from research_controller.slm import tiny_slm

PROMPTS = [f"Name a thing number {i}." for i in range(12)]


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "A registry with v0001 (active) and v0002 (the canary, half the traffic), 48 requests served over 12 prompts, and the app to rate them."
    torch.set_num_threads(1)
    runs = tmp_path_factory.mktemp('canary_runs')
    sets = [f'paths.runs_dir={runs}', 'features.drift_embedder=slm', 'macro.chunk_tokens=4', 'serve.max_new_tokens=64', 'network.hidden=16',
            'serve.canary_version=v2', 'serve.canary_share=0.5', 'promotion.min_tasks=6',
            'promotion.max_latency_increase=100']  # two random networks: one stops at once, the other writes to the budget; latency is not what is tested
    cfg = load_config(overrides=sets)
    model, tok = tiny_slm(cfg)
    eng = Engine(model, tok, cfg)
    reg = ControllerRegistry.from_config(cfg)
    for i in range(2):
        torch.manual_seed(i)
        ck = save_checkpoint(PolicyValueNet(eng.feature_dim, N_ACTIONS, cfg.network), runs/f'ck{i}.pt', eng.fingerprint, ACTION_NAMES, cfg)
        v = reg.register(ck, dict(slm_fingerprint=eng.fingerprint, feature_dim=eng.feature_dim, notes=f'test {i}'), who='test')
    reg.promote('v0001', who='test', why='first')
    app = TestClient(create_app(cfg, engine=eng))
    answers = []
    for j in range(48):
        r = app.post('/generate', json=dict(prompt=PROMPTS[j % 12], max_new_tokens=8, seed=j))
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return SimpleNamespace(cfg=cfg, reg=reg, app=app, answers=answers, sets=[x for s in sets for x in ('--set', s)])


def rate(s, canary_better:bool):
    "Rate every answer: the canary's 0.3 above (or 0.2 below) the champion's, on a prompt-dependent base."
    for j, a in enumerate(s.answers):
        base = 0.3 + 0.02 * (j % 12)
        v = base + (0.3 if canary_better else -0.2) * (a['arm'] == 'canary')
        assert s.app.post('/feedback', json=dict(id=a['id'], rating=round(v, 3))).status_code == 200


def test_canary_split_is_logged(served):
    "Both versions answered a share of the prompts, and the log says which arm each answer came from."
    recs = load_served_trajectories(served.cfg)
    assert {r['key'] for r in recs} == {'v0001', 'v0002'} and {r['arm'] for r in recs} == {'champion', 'canary'}
    both = {r['prompt_sha'] for r in recs if r['key'] == 'v0001'} & {r['prompt_sha'] for r in recs if r['key'] == 'v0002'}
    assert len(both) >= 6, len(both)


def test_refused_then_promoted(served):
    "Rated worse, the canary is refused (exit 0, the failing condition named, nothing promoted, a report on record); rated better, it is promoted through the registry with evidence 'canary'."
    s = served
    rate(s, canary_better=False)
    code, out, err = run_main(['promote', '--from-canary', '--who', 'operator', *s.sets])
    assert code == 0, (out, err)
    assert out.strip().splitlines()[-1].startswith('v0002 not promoted: Mean task score'), out
    assert s.reg.active() == 'v0001'
    assert 'evidence | canary (live feedback in the served-trajectory log), paired by prompt' in out, out
    code, out, err = run_main(['promote', '--from-canary', '--dry-run', *s.sets])
    assert code == 0 and 'dry run: v0002 not promoted' in out, (out, err)

    rate(s, canary_better=True)  # new feedback replaces the old
    code, out, err = run_main(['promote', '--from-canary', '--who', 'operator', *s.sets])
    assert code == 0, (out, err)
    assert 'promoted v0002 (was policy@v0001) on canary evidence' in out, out
    ev = s.reg.history()[-1]
    assert (s.reg.active(), ev['event'], ev['version'], ev['previous'], ev['who'], ev['decision']['evidence']) == ('v0002', 'promote', 'v0002', 'v0001', 'operator', 'canary')
    assert ev['decision']['accepted'] and [c['name'] for c in ev['decision']['checks']] == ['comparable', 'min_items', 'gain', 'error_rate', 'latency']
    reps = load_reports(run_path(s.cfg, s.cfg.promotion.reports_dir))
    assert [(r['status'], r['extra']['evidence']) for r in reps] == [('rejected', 'canary'), ('promoted', 'canary')]
    code, out, err = run_main(['promote', '--from-canary', *s.sets])  # the canary is the active version now
    assert code == 4 and 'already the active version' in err, (code, err)
