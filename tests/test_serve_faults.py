"The HTTP service under raw bad requests on a real server (uvicorn, 127.0.0.1): oversized chunked bodies and lying Content-Lengths are cut off at the limit without the server's memory growing, bodies that are not JSON get a 400 that names the problem, and every request lands in exactly one outcome counter."
import contextlib, http.client, json, select, socket, threading, time

import pytest
import torch

from research_controller.config import load_config
from research_controller.controllers import make_controller
from research_controller.engine import Engine
from research_controller.serve import OUTCOMES, MAX_JSON_DEPTH, ServerThread, StaticResolver, body_limit, create_app
from research_controller.slm import tiny_slm

MB = 2**20
PIECE = 64 * 1024
BODY_MB = 100  # the oversized bodies: 1600 pieces of 64 KiB


@pytest.fixture(scope='module')
def server():
    "A real uvicorn server on a free loopback port, serving the greedy baseline on the tiny random model (no real SLM)."
    torch.set_num_threads(1)
    cfg = load_config(overrides=['features.drift_embedder=slm', 'macro.chunk_tokens=4', 'serve.max_concurrency=2'])
    model, tok = tiny_slm(cfg)
    app = create_app(cfg, engine=Engine(model, tok, cfg), resolver=StaticResolver({'greedy': make_controller('greedy', cfg)}))
    with ServerThread(app) as srv:
        srv.cfg, srv.app, srv.statuses = cfg, app, []
        yield srv


def rss_kb(field='VmRSS') -> int:
    "This process's resident memory (VmRSS) or its peak (VmHWM), in KiB; the server runs in this process."
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ':'))


@contextlib.contextmanager
def peak_rss_growth():
    "Yields a dict whose 'bytes' is, after the block, how far this process's resident memory peaked above where it started."
    out, base = {}, rss_kb()
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')  # reset the peak (VmHWM) to the current RSS
        sampler = None
    except OSError:  # no clear_refs here: sample instead
        peak, stop = [base], threading.Event()
        def sample():
            while not stop.wait(0.002): peak[0] = max(peak[0], rss_kb())
        sampler = threading.Thread(target=sample, daemon=True); sampler.start()
    yield out
    if sampler is None: out['bytes'] = (rss_kb('VmHWM') - base) * 1024
    else: stop.set(); sampler.join(); out['bytes'] = (max(peak[0], rss_kb()) - base) * 1024


def read_response(sock) -> tuple[int, dict, dict]:
    "Status, headers (lower-case names) and JSON body of the next response on `sock`."
    r = http.client.HTTPResponse(sock)
    r.begin()
    raw = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw) if raw[:1] == b'{' else raw.decode(errors='replace')


def post_raw(srv, headers:dict, first:bytes=b'', pieces:int=0, piece:bytes=b'', chunked:bool=False, limit_s:float=20.0):
    "POST to /generate over a raw socket: `first`, then up to `pieces` copies of `piece`, reading the answer as soon as it comes: (status, headers, body, bytes sent)."
    head = ''.join(f'{k}: {v}\r\n' for k, v in {'Host': '127.0.0.1', 'Content-Type': 'application/json', **headers}.items())
    frame = (lambda b: b'%x\r\n' % len(b) + b + b'\r\n') if chunked else (lambda b: b)
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    sent, t0 = 0, time.monotonic()
    try:
        sock.sendall(f'POST /generate HTTP/1.1\r\n{head}\r\n'.encode() + (frame(first) if first else b''))
        sent += len(first)
        for _ in range(pieces):
            if select.select([sock], [], [], 0)[0] or time.monotonic() - t0 > limit_s: break  # the server answered (or we give up)
            sock.sendall(frame(piece)); sent += len(piece)
        else:
            if chunked: sock.sendall(b'0\r\n\r\n')
    except OSError: pass  # the server answered and closed the connection while we were still sending: expected
    try: status, hdrs, body = read_response(sock)
    finally: sock.close()
    srv.statuses.append(status)
    return status, hdrs, body, sent


def post_body(srv, body:bytes, content_type='application/json'):
    "POST `body` (with a Content-Length) to /generate: (status, JSON answer)."
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        c.request('POST', '/generate', body=body, headers={'Content-Type': content_type} if content_type else {})
        r = c.getresponse(); raw = r.read()
    finally: c.close()
    srv.statuses.append(r.status)
    return r.status, json.loads(raw)


def stats(srv) -> dict:
    "The server's counters, once no generation runs (bounded wait)."
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        for _ in range(100):
            c.request('GET', '/health'); s = json.loads(c.getresponse().read())['stats']
            if s['active'] == 0: return s
            time.sleep(0.05)
    finally: c.close()
    raise AssertionError(f"a generation is still running: {s}")


def test_chunked_oversized_body_is_cut_off_at_the_limit(server):
    "A 100 MB chunked body (no Content-Length): 413 naming the limit and the setting, the connection closes, and the server's memory barely moves."
    limit = body_limit(server.cfg)
    with peak_rss_growth() as rss:
        status, hdrs, body, sent = post_raw(server, {'Transfer-Encoding': 'chunked'}, b'{"prompt": "', BODY_MB * MB // PIECE, b'a' * PIECE, chunked=True)
    assert status == 413, (status, body)
    assert body['detail'].startswith(f"request body of more than {limit} bytes is too large: the limit is {limit} bytes, "
                                     f"set by serve.max_prompt_chars={server.cfg.serve.max_prompt_chars}"), body
    assert hdrs.get('connection') == 'close', hdrs
    assert sent < BODY_MB * MB / 4, f"the client could send {sent / MB:.1f} MB before the answer: the server kept reading"
    assert rss['bytes'] < 10 * MB, f"server memory grew by {rss['bytes'] / MB:.1f} MB for a {BODY_MB} MB body"
    print(f"chunked {BODY_MB} MB: 413 after the client sent {sent / MB:.1f} MB; peak RSS growth {rss['bytes'] / MB:.2f} MB")


def test_content_length_that_understates_a_chunked_body(server):
    "Content-Length: 100 next to Transfer-Encoding: chunked (chunked wins) and 100 MB behind it: the bytes are counted, not the header."
    with peak_rss_growth() as rss:
        status, hdrs, body, sent = post_raw(server, {'Content-Length': '100', 'Transfer-Encoding': 'chunked'}, b'{"prompt": "',
                                            BODY_MB * MB // PIECE, b'a' * PIECE, chunked=True)
    assert (status, hdrs.get('connection')) == (413, 'close'), (status, hdrs, body)
    assert 'serve.max_prompt_chars' in body['detail'], body
    assert rss['bytes'] < 10 * MB, f"server memory grew by {rss['bytes'] / MB:.1f} MB for a {BODY_MB} MB body"
    print(f"lying Content-Length + chunked {BODY_MB} MB: 413 after {sent / MB:.1f} MB sent; peak RSS growth {rss['bytes'] / MB:.2f} MB")


def test_content_length_over_the_limit_is_refused_before_the_body(server):
    "Content-Length: 10 GB and no body at all: 413 at once, without waiting for a byte of it."
    t0 = time.monotonic()
    status, hdrs, body, _ = post_raw(server, {'Content-Length': str(10 * 2**30)})
    assert (status, hdrs.get('connection')) == (413, 'close'), (status, hdrs, body)
    assert body['detail'].startswith(f"request body of {10 * 2**30} bytes is too large"), body
    assert time.monotonic() - t0 < 5, "the server waited for the body"


def test_content_length_that_understates_a_raw_body(server):
    "Content-Length: 20 and 10 MB of bytes behind it: the app answers for the 20 bytes it was given (400, cut-short JSON), the rest is not a request (400), nothing grows."
    with peak_rss_growth() as rss:
        status, _, body, sent = post_raw(server, {'Content-Length': '20'}, b'{"prompt": "aaaaaaaa', 10 * MB // PIECE, b'a' * PIECE)
    assert status == 400, (status, body)
    assert body['errors'][0]['field'] == 'prompt' and body['detail'].startswith('malformed JSON at line 1, column 12 (in prompt): Unterminated string'), body
    assert rss['bytes'] < 10 * MB, f"server memory grew by {rss['bytes'] / MB:.1f} MB"


def test_client_that_leaves_mid_body_is_counted_cancelled(server):
    "Content-Length: 1000, 10 bytes sent, then the client closes: no answer is owed, and the request counts as cancelled."
    before = stats(server)
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(b'POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"prompt":')
    time.sleep(0.2); sock.close()
    for _ in range(50):
        after = stats(server)
        if after['requests'] > before['requests']: break
        time.sleep(0.05)
    assert {k: after[k] - before[k] for k in ('requests', 'cancelled')} == dict(requests=1, cancelled=1), (before, after)


@pytest.mark.parametrize('body, detail, field', [
    (b'{"prompt": "caf\xe9 au lait"}', 'body is not valid UTF-8 at byte 15 (invalid continuation byte)', 'body'),
    (b'{"prompt": ' + b'[' * 9000 + b']' * 9000 + b'}', f'JSON nested deeper than {MAX_JSON_DEPTH} levels (at line 1, column {12 + MAX_JSON_DEPTH - 1})', 'body'),
    (b'{"prompt": "Hi" "seed": 3}', "malformed JSON at line 1, column 17 (in prompt): Expecting ',' delimiter", 'prompt'),
    (b'{"prompt": "Hi",\n "seed": }', 'malformed JSON at line 2, column 10 (in seed): Expecting value', 'seed'),
    (b'{"prompt": "Hi", ', 'malformed JSON at line 1, column 18: Expecting property name enclosed in double quotes', 'body'),
], ids=['utf8', 'deep', 'no-comma', 'no-value', 'cut-short'])
def test_body_that_is_not_json_is_named(server, body, detail, field):
    "Bad UTF-8, 9000-deep JSON, malformed JSON: a 400 whose detail says what and where, and whose field is a JSON path (not a byte offset)."
    status, ans = post_body(server, body)
    assert status == 400, (status, ans)
    assert ans['detail'].startswith(detail), ans
    assert ans['errors'][0]['field'] == field, ans


def test_nul_in_prompt_is_refused(server):
    "A NUL character in the prompt: 422 naming the field and the index (refused, not stripped)."
    status, ans = post_body(server, json.dumps(dict(prompt='What is\x00 2+2?', max_new_tokens=4)).encode())
    assert status == 422, (status, ans)
    assert ans['detail'] == 'prompt: Value error, contains a NUL character at index 7; remove it (a text prompt cannot hold NUL)', ans
    assert [e['field'] for e in ans['errors']] == ['prompt'], ans


def test_unknown_controller_is_counted(server):
    "An unknown controller: 404 with the valid names, counted as not_found."
    before = stats(server)
    status, ans = post_body(server, json.dumps(dict(prompt='Hi', controller='v99')).encode())
    assert (status, ans['detail']['valid']) == (404, ['active', 'greedy']), (status, ans)
    after = stats(server)
    assert {k: after[k] - before[k] for k in ('requests', 'not_found')} == dict(requests=1, not_found=1), (before, after)


def test_every_request_has_exactly_one_outcome(server):
    "One request of each kind moves `requests` and exactly one outcome counter; the outcomes sum to `requests`; no answer was a 5xx."
    ok = json.dumps(dict(prompt='Hi', max_new_tokens=4)).encode()
    cases = [(ok, 'ok', 200), (json.dumps(dict(prompt='Hi', controller='nope')).encode(), 'not_found', 404),
             (json.dumps(dict(prompt='Hi', max_new_tokens=0)).encode(), 'rejected', 422), (b'{"prompt": "Hi" ', 'rejected', 400),
             (b'{"prompt": "' + b'a' * body_limit(server.cfg) + b'"}', 'rejected', 413)]
    for body, outcome, code in cases:
        before = stats(server)
        status, ans = post_body(server, body)
        after = stats(server)
        assert status == code, (outcome, status, ans)
        moved = {k: after[k] - before[k] for k in ('requests', *OUTCOMES) if after[k] != before[k]}
        assert moved == {'requests': 1, outcome: 1}, (outcome, moved)
    s = stats(server)
    assert sum(s[k] for k in OUTCOMES) == s['requests'], s
    assert [c for c in server.statuses if c >= 500] == [], server.statuses
