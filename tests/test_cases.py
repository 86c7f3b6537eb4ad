"The case index's embedding store under faults: concurrent readers and a writer, damaged or missing files, round trips, filters."
import errno, json, os, subprocess, sys, textwrap, threading, time
from pathlib import Path
from unittest import mock
import numpy as np
import pytest
from filelock import FileLock
from research_controller.buffer import ReplayBuffer
from research_controller.cases import (POINTER, Case, CaseIndex, CaseStoreError, EmbeddingStore, HashEmbedder, cases_prior, format_cases,
                                       mix_prior, _snapshots)
from research_controller.macro_actions import ACTION_NAMES, N_ACTIONS, Action

DOCS = [f"document {i} about topic{i % 3} and word{i}" for i in range(12)]
META = [dict(i=i, topic=f"t{i % 3}", even=i % 2 == 0) for i in range(12)]

def make_store(n=12, dim=32):
    st = EmbeddingStore(HashEmbedder(dim))
    st.add(DOCS[:n], META[:n], [f"d{i}" for i in range(n)])
    return st

def saved(tmp_path, n=12):
    st = make_store(n); snap = st.save(tmp_path/'store')
    return st, tmp_path/'store', snap

def load(path, dim=32): return EmbeddingStore.load(path, HashEmbedder(dim))

# --- round trip --------------------------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    st, path, snap = saved(tmp_path)
    st.extra['note'] = 'x'; st.save(path)
    ld = load(path)
    assert (len(ld), ld.name, ld.dim) == (12, 'hash-32', 32)
    assert (ld._snap.ids, ld._snap.texts, ld._snap.metadata) == (st._snap.ids, st._snap.texts, st._snap.metadata)
    assert ld._snap.vectors.tobytes() == st._snap.vectors.tobytes()
    assert ld.extra == {'note': 'x'}
    for q in ("topic1 word4", "document 7"):
        assert [(h.id, h.score, h.metadata) for h in ld.search(q, k=4)] == [(h.id, h.score, h.metadata) for h in st.search(q, k=4)]
    ld.add(["a new entry"], [{'i': 99}], ['new'])  # a loaded store keeps growing
    assert ld.search("a new entry", k=1)[0].id == 'new'

def test_empty_store_round_trip(tmp_path):
    st = EmbeddingStore(HashEmbedder(16)); st.save(tmp_path/'e')
    ld = load(tmp_path/'e', 16)
    assert (len(ld), ld.search("anything", k=3), ld.search("x", where={'task': 'a'})) == (0, [], [])

def test_metadata_is_copied_in_and_out():
    m = {'tags': ['a']}
    st = EmbeddingStore(HashEmbedder(16)); st.add(["text one"], [m], ['x'])
    m['tags'].append('b')
    h = st.search("text one", k=1)[0]; h.metadata['tags'].append('c')
    assert st.search("text one", k=1)[0].metadata == {'tags': ['a']}

def test_old_snapshots_pruned_and_stale_temp_removed(tmp_path):
    st, path, _ = saved(tmp_path)
    (path/'.tmp-crashed').mkdir(); (path/'.tmp-crashed'/'vectors.npy').write_bytes(b'half')
    for _ in range(3): last = st.save(path, keep=2)
    assert [p.name for p in _snapshots(path)][-1] == last.name and len(_snapshots(path)) == 2
    assert not (path/'.tmp-crashed').exists()
    assert len(load(path)) == 12

# --- filters -----------------------------------------------------------------------------------------------------

def test_dict_filter_is_equality_and_applies_before_k():
    st = make_store()
    hits = st.search("document", k=3, where={'topic': 't1'})
    assert [h.metadata['topic'] for h in hits] == ['t1']*3
    assert {h.metadata['i'] for h in st.search("document", k=12, where={'topic': 't1', 'even': True})} == {4, 10}
    assert st.search("document", k=5, where={'topic': 'nope'}) == []

def test_predicate_filter_and_min_score():
    st = make_store()
    assert sorted(h.metadata['i'] for h in st.search("document", k=12, where=lambda m: m['i'] >= 9)) == [9, 10, 11]
    top = st.search("word5 topic2", k=12)
    cut = top[2].score
    assert all(h.score >= cut for h in st.search("word5 topic2", k=12, min_score=cut))
    assert [h.score for h in top] == sorted((h.score for h in top), reverse=True)

def test_predicate_gets_a_read_only_view():
    st = make_store()
    def bad(m): m['i'] = 0; return True
    with pytest.raises(CaseStoreError, match="predicate raised TypeError"): st.search("x y", where=bad)

@pytest.mark.parametrize('where, msg', [({'tpoic': 't1'}, "filter key 'tpoic' is in no entry's metadata; keys present: ['even', 'i', 'topic']"),
                                        ('topic=t1', "got str"), (lambda m: m['missing'], "predicate raised KeyError")])
def test_bad_filters_are_clear_errors(where, msg):
    with pytest.raises(CaseStoreError) as e: make_store().search("document", where=where)
    assert msg in str(e.value)

@pytest.mark.parametrize('kw, msg', [(dict(k=0), 'k must be an int >= 1'), (dict(k=True), 'k must be an int'), (dict(min_score=2), 'min_score must be a number in [-1, 1]')])
def test_bad_search_arguments(kw, msg):
    with pytest.raises(CaseStoreError) as e: make_store().search("document", **kw)
    assert msg in str(e.value)

def test_bad_adds_change_nothing():
    st = make_store(3)
    for args, msg in [((["x"], None, ['d0']), "ids already in the store: ['d0']"), ((["x", "y"], None, ['a', 'a']), 'ids repeat'),
                      ((["x"], [{'v': float('nan')}]), 'metadata[0] must be JSON'), ((["  "],), "text 0 ('  ') embeds to a zero vector"),
                      ((["x"], [[1]]), 'metadata[0] is a list, not a dict'), (("x",), 'wrap a single text in a list')]:
        with pytest.raises(CaseStoreError) as e: st.add(*args)
        assert msg in str(e.value), (msg, str(e.value))
    assert (len(st), st._snap.ids) == (3, ['d0', 'd1', 'd2'])

# --- damaged and missing files -----------------------------------------------------------------------------------

def _err(path, dim=32):
    with pytest.raises(CaseStoreError) as e: load(path, dim)
    return str(e.value)

def test_missing_folder_and_pointer(tmp_path):
    assert 'no such folder' in _err(tmp_path/'nothing')
    (tmp_path/'empty').mkdir()
    assert f"{POINTER} is missing" in _err(tmp_path/'empty')

@pytest.mark.parametrize('text, msg', [('{"format": "research', "CURRENT.json' is damaged (JSONDecodeError"),
                                       ('[1, 2]', "holds a list, not a JSON object"),
                                       ('{"format": "other/9", "snapshot": "x"}', "has format 'other/9'; this version reads"),
                                       ('{"format": "research_controller.embedding_store/1", "snapshot": "../../etc"}', "field 'snapshot' is '../../etc'"),
                                       ('{"format": "research_controller.embedding_store/1", "snapshot": "snap-000042-00000000"}', "snap-000042-00000000/store.json' is missing")])
def test_damaged_pointer(tmp_path, text, msg):
    _, path, _ = saved(tmp_path)
    (path/POINTER).write_text(text)
    m = _err(path)
    assert msg in m and 'rebuild it' in m.lower(), m

def _edit_doc(snap, **changes):
    doc = json.loads((snap/'store.json').read_text()); doc.update(changes)
    (snap/'store.json').write_text(json.dumps(doc))

@pytest.mark.parametrize('change, msg', [(dict(count=13), "field 'ids' must be 13 unique non-empty strings"),
                                         (dict(ids=['d0']*12), "field 'ids' must be 12 unique"),
                                         (dict(metadata=[1]*12), "field 'metadata' must be 12 dicts"),
                                         (dict(dim='32'), "field 'dim' must be an int >= 1"),
                                         (dict(format='research_controller.embedding_store/0'), "has format 'research_controller.embedding_store/0'")])
def test_damaged_document(tmp_path, change, msg):
    _, path, snap = saved(tmp_path)
    _edit_doc(snap, **change)
    m = _err(path)
    assert msg in m and 'store.json' in m, m

def test_document_missing_field_or_garbled(tmp_path):
    _, path, snap = saved(tmp_path)
    doc = json.loads((snap/'store.json').read_text()); del doc['texts']; (snap/'store.json').write_text(json.dumps(doc))
    assert "lacks the field 'texts'" in _err(path)
    (snap/'store.json').write_bytes(b'\xff\xfe garbage')
    assert "store.json' is damaged (UnicodeDecodeError" in _err(path)

def test_damaged_vectors(tmp_path):
    _, path, snap = saved(tmp_path)
    vp, good = snap/'vectors.npy', (snap/'vectors.npy').read_bytes()
    vp.write_bytes(good[:200]); assert "vectors.npy' are unreadable" in _err(path) and 'truncated' in _err(path)
    vp.write_bytes(b''); assert "vectors.npy' are unreadable" in _err(path)
    vp.write_bytes(good[:-4] + b'\x00\x00\xc0\x7f'); assert "do not match the checksum" in _err(path)
    np.save(vp, np.zeros((12, 16), np.float32)); assert "hold float32 (12, 16), but store.json says float32 (12, 32)" in _err(path)
    np.save(vp, np.zeros((12, 32), np.float64)); assert "hold float64 (12, 32)" in _err(path)
    vp.unlink(); m = _err(path); assert "vectors.npy' is missing" in m, m
    vp.write_bytes(good); assert len(load(path)) == 12

def test_embedder_mismatch(tmp_path):
    _, path, _ = saved(tmp_path)
    assert "built with embedder 'hash-32' (dim 32) but is being loaded with 'hash-16' (dim 16)" in _err(path, 16)
    with pytest.raises(CaseStoreError, match="built with embedder 'hash-32'"): EmbeddingStore.load(path, HashEmbedder(32, name='minilm'))
    assert len(EmbeddingStore.load(path, HashEmbedder(32, name='other'), name='hash-32')) == 12  # same model under another name

def test_failed_save_leaves_previous_store(tmp_path):
    st, path, _ = saved(tmp_path, n=6)
    st.add(DOCS[6:], META[6:], [f"d{i}" for i in range(6, 12)])
    with mock.patch('research_controller.cases.np.save', side_effect=OSError(errno.ENOSPC, 'No space left on device')):
        with pytest.raises(CaseStoreError, match="no space left on device writing .*vectors.npy'; the saved store was not replaced"): st.save(path)
    assert len(load(path)) == 6
    assert [p.name for p in path.iterdir() if p.name.startswith('.tmp-')] == []
    st.save(path); assert len(load(path)) == 12

def test_second_writer_waits_then_fails_clearly(tmp_path):
    st, path, _ = saved(tmp_path)
    lock = FileLock(str(path/'.lock')); lock.acquire()
    try:
        with pytest.raises(CaseStoreError, match="is being saved by another process"): st.save(path, lock_timeout=0.2)
    finally: lock.release()
    st.save(path)

# --- concurrency -------------------------------------------------------------------------------------------------

def test_in_process_readers_never_see_a_torn_add():
    st, stop, problems, counts = EmbeddingStore(HashEmbedder(32)), threading.Event(), [], []
    def writer():
        for g in range(60):
            st.add([f"entry {g*3 + j} w{g*3 + j}" for j in range(3)], [dict(i=g*3 + j) for j in range(3)], [f"e{g*3 + j}" for j in range(3)])
            time.sleep(0.001)  # let the readers in between adds
        stop.set()
    def reader():
        n = 0
        while not stop.is_set() or n < 5:
            size = len(st)
            if size % 3: problems.append(('size', size))
            for h in st.search("entry w5", k=5):
                if h.id != f"e{h.metadata['i']}" or not h.text.startswith(f"entry {h.metadata['i']} "): problems.append(h)
            n += 1
        counts.append(n)
    ts = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(4)]
    for t in ts: t.start()
    for t in ts: t.join(30)
    assert (problems, len(st)) == ([], 180)
    assert len(counts) == 4 and min(counts) > 0, counts

def _consistent(s:EmbeddingStore, batch:int) -> bool:
    n = len(s)
    return n % batch == 0 and s._snap.ids == [f"e{i}" for i in range(n)] and all(m['i'] == i for i, m in enumerate(s._snap.metadata))

def test_on_disk_readers_never_see_a_half_written_store(tmp_path):
    path, B, st, stop, problems, sizes = tmp_path/'busy', 5, EmbeddingStore(HashEmbedder(32)), threading.Event(), [], []
    st.save(path)
    def writer():
        for g in range(25):
            st.add([f"entry {g*B + j} w{g*B + j}" for j in range(B)], [dict(i=g*B + j) for j in range(B)], [f"e{g*B + j}" for j in range(B)])
            st.save(path, keep=2)
        stop.set()
    def reader():
        while not stop.is_set():
            try: s = load(path)
            except CaseStoreError as e: problems.append(str(e)); continue
            if not _consistent(s, B): problems.append(len(s))
            sizes.append(len(s))
    ts = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in ts: t.start()
    for t in ts: t.join(60)
    assert problems == []
    assert len(sizes) > 0 and len(load(path)) == 125, sizes

def test_reader_in_another_process(tmp_path):
    "A reader process loads in a loop while this process saves: every load is whole (renames are atomic across processes)."
    path, B = tmp_path/'xproc', 4
    st = EmbeddingStore(HashEmbedder(32)); st.save(path)
    child = textwrap.dedent(f"""
        import sys, time
        from research_controller.cases import EmbeddingStore, HashEmbedder
        bad = loads = 0; t = time.time()
        while time.time() - t < 60:
            s = EmbeddingStore.load({str(path)!r}, HashEmbedder(32)); n = len(s); loads += 1
            if n % {B} or s._snap.ids != [f"e{{i}}" for i in range(n)]: bad += 1
            if n == {B*20}: break
        print(loads, bad)
    """)
    p = subprocess.Popen([sys.executable, '-c', child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for g in range(20):
            st.add([f"entry {g*B + j}" for j in range(B)], [dict(i=g*B + j) for j in range(B)], [f"e{g*B + j}" for j in range(B)])
            st.save(path); time.sleep(0.02)
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 0, err
    loads, bad = map(int, out.split())
    assert (bad, loads > 0) == (0, True), (loads, bad)

# --- the case index ----------------------------------------------------------------------------------------------

TRAJ = [dict(prompt='Tom has 3 apples and buys 4 more. How many apples?', actions=['CONTINUE', 'STOP'], reward=0.2, task='gsm8k', item_id='g1', controller_version='v1'),
        dict(prompt='Tom has 3 apples and buys 4 more.  How many apples?', actions=['THINK_BEGIN', 'CONTINUE', 'THINK_END', 'STOP'], reward=0.9, task='gsm8k', item_id='g1', controller_version='v2'),
        dict(prompt='What is the capital of France?', actions=[0, 4], reward=0.7, task='squad', item_id='s1', controller_version='v2')]

def test_case_index_build_nearest_prior_and_reload(tmp_path):
    ci = CaseIndex(HashEmbedder(64), path=tmp_path/'ci')
    rep = ci.build(TRAJ)
    assert {k: rep[k] for k in ('trajectories', 'prompts', 'cases')} == dict(trajectories=3, prompts=2, cases=2)
    near = ci.nearest("Ann has 2 apples and buys 5 more. How many apples?", k=2)
    assert [(c.item_id, c.reward, c.trajectories, c.controller_version) for c in near] == [('g1', 0.9, 2, 'v2'), ('s1', 0.7, 1, 'v2')]
    assert near[0].similarity > near[1].similarity
    prior = ci.first_actions("Ann has 2 apples and buys 5 more. How many apples?", k=1)
    assert prior.tolist() == np.eye(N_ACTIONS)[Action.THINK_BEGIN].tolist()
    assert ci.first_actions("apples", k=1, at=1).tolist() == np.eye(N_ACTIONS)[Action.CONTINUE].tolist()
    ld = CaseIndex.load(tmp_path/'ci', HashEmbedder(64))
    assert [c.item_id for c in ld.nearest("capital of France", k=2)] == ['s1', 'g1']
    assert [c.task for c in ld.nearest("apples", k=2, where={'task': 'squad'})] == ['squad']
    assert ci.build(TRAJ, min_reward=0.8)['cases'] == 1
    assert len(ld.reload()) == 1

def test_case_index_from_buffer_groups_positions_by_episode(tmp_path):
    with ReplayBuffer(tmp_path/'buf', dim=3, n_actions=N_ACTIONS, capacity=50, dtype='float32') as rb:
        for k, (pid, r, acts) in enumerate([('g1', 0.3, ['CONTINUE']*4 + ['STOP']), ('g1', 0.8, ['THINK_BEGIN', 'THINK_END', 'STOP']), ('s1', 0.5, ['STOP'])]):
            T = len(acts)
            rb.add_episode(np.zeros((T, 3), np.float32), np.ones((T, N_ACTIONS), bool), np.full((T, N_ACTIONS), 1/N_ACTIONS), np.zeros(T),
                           dict(episode_id=f'e{k}', controller_version='v1', slm_fingerprint='f'*16, reward=r, task=pid[0], prompt_id=pid, actions=acts))
    ci = CaseIndex(HashEmbedder(64))
    with pytest.raises(CaseStoreError, match="none of the 3 trajectories has a prompt"): ci.build(tmp_path/'buf')
    rep = ci.build(tmp_path/'buf', prompts={'g1': 'Add two and three.', 's1': 'Capital of France?'})
    assert (rep['trajectories'], rep['cases']) == (3, 2)
    best = ci.nearest("Add two and three.", k=1)[0]
    assert (best.episode_id, best.actions, best.trajectories) == ('e1', ['THINK_BEGIN', 'THINK_END', 'STOP'], 2)
    with pytest.raises(CaseStoreError, match="no replay buffer at"): ci.build(tmp_path/'nobuf')

def test_failed_rebuild_keeps_the_old_index(tmp_path):
    ci = CaseIndex(HashEmbedder(64), path=tmp_path/'ci'); ci.build(TRAJ)
    with pytest.raises(CaseStoreError, match="action 'FLY' is not a macro-action"): ci.build(TRAJ + [dict(prompt='p', actions=['FLY'], reward=1.0)])
    assert len(ci) == 2 and len(CaseIndex.load(tmp_path/'ci', HashEmbedder(64))) == 2
    with pytest.raises(CaseStoreError, match="was never built"): CaseIndex(HashEmbedder(8)).rebuild()

def test_plain_store_is_not_a_case_index(tmp_path):
    _, path, _ = saved(tmp_path)
    with pytest.raises(CaseStoreError, match="is an embedding store but not a case index"): CaseIndex.load(path, HashEmbedder(32))

def test_cases_prior_and_mix_prior():
    cs = [Case('a', ['THINK_BEGIN'], 1.0, similarity=0.75), Case('b', ['CONTINUE'], 1.0, similarity=0.25), Case('c', ['STOP'], 1.0, similarity=-0.5)]
    assert np.allclose(cases_prior(cs), [0.25, 0.75, 0, 0, 0])
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random(N_ACTIONS) < 0.5; mask[rng.integers(N_ACTIONS)] = True
        prior = rng.random(N_ACTIONS)*mask; case = rng.random(N_ACTIONS)*(rng.random(N_ACTIONS) < 0.5)
        out = mix_prior(prior, case, float(rng.random()), mask=mask)
        assert abs(out.sum() - 1) < 1e-6 and (out >= 0).all() and (out[~mask] == 0).all(), (prior, case, mask, out)
    p = np.array([0.6, 0.4, 0, 0, 0], np.float32)
    assert np.allclose(mix_prior(p, np.zeros(N_ACTIONS), 0.7), p)
    assert np.allclose(mix_prior(p, np.array([0, 0, 0, 0, 1.0]), 0.7), p)  # all the case mass illegal: unchanged
    assert np.allclose(mix_prior(p, np.array([0, 1.0, 0, 0, 0]), 0.5), [0.3, 0.7, 0, 0, 0])
    for args, msg in [((p, p, -0.1), 'weight must be a number in [0, 1]'), ((p, p[:2], 0.5), 'same shape'), ((p, -p, 0.5), 'non-negative'),
                      ((np.zeros(5), p, 0.5), 'no legal action')]:
        with pytest.raises(CaseStoreError, match=msg.replace('[', r'\[').replace(']', r'\]')): mix_prior(*args)

def test_format_cases():
    cs = [Case('What is 2 + 2?', ['CONTINUE']*3 + ['STOP'], 0.8, task='gsm8k', item_id='g7', controller_version='v4', trajectories=3, similarity=0.91234)]
    txt = format_cases(cs, prompt='What is 3 + 3?')
    assert txt.splitlines() == ["1 nearest past case for 'What is 3 + 3?':",
                                " 1. similarity 0.912 | task gsm8k | reward 0.800 | controller v4 | item g7 | 3 tries",
                                "    prompt : What is 2 + 2?",
                                "    actions: CONTINUE x3, STOP (4 moves)"], txt
    assert 'none' in format_cases([], 'x')
    assert set(ACTION_NAMES) >= {'CONTINUE', 'STOP'}
