"""Is the shipped Gemma 3 270M GGUF a base or an instruct model, and where do its answers end?

Prints the GGUF metadata that tells (name, chat template), the token ids of a chat-templated prompt (one <bos>),
log p(<end_of_turn>) after a complete chat answer (an instruct model puts it near 0), and greedy answers
before (EOS = <eos> and <end_of_turn> only, no cue) and after `base_model_stops` (newline stop, `Answer:` cue).
A few short generations on CPU, under a minute:  python benchmarks/gemma_base_probe.py
"""
import os
for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'): os.environ.setdefault(k, '1')
import torch
from research_controller.config import load_config
from research_controller.slm import encode_prompt, load_slm, resolve_source

torch.set_num_threads(1)
cfg = load_config(overrides=['slm.source=gemma3-270m', 'slm.dtype=float32'])
src = resolve_source(cfg.slm)
from gguf import GGUFReader
fields = GGUFReader(src.path).fields
print('general.name:', fields['general.name'].contents(), '| tokenizer.chat_template in GGUF:', 'tokenizer.chat_template' in fields)

model, tok = load_slm(cfg)
turn = "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
ids = tok(turn)['input_ids']
print('chat prompt ids:', ids, '| <bos> count:', ids.count(tok.bos_token_id))
with torch.inference_mode():
    x = torch.tensor([tok(turn + "The capital of France is Paris.")['input_ids']])
    lp = torch.log_softmax(model(x).logits[0, -1].float(), -1)
print(f"log p(<end_of_turn>) after a complete answer: {lp[tok.convert_tokens_to_ids('<end_of_turn>')].item():.2f}"
      f" (<eos> {lp[tok.eos_token_id].item():.2f})")

ctx = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France. "
       "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.")
prompts = ["What is the capital of France?",
           cfg.tasks.squad_template.format(context=ctx, question="In what country is Normandy located?"),
           cfg.tasks.nq_open_template.format(question="who wrote the novel moby dick")]
eot = [tok.eos_token_id, tok.convert_tokens_to_ids('<end_of_turn>')]

@torch.inference_mode()
def greedy(ids, eos, n=48):
    x = torch.tensor([ids])
    out = model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    return out[0, x.shape[1]:].tolist()

for p in prompts:
    before = greedy(tok(turn.replace("What is the capital of France?", p))['input_ids'], eot)
    plain = greedy(tok(p)['input_ids'], eot)
    after = greedy(encode_prompt(tok, p, cfg), model.generation_config.eos_token_id)
    print(f"\n{p[-60:]!r}\n  chat template, EOS <eos>/<end_of_turn> ({len(before)} tokens): {tok.decode(before)!r}"
          f"\n  plain, EOS <eos>/<end_of_turn> ({len(plain)} tokens): {tok.decode(plain)!r}"
          f"\n  base_model_stops ({len(after)} tokens): {tok.decode(after)!r}")
