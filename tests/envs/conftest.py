"""Fixtures of the multi-turn tests: the tiny byte tokenizer with a tool-aware ChatML template (the Qwen2.5 / Hermes
layout: tool schemas in the system turn, tool results as <tool_response> user turns) and a tiny model."""

from __future__ import annotations

import pytest

from nova_rt.models.tiny import build_tiny_model, byte_tokenizer

TOOL_CHATML = (
    "{%- if tools %}{{ '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}{%- endif %}"
    "{{ '# Tools\n<tools>' }}{%- for tool in tools %}{{ '\n' }}{{ tool | tojson }}{%- endfor %}"
    "{{ '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{ '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


@pytest.fixture
def tool_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = TOOL_CHATML
    return tok


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model("llama", seed=3, vocab_size=259)
