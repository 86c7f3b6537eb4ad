"Served traffic as training data, end to end on the tiny random model: requests served by the real app write the real served-trajectory log (with `serve.log_states`), some get feedback, and `rc cycle`'s coordinator (real self-play, real training) adds the rated ones to the replay buffer, trains on them beside self-play, counts them apart in the report, and never stores thought text."
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from research_controller.config import load_config, replace_config, run_path
from research_controller.controllers import make_controller
from research_controller.engine import Engine
from research_controller.evaluate import ItemRecord, SuiteResult
from research_controller.promotion import OnlineLearningCoordinator, cycle, report_table
from research_controller.selfplay import LengthReward, run_selfplay
from research_controller.serve import StaticResolver, create_app, load_served_trajectories
from research_controller.slm import tiny_slm

from _controllers import Thinker
from research_controller.train import open_buffer




def fake_result(c, q):
    "A SuiteResult of 16 items for controller `c` with task score `q` + noise (the gate's decision does not matter here)."
    rng = np.random.default_rng(len(c.name))
    recs = [ItemRecord(c.name, c.version, f'i{i}', 'squad', 't', {'f1': float(v)}, {}, float(v), 10, 10.0) for i, v in enumerate(q + rng.normal(0, .01, 16))]
    return SuiteResult(c.name, c.version, 'toy', 'a' * 64, 64, recs)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    torch.set_num_threads(1)
    runs = tmp_path_factory.mktemp('served_runs')
    cfg = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4', 'macro.max_new_tokens=48', 'serve.max_new_tokens=64',
                                 'macro.thought_open_text=Let me think.', f'paths.runs_dir={runs}', 'selfplay.episodes=3', 'selfplay.max_new_tokens=12',
                                 'mcts.n_sims=2', 'train.steps=5', 'train.batch_size=8', 'network.hidden=16', 'promotion.min_new_trajectories=2',
                                 'promotion.min_tasks=4', 'promotion.served_data=true', 'serve.log_states=true', 'cases.rebuild=false'])
    model, tok = tiny_slm(cfg)
    eng = Engine(model, tok, cfg)
    ctls = {'greedy': make_controller('greedy', cfg), 'thinker': Thinker(cfg)}
    return SimpleNamespace(cfg=cfg, eng=eng, ctls=ctls, runs=runs)


def serve_some(w):
    "Serve 6 requests (3 with a hidden thought) and 1 more with state logging off; rate 4 of the first 6 and the last one. Returns the ids."
    app = TestClient(create_app(w.cfg, engine=w.eng, resolver=StaticResolver(w.ctls, default='greedy')))
    ids = []
    for i in range(6):
        r = app.post('/generate', json=dict(prompt=f"Name a colour number {i}.", max_new_tokens=40, seed=i, controller=('greedy', 'thinker')[i % 2],
                                            include_thoughts=True))
        assert r.status_code == 200, r.text
        ids.append(r.json())
    off = TestClient(create_app(replace_config(w.cfg, {'serve.log_states': False}), engine=w.eng, resolver=StaticResolver(w.ctls, default='greedy')))
    ids.append(off.post('/generate', json=dict(prompt="Name a fruit.", max_new_tokens=12, seed=9)).json())
    for a, v in zip([ids[0], ids[1], ids[2], ids[3], ids[6]], (0.9, 0.2, 0.6, 1.0, 0.7)):
        assert app.post('/feedback', json=dict(id=a['id'], rating=v)).status_code == 200
    return ids


def test_cycle_trains_on_served_trajectories(world):
    "The rated served records with state vectors become buffer episodes the challenger trains on; the report counts them apart and says what was skipped and why."
    w = world
    answers = serve_some(w)
    thoughts = [a['thought_text'].strip() for a in answers if (a.get('thought_text') or '').strip()]
    assert len(thoughts) == 3, "the thinker's answers should carry thought text for this check"
    secrets = [*thoughts, w.cfg.macro.thought_open_text]
    logged = load_served_trajectories(w.cfg)
    assert [('decisions' in r) for r in logged] == [True] * 6 + [False]
    assert not any('thought_text' in r for r in logged)

    co = OnlineLearningCoordinator(w.cfg, selfplay_fn=lambda cfg, **kw: run_selfplay(cfg, engine=w.eng, reward_fn=LengthReward(), **kw),
                                   evaluate_fn=lambda cfg, cs, suite=None, progress=True: [fake_result(c, 0.3) for c in cs],
                                   controller_fn=lambda ref: SimpleNamespace(name='challenger' if isinstance(ref, Path) else 'greedy', version=None),
                                   suite=SimpleNamespace(hash='a' * 64))
    out = cycle(w.cfg, progress=False, coordinator=co)
    rep = out.report
    assert rep.status in ('promoted', 'rejected'), (rep.status, rep.error)
    sv = rep.extra['served']
    assert {k: sv[k] for k in ('records', 'added', 'skipped')} == dict(records=7, added=4, skipped=dict(no_feedback=2, no_states=1)), sv
    assert set(sv['skipped_why']) == {'no_feedback', 'no_states'} and 'serve.log_states' in sv['skipped_why']['no_states']
    served_ids = [f"served-{answers[i]['id']}" for i in (0, 1, 2, 3)]
    assert [t for t in rep.trajectory_ids if t.startswith('served-')] == served_ids
    n_served = sum(len(r['macro_trace']) for r in logged[:4])
    assert sv['positions'] == n_served
    assert rep.extra['positions'] == dict(selfplay=out.selfplay.positions, served=n_served), (rep.extra['positions'], out.selfplay.positions)
    assert rep.n_samples == out.selfplay.positions + n_served
    table = report_table(rep)
    assert f"training positions: self-play / served | {out.selfplay.positions} / {n_served}" in table, table
    assert "skipped: 2 not rated yet (POST /feedback); 1 logged without state vectors (serve.log_states was off)" in table, table

    with open_buffer(co.buffer_path) as b:  # the value target is the feedback mapped to [-1, 1]; the buffer keeps no text of a served episode
        metas = {b.episode_meta(s)['episode_id']: b.episode_meta(s) for s in b.episode_serials()}
    assert [round(metas[e]['value'], 6) for e in served_ids] == [0.8, -0.6, 0.2, 1.0]
    assert not any(k in metas[e] for e in served_ids for k in ('prompt', 'text', 'thought_text'))
    lines = (Path(co.buffer_path)/'log.jsonl').read_text().splitlines()  # the buffer's only text: its episodes' metadata
    served_lines = '\n'.join(l for l in lines if '"source": "served"' in l)
    assert served_lines.count('"source": "served"') == 4 and [s for s in secrets if s in served_lines] == [], secrets

    again = cycle(w.cfg, progress=False, coordinator=co)  # a later cycle does not add them again
    assert again.report.extra['served']['added'] == 0 and again.report.extra['served']['skipped'].get('already_used') == 4, again.report.extra['served']


def test_served_data_off_by_default(world, tmp_path):
    "Without promotion.served_data the cycle does not look at the served log at all."
    cfg = replace_config(world.cfg, {'promotion.served_data': False, 'paths.runs_dir': str(tmp_path)})
    co = OnlineLearningCoordinator(cfg, selfplay_fn=lambda cfg, **kw: run_selfplay(cfg, engine=world.eng, reward_fn=LengthReward(), **kw),
                                   evaluate_fn=lambda cfg, cs, suite=None, progress=True: [fake_result(c, 0.3) for c in cs],
                                   controller_fn=lambda ref: SimpleNamespace(name='challenger' if isinstance(ref, Path) else 'greedy', version=None),
                                   suite=SimpleNamespace(hash='a' * 64))
    rep = cycle(cfg, progress=False, coordinator=co).report
    assert 'served' not in rep.extra and rep.extra['positions']['served'] == 0, rep.extra
    assert not any(t.startswith('served-') for t in rep.trajectory_ids)
