"Feedback, the served-trajectory log and the canary, on the tiny random model in-process: the feedback round trip, the log's bounds, atomic writes (also under kill -9), thoughts kept out of the log by default, the canary's share over many seeded requests, and the bandit moving the share toward the better-rated version."
import json, os, signal, sqlite3, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from research_controller.config import ConfigError, load_config, replace_config
from research_controller.controllers import make_controller
from research_controller.engine import Engine
from research_controller.rewards import task_score
from research_controller.serve import (REDACTED, CanaryRouter, ServedLog, StaticResolver, create_app, load_served_trajectories)
from research_controller.slm import tiny_slm

from _controllers import Thinker




@pytest.fixture(scope='module')
def base():
    "The tiny random model with the real tokenizer, and the controllers the apps serve."
    torch.set_num_threads(1)
    cfg = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4', 'macro.max_new_tokens=16', 'serve.max_new_tokens=64',
                                 'macro.thought_open_text=Let me think.'])  # an open phrase: the random model's thought is more than blank lines
    model, tok = tiny_slm(cfg)
    ctls = {'champ': make_controller('greedy', cfg), 'chall': make_controller('sampling', cfg), 'thinker': Thinker(cfg)}
    return dict(cfg=cfg, engine=Engine(model, tok, cfg), ctls=ctls)


def app_for(base, tmp_path, **over):
    "A TestClient on an app whose runs (and served-trajectory log) live in tmp_path; `over` are serve.* overrides; and its config."
    cfg = replace_config(base['cfg'], {'paths.runs_dir': str(tmp_path), **{f'serve.{k}': v for k, v in over.items()}})
    return TestClient(create_app(cfg, engine=base['engine'], resolver=StaticResolver(base['ctls'], default='champ'))), cfg


def gen(client, **kw) -> dict:
    r = client.post('/generate', json=dict(prompt=kw.pop('prompt', "Name a colour."), max_new_tokens=kw.pop('max_new_tokens', 8), **kw))
    assert r.status_code == 200, r.text
    return r.json()


def test_feedback_round_trip(base, tmp_path):
    "A rating attaches to the generation named by its id and is read back; later feedback replaces it; a reference alone is scored by the server."
    c, cfg = app_for(base, tmp_path)
    a = gen(c, controller='champ', include_trace=True)
    fb = c.post('/feedback', json=dict(id=a['id'], rating=0.8))
    assert fb.status_code == 200, fb.text
    assert {k: fb.json()[k] for k in ('key', 'value', 'replaced')} == dict(key='champ', value=0.8, replaced=False)
    (rec,) = load_served_trajectories(cfg)
    assert (rec['id'], rec['text'], rec['macro_trace'], rec['key'], rec['feedback']['rating']) == (a['id'], a['text'], a['macro_trace'], 'champ', 0.8)
    ref = c.post('/feedback', json=dict(id=a['id'], reference="a red colour")).json()
    assert ref['replaced'] and ref['value'] == task_score(dict(task='squad', references=["a red colour"]), a['text'])['f1'], ref
    (rec,) = load_served_trajectories(cfg, with_feedback=True)
    assert 'rating' not in rec['feedback'] and rec['feedback']['metric'] == 'squad_f1', rec['feedback']
    assert load_served_trajectories(cfg, with_feedback=False) == []


def test_bad_feedback_names_the_field(base, tmp_path):
    "Unknown id: 404 naming it; out-of-range or missing values, strings, typos: 422 naming the field; no log: 503 saying which setting."
    c, _ = app_for(base, tmp_path)
    a = gen(c)
    cases = [(dict(id='gen-nosuch', rating=0.5), 404, "id: no served generation 'gen-nosuch' in the log"),
             (dict(id=a['id'], rating=1.5), 422, 'rating: Input should be less than or equal to 1'),
             (dict(id=a['id'], rating=-0.1), 422, 'rating: Input should be greater than or equal to 0'),
             (dict(id=a['id'], rating='0.5'), 422, 'rating: Input should be a valid number'),
             (dict(id=a['id']), 422, 'body: Value error, give a rating in [0, 1], a score in [0, 1], or a reference'),
             (dict(id=a['id'], score=2), 422, 'score: Input should be less than or equal to 1'),
             (dict(id=a['id'], stars=4), 422, 'stars: unknown field; allowed fields: id, rating, score, metric, reference, task')]
    for body, code, msg in cases:
        r = c.post('/feedback', json=body)
        d = r.json()['detail']
        assert (r.status_code, (d if isinstance(d, str) else d['message'])[:len(msg)]) == (code, msg), (body, r.json())
    off, _ = app_for(base, tmp_path/'off', trajectory_log=None)
    r = off.post('/feedback', json=dict(id=gen(off)['id'], rating=1.0))
    assert r.status_code == 503 and 'serve.trajectory_log is null' in r.json()['detail'], r.json()


def test_log_keeps_the_newest_records(base, tmp_path):
    "serve.trajectory_log_max_records=4: after 7 generations the log holds the last 4; feedback on a dropped one is a 404."
    c, cfg = app_for(base, tmp_path, trajectory_log_max_records=4)
    ids = [gen(c, seed=i)['id'] for i in range(7)]
    assert [t['id'] for t in load_served_trajectories(cfg)] == ids[3:]
    assert c.post('/feedback', json=dict(id=ids[0], rating=1.0)).status_code == 404


def test_log_byte_bound(tmp_path):
    "The byte bound holds after every insert and feedback; the oldest go first; a record over the bound alone is refused."
    log = ServedLog(tmp_path/'t.sqlite', max_records=10**6, max_bytes=5000)
    for i in range(40):
        assert log.add(dict(id=f"g{i}", text='x' * (50 + 13 * i)))
        if i % 4 == 0: log.set_feedback(f"g{i}", dict(rating=0.5, reference='y' * 200), 0.5)
        st = log.stats()
        assert st['bytes'] <= 5000, st
    kept = [int(r['id'][1:]) for r in log.records()]
    assert kept == list(range(kept[0], 40)) and kept[0] > 0, kept  # a contiguous run of the newest
    assert log.add(dict(id='huge', text='x' * 6000)) is False and log.get('huge') is None


def test_failed_write_changes_nothing(tmp_path, monkeypatch):
    "A transaction that fails halfway (the trim raises) is rolled back: no half-added record, no half-set feedback."
    log = ServedLog(tmp_path/'t.sqlite', max_records=10, max_bytes=10**6)
    log.add(dict(id='g0', text='a'))
    def boom(self, db): raise RuntimeError('disk on fire')
    monkeypatch.setattr(ServedLog, '_trim', boom)
    with pytest.raises(RuntimeError): log.add(dict(id='g1', text='b'))
    with pytest.raises(RuntimeError): log.set_feedback('g0', dict(rating=1.0), 1.0)
    monkeypatch.undo()
    assert [(r['id'], r['feedback']) for r in log.records()] == [('g0', None)]


WRITER = textwrap.dedent('''
    import sys
    from research_controller.serve import ServedLog
    log = ServedLog(sys.argv[1], max_records=50, max_bytes=10**6)
    print('ready', flush=True)
    i = 0
    while True:
        log.add(dict(id=f"g{i}", key='k', text='x' * (i % 700)))
        if i % 3 == 0: log.set_feedback(f"g{i}", dict(rating=0.5), 0.5)
        i += 1
''')

def test_log_survives_kill_9(tmp_path):
    "A writer killed with SIGKILL mid-stream leaves a sound database: every record whole, the newest ones contiguous, the bound kept."
    path = tmp_path/'t.sqlite'
    p = subprocess.Popen([sys.executable, '-c', WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'})
    try:
        assert p.stdout.readline().strip() == 'ready'
        time.sleep(1.0)
    finally:
        p.send_signal(signal.SIGKILL); p.wait()
    with sqlite3.connect(path) as db: assert db.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
    recs = ServedLog(path).records()
    n = [int(r['id'][1:]) for r in recs]
    assert 0 < len(recs) <= 50 and n == list(range(n[0], n[0] + len(n))), n[:5]
    assert all(r['text'] == 'x' * (k % 700) for r, k in zip(recs, n))
    assert all((r['feedback'] is not None) == (k % 3 == 0) for r, k in zip(recs[:-1], n))  # the last may have died between its two writes


def test_thoughts_stay_out_of_the_log_by_default(base, tmp_path):
    "A request that asks for its thoughts gets them; the log keeps a redacted trace and no thought text, in none of its files. serve.log_thoughts keeps them (and still hides them from answers that did not ask)."
    c, cfg = app_for(base, tmp_path/'a')
    a = gen(c, controller='thinker', max_new_tokens=20, include_trace=True, include_thoughts=True)
    assert a['thought_text'].strip() and a['macro_trace'][1]['chunk'] != REDACTED
    (rec,) = load_served_trajectories(cfg)
    assert 'thought_text' not in rec and [e['chunk'] for e in rec['macro_trace'][:3]] == [REDACTED] * 3, rec['macro_trace'][:3]
    raw = b''.join(p.read_bytes() for p in (tmp_path/'a'/'served').glob('trajectories.sqlite*'))
    mc = base['cfg'].macro
    for secret in (a['thought_text'].strip(), base['cfg'].slm.thought_open, base['cfg'].slm.thought_close, mc.thought_open_text, mc.thought_close_text.strip()):
        assert secret.encode() not in raw, secret
    k, kcfg = app_for(base, tmp_path/'b', log_thoughts=True)
    b = gen(k, controller='thinker', max_new_tokens=20, include_trace=True)
    (krec,) = load_served_trajectories(kcfg)
    assert (krec['thought_text'], krec['macro_trace']) == (a['thought_text'], a['macro_trace'])
    assert 'thought_text' not in b and b['macro_trace'] == rec['macro_trace'] and b['text'] == a['text']


def test_canary_share_over_many_requests(base, tmp_path):
    "Over many seeded requests that name no model the canary gets its share (within 3 standard errors), the same way every run; named models are never rerouted."
    for share in (0.1, 0.35):
        r1, r2 = CanaryRouter('chall', share, seed=11), CanaryRouter('chall', share, seed=11)
        a1 = [r1.pick('champ')[1] for _ in range(5000)]
        assert a1 == [r2.pick('champ')[1] for _ in range(5000)]
        assert abs(a1.count('canary') / 5000 - share) < 3 * (share * (1 - share) / 5000) ** 0.5, (share, a1.count('canary'))
    c, cfg = app_for(base, tmp_path, canary_version='chall', canary_share=0.35, canary_seed=11)
    arms = [gen(c, max_new_tokens=4, seed=i)['arm'] for i in range(40)]
    want = CanaryRouter('chall', 0.35, seed=11)
    assert arms == [want.pick('champ')[1] for _ in range(40)]
    assert {gen(c, max_new_tokens=4, controller='champ').get('arm') for _ in range(5)} == {None}
    served = load_served_trajectories(cfg)
    assert {(t['arm'], t['key']) for t in served} == {('canary', 'chall'), ('champion', 'champ'), (None, 'champ')}
    view = c.get('/canary').json()
    assert view['routed'] == dict(chall=arms.count('canary'), champ=arms.count('champion')) and view['enabled'], view


def test_bandit_share_stays_within_bounds(base):
    "Whatever the feedback, the bandit's share stays inside [canary_share_min, canary_share_max]; the bounds are checked at start-up."
    rt = CanaryRouter('chall', 0.2, bandit=True, share_min=0.1, share_max=0.4, seed=3)
    rng = __import__('numpy').random.default_rng(0)
    for _ in range(50):
        vals = {k: list(rng.random(int(rng.integers(0, 8)))) for k in ('champ', 'chall')}
        assert 0.1 <= rt.update(vals, 'champ') <= 0.4
    with pytest.raises(ConfigError, match=r'serve.canary_share_min=0.6 is above serve.canary_share_max=0.5'):
        create_app(replace_config(base['cfg'], {'serve.canary_version': 'chall', 'serve.canary_share_min': 0.6}), engine=base['engine'],
                   resolver=StaticResolver(base['ctls'], default='champ'))
    with pytest.raises(ConfigError, match=r"serve.canary_version='v9' is not a controller this server knows"):
        create_app(replace_config(base['cfg'], {'serve.canary_version': 'v9'}), engine=base['engine'], resolver=StaticResolver(base['ctls'], default='champ'))


@pytest.mark.parametrize('better', ['chall', 'champ'])
def test_bandit_moves_the_share_toward_the_better_version(base, tmp_path, better):
    "Ratings through POST /feedback that favour one version move the canary's share to that side's bound; /canary shows the counts, means with CIs and both tests."
    c, cfg = app_for(base, tmp_path, canary_version='chall', canary_bandit=True, canary_share=0.2, canary_share_min=0.05, canary_share_max=0.6)
    shares = []
    for i, prompt in enumerate(["Hi", "Name a river.", "What is 2+2?", "Count to 3.", "Tell me a joke.", "Why?"]):  # 6 pairs: the least a two-sided paired test at 0.05 needs
        for ctl in ('champ', 'chall'):
            rating = 0.9 - 0.02 * i if ctl == better else 0.2 + 0.02 * i
            shares.append(c.post('/feedback', json=dict(id=gen(c, prompt=prompt, controller=ctl)['id'], rating=rating)).json()['canary_share'])
    assert shares[0] == 0.2, shares  # no feedback on the canary yet
    assert shares[-1] == (0.6 if better == 'chall' else 0.05), shares
    view = c.get('/canary').json()
    assert view['share'] == shares[-1] and view['bandit']
    assert {k: (v['served'], v['rated']) for k, v in view['versions'].items()} == {'champ': (6, 6), 'chall': (6, 6)}
    hi, lo = view['versions'][better], view['versions']['chall' if better == 'champ' else 'champ']
    assert hi['ci'][0] <= hi['mean'] <= hi['ci'][1] and hi['ci'][0] > lo['ci'][1], view['versions']
    t = view['test']
    assert t['paired']['n'] == 6 and t['paired']['significant'] and t['unpaired']['significant'], t
    assert (t['unpaired']['diff'] > 0) == (better == 'chall'), t
    # a restarted server resumes the share from the feedback in its log
    again = create_app(cfg, engine=base['engine'], resolver=StaticResolver(base['ctls'], default='champ'))
    assert again.state.router.share == shares[-1]
