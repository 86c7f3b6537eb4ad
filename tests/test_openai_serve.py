"The OpenAI-compatible routes of a real `rc serve` process (the default SLM, loopback), through the official `openai` client: chat, completion, streaming, the model list, errors, and feedback on an answer."
import json, os, signal, subprocess, sys, time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip('openai', reason="the openai client is in the [dev] extra: pip install -e '.[dev]'")

from research_controller.config import load_config
from research_controller.serve import free_port, load_served_trajectories

RC = Path(sys.executable).with_name('rc')  # the console script installed next to this interpreter
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false',
       'WANDB_MODE': 'offline', 'OMP_NUM_THREADS': '1'}
for k in ('OPENAI_BASE_URL', 'OPENAI_API_KEY', 'OPENAI_ORG_ID', 'OPENAI_PROJECT_ID'): ENV.pop(k, None)
QUESTION = "What is the capital of France?"
SETS = ['features.drift_embedder=slm', 'serve.max_new_tokens=32', 'serve.max_concurrency=1', 'serve.request_timeout_s=60']


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    "`rc serve` on a free loopback port, its runs (registry: none, so `active` is the default controller, the think gate; the served log) in a temp dir."
    assert RC.exists(), f"no installed rc command at {RC}; run `pip install -e .` in the project's environment"
    tmp = tmp_path_factory.mktemp('rc_serve')
    port, sets = free_port(), SETS + [f"paths.runs_dir={tmp/'runs'}"]
    out = open(tmp/'serve.log', 'w')
    proc = subprocess.Popen([str(RC), 'serve', '--host', '127.0.0.1', '--port', str(port), *[a for s in sets for a in ('--set', s)]],
                            cwd=tmp, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            if proc.poll() is not None: pytest.fail(f"rc serve exited with {proc.returncode}:\n{(tmp/'serve.log').read_text()[-3000:]}")
            try:
                if httpx.get(url + '/health', timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            if time.monotonic() - t0 > 180: pytest.fail(f"rc serve did not answer within 180 s:\n{(tmp/'serve.log').read_text()[-3000:]}")
            time.sleep(0.25)
        client = openai.OpenAI(base_url=url + '/v1', api_key='unused', max_retries=0, timeout=90)
        yield dict(url=url, client=client, cfg=load_config(overrides=sets), log=tmp/'serve.log', proc=proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        out.close()


def generate(server, prompt, controller, max_new_tokens, **kw) -> dict:
    "The server's own /generate answer to compare with."
    r = httpx.post(server['url'] + '/generate', json=dict(prompt=prompt, controller=controller, max_new_tokens=max_new_tokens, **kw), timeout=90)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_list(server):
    "GET /v1/models lists 'active', the baselines (and versions); a model can be retrieved; 'active' says what it serves."
    models = {m.id: m for m in server['client'].models.list()}
    assert {'active', 'greedy', 'threshold', 'sampling', 'best_of_n'} <= set(models), sorted(models)
    assert models['active'].serves == 'think_gate' and models['greedy'].kind == 'baseline', models['active']
    assert server['client'].models.retrieve('greedy').id == 'greedy'


def test_chat_completion(server):
    "A chat answer equals /generate's answer to the same prompt (greedy, same budget); usage counts the prompt and every token spent; the trace rides on the choice."
    r = server['client'].chat.completions.create(model='greedy', messages=[{'role': 'user', 'content': QUESTION}], max_tokens=12)
    want = generate(server, QUESTION, 'greedy', 12, include_trace=True)
    ch = r.choices[0]
    assert (r.object, r.model, ch.message.role) == ('chat.completion', 'greedy', 'assistant')
    assert ch.message.content == want['text'] and ch.message.content.strip(), (ch.message.content, want['text'])
    assert r.usage.completion_tokens == want['tokens'] == ch.macro_trace[-1]['spent'], (r.usage, want['tokens'])
    assert r.usage.prompt_tokens > 5 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
    assert ch.finish_reason in ('length', 'stop') and [e['action'] for e in ch.macro_trace] == [e['action'] for e in want['macro_trace']]
    assert r.id.startswith('gen-') and r.controller == 'greedy', r.id


def test_conversation_and_sampling(server):
    "A multi-turn conversation goes through the chat template whole (more prompt tokens); temperature and seed sample reproducibly."
    one = server['client'].chat.completions.create(model='greedy', messages=[{'role': 'user', 'content': QUESTION}], max_tokens=4)
    conv = [{'role': 'system', 'content': 'Answer in one word.'}, {'role': 'user', 'content': 'Hi'},
            {'role': 'assistant', 'content': 'Hello!'}, {'role': 'user', 'content': QUESTION}]
    multi = server['client'].chat.completions.create(model='greedy', messages=conv, max_tokens=8)
    assert multi.usage.prompt_tokens > one.usage.prompt_tokens and multi.choices[0].message.content.strip(), (multi.usage, one.usage)
    hot = [server['client'].chat.completions.create(model='greedy', messages=conv, max_tokens=8, temperature=1.2, seed=s).choices[0].message.content
           for s in (7, 7)]
    assert hot[0] == hot[1], hot


def test_completion(server):
    "/v1/completions treats its prompt as /generate does."
    r = server['client'].completions.create(model='greedy', prompt=QUESTION, max_tokens=12)
    want = generate(server, QUESTION, 'greedy', 12)
    assert (r.object, r.choices[0].text, r.usage.completion_tokens) == ('text_completion', want['text'], want['tokens'])


def test_streaming(server):
    "stream=True: the deltas add up to the answer; the last chunk carries finish_reason, macro_trace and usage; completions stream too."
    want = generate(server, QUESTION, 'threshold', 24, include_trace=True)
    chunks = list(server['client'].chat.completions.create(model='threshold', messages=[{'role': 'user', 'content': QUESTION}], max_tokens=24,
                                                           stream=True))
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert ''.join(c.choices[0].delta.content or '' for c in chunks) == want['text']
    last = chunks[-1]
    assert last.choices[0].finish_reason in ('length', 'stop') and last.usage.completion_tokens == want['tokens'], last
    assert [e['action'] for e in last.choices[0].macro_trace] == [e['action'] for e in want['macro_trace']]
    assert len({c.id for c in chunks}) == 1 and all(c.object == 'chat.completion.chunk' for c in chunks)
    text = list(server['client'].completions.create(model='greedy', prompt=QUESTION, max_tokens=12, stream=True))
    assert ''.join(c.choices[0].text for c in text) == generate(server, QUESTION, 'greedy', 12)['text']


def test_unknown_model_and_bad_parameters(server):
    "An unknown model: NotFoundError naming it and the valid names; a bad parameter: BadRequestError naming the field and the limit."
    with pytest.raises(openai.NotFoundError) as e:
        server['client'].chat.completions.create(model='v99', messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=4)
    err = e.value.body
    assert err['code'] == 'model_not_found' and err['param'] == 'model', err
    assert "model 'v99' does not exist here; valid models: ['active'," in err['message'] and 'greedy' in err['valid'], err
    with pytest.raises(openai.NotFoundError):
        list(server['client'].chat.completions.create(model='nope', messages=[{'role': 'user', 'content': 'Hi'}], stream=True))
    with pytest.raises(openai.BadRequestError) as e:
        server['client'].chat.completions.create(model='greedy', messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=1000)
    assert e.value.body['param'] == 'max_tokens' and 'limit set by serve.max_new_tokens' in e.value.body['message'], e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        server['client'].chat.completions.create(model='greedy', messages=[{'role': 'user', 'content': 'Hi'}], n=2)
    assert 'only n=1 is supported' in e.value.body['message'], e.value.body


def test_feedback_on_an_openai_answer(server):
    "The answer's id takes feedback; the served-trajectory log (read by another process) holds the text, trace, controller and the rating."
    r = server['client'].chat.completions.create(model='greedy', messages=[{'role': 'user', 'content': QUESTION}], max_tokens=8)
    fb = httpx.post(server['url'] + '/feedback', json=dict(id=r.id, rating=0.9), timeout=30)
    assert fb.status_code == 200 and fb.json()['value'] == 0.9, fb.text
    rec = next(t for t in load_served_trajectories(server['cfg']) if t['id'] == r.id)
    assert (rec['text'], rec['key'], rec['feedback']['rating'], rec['route']) == (r.choices[0].message.content, 'greedy', 0.9, 'v1/chat/completions')
    assert [e['action'] for e in rec['macro_trace']] == [e['action'] for e in r.choices[0].macro_trace]
    assert 'Traceback' not in server['log'].read_text()
