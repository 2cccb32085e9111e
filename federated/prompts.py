"""The one prompt template every model and every attack uses (a short Alpaca format)."""

from __future__ import annotations

PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n### Response:\n"


def format_prompt(instruction: str, input: str = "") -> str:
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)
