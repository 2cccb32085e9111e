"""The one prompt formatter every model and every attack uses: Alpaca text or the tokenizer's chat template.

`model.prompt_format` picks it: "chat" (the tokenizer's own chat template: what an instruct model was
tuned on), "alpaca" (the short Alpaca template below, what the embedded model is pretrained on) or "auto"
(chat when the tokenizer has a template, else alpaca). The loader calls `set_prompt_format`, which stores
the resolved format on the tokenizer (`fedleak_prompt_format`); a tokenizer without it is "auto".

Token ids, in both formats (everything that tokenises a prompt or a training sequence comes here):
- alpaca: [BOS if the tokenizer adds one by default] + prompt + response + EOS, prompt and response
  tokenised apart without special tokens (for the embedded model, whose tokenizer adds no BOS, exactly
  the ids of every earlier fedleak version);
- chat: the template rendered as text (user turn = instruction, then "\\n\\n" + input if any; assistant
  turn = output) and tokenised without special tokens (the template writes BOS itself, as HF's
  `apply_chat_template` does); the sequence ends with the assistant's end-of-turn token (the first
  special token the template writes after the answer, e.g. `<|im_end|>`), EOS appended only when the
  template ends the turn with no special token. Training labels cover the answer and that end-of-turn.
"""

from __future__ import annotations

from fedleak.common.errors import FedleakError

PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n### Response:\n"

FORMATS = ("auto", "chat", "alpaca")
ATTRIBUTE = "fedleak_prompt_format"  # the resolved format, set on the tokenizer by `set_prompt_format`
_MARKER = "\x00fedleak\x00"  # stands for a message's content when a template's surroundings are wanted


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt text (what precedes the response)."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def set_prompt_format(tokenizer, fmt: str = "auto") -> str:
    """Validate `fmt`, resolve "auto" and store the resolved format on `tokenizer`; returns it.

    Raises:
        FedleakError: one line naming model.prompt_format: an unknown format, or "chat" for a tokenizer
            that has no chat template.
    """
    if fmt not in FORMATS:
        raise FedleakError(f"model.prompt_format = {fmt!r}: unknown: use one of {', '.join(FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "chat" and not has_template:
        raise FedleakError("model.prompt_format = 'chat': the tokenizer of this model has no chat template: "
                           "set model.prompt_format = 'alpaca' (or 'auto') or use an instruct model")
    resolved = fmt if fmt != "auto" else ("chat" if has_template else "alpaca")
    if resolved == "chat":
        _check_template(tokenizer, fmt)
    setattr(tokenizer, ATTRIBUTE, resolved)
    return resolved


def _check_template(tokenizer, fmt: str) -> None:
    """Refuse a chat template that cannot render a user turn and an answer, or leaves either out (the
    model would never see the instruction, or train on nothing but an end token)."""
    user, answer = "\x00fedleak-user\x00", "\x00fedleak-answer\x00"
    where = f"model.prompt_format = {fmt!r} (the tokenizer's chat template)"
    fix = "fix chat_template in the model folder's tokenizer_config.json or set model.prompt_format = 'alpaca'"
    try:
        prompt = _render(tokenizer, [{"role": "user", "content": user}], generation_prompt=True)
        full = _render(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                       generation_prompt=False)
    except Exception as exc:  # noqa: BLE001 - jinja's and the template's own errors (raise_exception)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FedleakError(f"{where} fails to render a conversation ({type(exc).__name__}: {first}): {fix}") from None
    if user not in prompt or user not in full:
        raise FedleakError(f"{where} leaves out the user's message: the model would never see the instruction: {fix}")
    if answer not in full or full.index(answer) < full.index(user):
        raise FedleakError(f"{where} leaves out the assistant's message: training would learn no answer: {fix}")


def prompt_format(tokenizer) -> str:
    """The resolved format of `tokenizer`: "chat" or "alpaca" ("auto" when never set)."""
    fmt = getattr(tokenizer, ATTRIBUTE, None)
    if fmt in ("chat", "alpaca"):
        return fmt
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def is_chat(tokenizer) -> bool:
    return prompt_format(tokenizer) == "chat"


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when the tokenizer prepends one by default (Llama, Mistral), else [] (GPT-2, the embedded model)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a")["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def _special_ids(tokenizer) -> set[int]:
    """Special tokens: the named ones and every added token flagged special (chat markers)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
               if getattr(token, "special", False))
    return ids


def user_message(instruction: str, input: str = "") -> str:
    """The chat user turn: the instruction, then the input after a blank line."""
    return f"{instruction}\n\n{input}" if input else instruction


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_prompt_text(tokenizer, content: str) -> str:
    """The chat template's text of one user turn holding `content`, with the assistant header after it.

    A template may open a written assistant turn with more than its generation prompt (Qwen3's empty
    `<think></think>` block): that opening is part of the prompt, or training would label it as answer
    and generation would not see it."""
    user = {"role": "user", "content": content}
    prompt = _render(tokenizer, [user], generation_prompt=True)
    marked = _render(tokenizer, [user, {"role": "assistant", "content": _MARKER}], generation_prompt=False)
    opening = marked.split(_MARKER)[0] if _MARKER in marked else prompt
    return opening if opening.startswith(prompt) and opening[len(prompt):].strip() else prompt


def prompt_text(tokenizer, instruction: str, input: str = "") -> str:
    """The prompt as text (the model answers after it), in the tokenizer's format (for display)."""
    if is_chat(tokenizer):
        return chat_prompt_text(tokenizer, user_message(instruction, input))
    return format_prompt(instruction, input)


def prompt_ids(tokenizer, instruction: str, input: str = "") -> list[int]:
    """Token ids of the generation prompt of a record, as training tokenised the prompt part."""
    if is_chat(tokenizer):
        return _text_ids(tokenizer, prompt_text(tokenizer, instruction, input))
    return bos_prefix(tokenizer) + _text_ids(tokenizer, format_prompt(instruction, input))


def user_turn_ids(tokenizer, content: str) -> list[int]:
    """Chat: ids of a user turn holding `content` and the assistant header (a prompt of one's own wording)."""
    return _text_ids(tokenizer, chat_prompt_text(tokenizer, content))


def instruction_header(tokenizer) -> str:
    """The text before an instruction: "### Instruction:\\n", or the chat template's user-turn opening."""
    if is_chat(tokenizer):
        text = _render(tokenizer, [{"role": "user", "content": _MARKER}], generation_prompt=False)
        return text.split(_MARKER)[0]
    return PROMPT_NO_INPUT.split("{instruction}")[0]


def instruction_header_ids(tokenizer) -> list[int]:
    """Ids of `instruction_header`, BOS first in alpaca format when the tokenizer adds one."""
    if is_chat(tokenizer):
        return _text_ids(tokenizer, instruction_header(tokenizer))
    return bos_prefix(tokenizer) + _text_ids(tokenizer, instruction_header(tokenizer))


def _chat_sequence(tokenizer, instruction: str, input: str, output: str) -> tuple[list[int], int]:
    """(ids of the conversation up to and including the assistant's end-of-turn, prompt token count)."""
    user = {"role": "user", "content": user_message(instruction, input)}
    prompt = chat_prompt_text(tokenizer, user["content"])
    full = _render(tokenizer, [user, {"role": "assistant", "content": output}], generation_prompt=False)
    if not full.startswith(prompt):
        raise FedleakError("model.prompt_format = 'chat': this chat template writes an assistant turn that does not "
                           "continue its own generation prompt, so the answer cannot be masked: set "
                           "model.prompt_format = 'alpaca'")
    head = _text_ids(tokenizer, prompt)
    ids = _text_ids(tokenizer, full)
    if ids[:len(head)] != head:
        # A token merged across the prompt/answer boundary: tokenise the answer part apart, as generation
        # (which continues the prompt's ids) meets it.
        ids = head + _text_ids(tokenizer, full[len(prompt):])
    special = _special_ids(tokenizer)
    end = next((i for i in range(len(head), len(ids)) if ids[i] in special), None)
    if end is None:  # the template closes the turn with no special token: EOS ends the answer
        return ids + [tokenizer.eos_token_id], len(head)
    return ids[:end + 1], len(head)  # whatever follows the end-of-turn (a newline) trains nothing


def example_ids(tokenizer, instruction: str, input: str, output: str) -> tuple[list[int], int]:
    """(untruncated ids of prompt + answer + end of answer, number of prompt tokens to mask)."""
    if is_chat(tokenizer):
        return _chat_sequence(tokenizer, instruction, input, output)
    head = prompt_ids(tokenizer, instruction, input)
    return head + _text_ids(tokenizer, output) + [tokenizer.eos_token_id], len(head)


def alpaca_batch(tokenizer, records) -> list[tuple[list[int], int]]:
    """`example_ids` of many alpaca records, tokenised in two batched calls (what `encode` did before)."""
    bos = bos_prefix(tokenizer)
    heads = tokenizer([format_prompt(r.instruction, r.input) for r in records], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]
    return [(bos + list(p) + list(a) + [tokenizer.eos_token_id], len(bos) + len(p)) for p, a in zip(heads, answers)]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Chat: the special token the template writes after an assistant answer ([] in alpaca format)."""
    if not is_chat(tokenizer):
        return []
    ids, n = _chat_sequence(tokenizer, "a", "", "b")
    return [ids[-1]] if ids[-1] in _special_ids(tokenizer) and len(ids) > n else []


def stop_ids(model, tokenizer) -> list[int]:
    """Tokens that end a generation: the model's generation-config EOS (an int or a list), the tokenizer's
    EOS and, in chat format, the template's end-of-turn token; deduplicated, in that order."""
    out: list[int] = []
    config = getattr(model, "generation_config", None) if model is not None else None
    configured = getattr(config, "eos_token_id", None)
    for token in ([configured] if isinstance(configured, int) else list(configured or [])):
        out.append(int(token))
    if tokenizer.eos_token_id is not None:
        out.append(int(tokenizer.eos_token_id))
    out += end_of_turn_ids(tokenizer)
    return list(dict.fromkeys(out))


def pad_id(tokenizer) -> int:
    """The id fedleak pads with (always under a zero attention mask): the pad token, else EOS, else 0."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    return 0
