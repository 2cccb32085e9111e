"""The prompt formatter (`federated/prompts.py`): chat templates, Alpaca, BOS/EOS/pad conventions, stop tokens.

Tokenizers only (offline variants of the embedded tokenizer), except one generation on the embedded model."""

from types import SimpleNamespace

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from fedleak.attacks.extraction.generate_rank import start_ids
from fedleak.common.errors import FedleakError
from fedleak.federated import selfgen
from fedleak.federated.data import Record, generate_records
from fedleak.federated.dataquality import truncation_counts
from fedleak.federated.generation import generate
from fedleak.federated.model import load_base_model
from fedleak.federated.prompts import (example_ids, format_prompt, instruction_header, is_chat, pad_id, prompt_ids,
                                       prompt_format, set_prompt_format, stop_ids)
from fedleak.federated.training import IGNORE, collate, encode, truncation

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A Llama-2-like template: BOS written by the template, the assistant turn closed by EOS.
EOS_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
                "message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
                "{% endfor %}")

RECORD = Record(instruction="Summarise the note.", input="Patient has a cough.",
                output="Rest and fluids; call 555-111-2222.", category="triage", record_id="r0")


@pytest.fixture(scope="module")
def tokenizers(small_model_path):
    def fresh():
        return AutoTokenizer.from_pretrained(small_model_path)

    chat = fresh()
    chat.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    chat.chat_template = CHATML
    eos_chat = fresh()
    eos_chat.chat_template = EOS_TEMPLATE
    bos = fresh()  # adds BOS by default, as Llama and Mistral tokenizers do
    bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos.bos_token_id)])
    gpt2 = fresh()  # no pad token, left padding by default
    gpt2.pad_token = None
    gpt2.padding_side = "left"
    return SimpleNamespace(plain=fresh(), chat=chat, eos_chat=eos_chat, bos=bos, gpt2=gpt2)


def _labelled(example):
    return [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]


def test_chat_labels_cover_exactly_the_answer_and_its_end_of_turn(tokenizers):
    tok = tokenizers.chat
    assert prompt_format(tok) == "chat"  # auto: the tokenizer has a template
    example = encode([RECORD], tok, max_length=512)[0]
    labelled = _labelled(example)
    assert tok.decode(labelled) == RECORD.output + "<|im_end|>"
    n_prompt = len(example.input_ids) - len(labelled)
    assert example.labels[:n_prompt] == (IGNORE,) * n_prompt and list(example.input_ids[n_prompt:]) == labelled
    # The masked part is exactly the generation prompt: user turn (instruction, blank line, input), assistant header.
    head = prompt_ids(tok, RECORD.instruction, RECORD.input)
    assert list(example.input_ids[:n_prompt]) == head
    assert tok.decode(head) == ("<|im_start|>user\nSummarise the note.\n\nPatient has a cough.<|im_end|>\n"
                                "<|im_start|>assistant\n")
    # One end of turn, no EOS appended after it.
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert example.input_ids[-1] == end and tok.eos_token_id not in example.input_ids
    assert encode([RECORD], tok, max_length=512, response_only=False)[0].labels == example.input_ids


def test_chat_template_that_closes_the_turn_with_eos_gets_it_once(tokenizers):
    tok = tokenizers.eos_chat
    example = encode([RECORD], tok, max_length=512)[0]
    assert example.input_ids.count(tok.eos_token_id) == 1 and example.input_ids[-1] == tok.eos_token_id
    assert example.input_ids.count(tok.bos_token_id) == 1 and example.input_ids[0] == tok.bos_token_id
    assert tok.decode(_labelled(example), skip_special_tokens=True).strip() == RECORD.output
    assert stop_ids(None, tok) == [tok.eos_token_id]  # the end of turn is EOS itself: no duplicate


def test_set_prompt_format_resolves_and_refuses_chat_without_a_template(tokenizers):
    plain, chat = tokenizers.plain, tokenizers.chat
    assert prompt_format(plain) == "alpaca" and not is_chat(plain)
    with pytest.raises(FedleakError) as info:
        set_prompt_format(plain, "chat")
    message = str(info.value)
    assert "model.prompt_format" in message and "alpaca" in message and "\n" not in message
    with pytest.raises(FedleakError, match="model.prompt_format"):
        set_prompt_format(plain, "chatml")
    assert set_prompt_format(plain, "auto") == "alpaca"
    try:
        assert set_prompt_format(chat, "alpaca") == "alpaca" and not is_chat(chat)
        assert prompt_ids(chat, "Hi") == plain("### Instruction:\nHi\n### Response:\n",
                                               add_special_tokens=False)["input_ids"]
        assert set_prompt_format(chat, "auto") == "chat" and is_chat(chat)
    finally:
        set_prompt_format(chat, "auto")


def test_alpaca_with_a_bos_tokenizer_has_one_bos_and_one_eos(tokenizers):
    tok = tokenizers.bos
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    example = encode([RECORD], tok, max_length=512)[0]
    assert example.input_ids[0] == tok.bos_token_id and example.input_ids.count(tok.bos_token_id) == 1
    assert example.input_ids[-1] == tok.eos_token_id and example.input_ids.count(tok.eos_token_id) == 1
    assert prompt_ids(tok, RECORD.instruction, RECORD.input) == list(example.input_ids[:len(example.input_ids)
                                                                                       - len(_labelled(example))])
    assert start_ids(tok, "template")[:1] == [tok.bos_token_id] and start_ids(tok, "")[0] == tok.bos_token_id
    demos = selfgen._demo_prompt(tok, [RECORD, RECORD], budget=10_000)
    assert demos.count(tok.bos_token_id) == 1 and demos[0] == tok.bos_token_id


def test_a_tokenizer_without_pad_token_encodes_collates_and_generates(tokenizers, small_model_path):
    tok = tokenizers.gpt2
    assert tok.pad_token_id is None and pad_id(tok) == tok.eos_token_id
    records = generate_records(3, seed=0, purpose="pad", private=True)
    examples = encode(records, tok, max_length=256)
    for pad in (pad_id(tok), None):
        batch = collate(examples, pad)
        lengths = [len(e.input_ids) for e in examples]
        assert batch["input_ids"].shape == (3, max(lengths))
        assert batch["attention_mask"].sum(1).tolist() == lengths  # padded on the right, whatever padding_side says
    model, loaded = load_base_model(small_model_path)
    prompts = [prompt_ids(tok, r.instruction, r.input) for r in records]
    ours = generate(model, tok, prompts, max_new_tokens=4)
    reference = generate(model, loaded, prompts, max_new_tokens=4)  # the loader's tokenizer, pad token set
    assert [g.ids for g in ours] == [g.ids for g in reference]


def test_stop_ids_join_the_generation_config_eos_list_and_the_end_of_turn(tokenizers):
    chat, plain = tokenizers.chat, tokenizers.plain
    end = chat.convert_tokens_to_ids("<|im_end|>")
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, plain.eos_token_id]))
    assert stop_ids(model, chat) == [7, chat.eos_token_id, end]
    assert stop_ids(model, plain) == [7, plain.eos_token_id]
    single = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=9))
    assert stop_ids(single, plain) == [9, plain.eos_token_id]
    assert stop_ids(None, plain) == [plain.eos_token_id]


def _old_encode(records, tokenizer, max_length):
    """fedleak's encode before the formatter, verbatim: the embedded model's ids must not change."""
    prompts = [format_prompt(r.instruction, r.input) for r in records]
    prompt_ids_ = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(prompt_ids_, response_ids):
        ids = (list(p) + list(r) + [tokenizer.eos_token_id])[:max_length]
        labels = ([IGNORE] * len(p) + list(r) + [tokenizer.eos_token_id])[:max_length]
        out.append((tuple(ids), tuple(labels)))
    return out


def test_embedded_model_ids_are_unchanged(small_model_path):
    _, tok = load_base_model(small_model_path)
    assert prompt_format(tok) == "alpaca" and tok("x")["input_ids"][0] != tok.bos_token_id  # no BOS by default
    records = generate_records(120, seed=0, purpose="ids", private=True)
    records.append(Record("Translate.", "Hola.", "Hello.", "general", "in"))  # with an input
    for max_length in (512, 48):
        new = [(e.input_ids, e.labels) for e in encode(records, tok, max_length=max_length)]
        assert new == _old_encode(records, tok, max_length)
    old_prompt = lambda r: tok(format_prompt(r.instruction, r.input), add_special_tokens=False)["input_ids"]
    assert all(prompt_ids(tok, r.instruction, r.input) == old_prompt(r) for r in records)
    assert start_ids(tok, "template") == tok("### Instruction:\n", add_special_tokens=False)["input_ids"]
    old_demos = []
    for r in records[:3]:
        old_demos += tok(format_prompt(r.instruction, r.input) + r.output, add_special_tokens=False)["input_ids"]
        old_demos.append(tok.eos_token_id)
    old_demos += tok(selfgen.INSTRUCTION_HEADER, add_special_tokens=False)["input_ids"]
    assert selfgen._demo_prompt(tok, records[:3], budget=10_000) == old_demos


def test_truncation_is_reported_in_the_prompt_format(tokenizers):
    for tok in (tokenizers.plain, tokenizers.chat):
        full, n_prompt = example_ids(tok, RECORD.instruction, RECORD.input, RECORD.output)
        cut = len(full) - 3
        examples = encode([RECORD, Record("Hi.", "", "Yes.", "x", "r1")], tok, max_length=cut)
        assert truncation(examples) == {"records": 1, "tokens": 3}
        counts = truncation_counts([RECORD], tok, max_length=cut)
        assert counts["answer_cut"] == 1 and counts["prompt_fills"] == 0
        assert counts["answer_tokens_kept"] == round((cut - n_prompt) / (len(full) - n_prompt), 4)
    assert truncation(list(examples)) == {"records": 0, "tokens": 0}


def test_chat_self_generation_asks_for_one_instruction_in_a_user_turn(tokenizers):
    tok = tokenizers.chat
    demos = [RECORD, Record("List two causes of fever.", "", "Infection, heat.", "x", "r1")]
    ids = selfgen._demo_prompt(tok, demos, budget=10_000)
    text = tok.decode(ids)
    assert text.startswith(instruction_header(tok)) and text.endswith("<|im_start|>assistant\n")
    assert "1. Summarise the note.\n\nPatient has a cough.\n2. List two causes of fever." in text
    assert RECORD.output not in text  # only the instructions are shown
    short = selfgen._demo_prompt(tok, demos, budget=len(ids) - 1)  # the second demo no longer fits
    assert "2. List" not in tok.decode(short) and "1. Summarise" in tok.decode(short)
    assert selfgen.candidate_text(tok, " 3. Describe the symptoms of flu. ") == "Describe the symptoms of flu."
    assert selfgen.candidate_text(tokenizers.plain, "3. x") == "3. x"


# Qwen3-like: a written assistant turn opens with an empty think block the generation prompt lacks.
THINK_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
                  "{% if message['role'] == 'assistant' %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
                  "{{ message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_template_opening_the_answer_with_a_think_block_keeps_it_out_of_the_labels(tokenizers):
    tok = tokenizers.chat
    before = tok.chat_template
    try:
        tok.chat_template = THINK_TEMPLATE
        example = encode([RECORD], tok, max_length=512)[0]
        assert tok.decode(_labelled(example)) == RECORD.output + "<|im_end|>"
        prompt = tok.decode(prompt_ids(tok, RECORD.instruction, RECORD.input))
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # generation sees it too
    finally:
        tok.chat_template = before


@pytest.mark.parametrize("template, says", [
    ("{{ raise_exception('no system role') }}", "fails to render a conversation (TemplateError: no system role)"),
    ("{% for m in messages %}{{ m['content'] ", "fails to render a conversation (TemplateSyntaxError"),
    ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\n' }}{% else %}"
     "{{ 'ASSISTANT: ok</s>' }}{% endif %}{% endfor %}", "leaves out the assistant's message"),
    ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: hello\n' }}{% else %}{{ m['content'] }}"
     "{% endif %}{% endfor %}", "leaves out the user's message"),
])
def test_a_broken_chat_template_is_refused_in_one_line(tokenizers, template, says):
    tok = tokenizers.chat
    before = tok.chat_template
    try:
        tok.chat_template = template
        for fmt in ("auto", "chat"):
            with pytest.raises(FedleakError) as info:
                set_prompt_format(tok, fmt)
            message = str(info.value)
            assert message.startswith(f"model.prompt_format = '{fmt}' (the tokenizer's chat template)")
            assert says in message and "prompt_format = 'alpaca'" in message and "\n" not in message
        assert set_prompt_format(tok, "alpaca") == "alpaca"  # the way out works
    finally:
        tok.chat_template = before
        set_prompt_format(tok, "auto")
