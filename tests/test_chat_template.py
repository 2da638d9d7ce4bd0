"""Chat templates from GGUF metadata, rendered in jinja2's sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ggtriton.gguf.bundled import gemma3_path, smollm2_path
from ggtriton.gguf.tokenizer import ChatTemplateError, Tokenizer, render_chat_template

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_llamacpp.json"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]
SMOLLM_DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path())


def test_smollm2_renders_chatml(smollm2):
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smollm2.apply_chat_template(MESSAGES) == expected
    assert smollm2.apply_chat_template(MESSAGES, add_generation_prompt=False) == expected.removesuffix("<|im_start|>assistant\n")
    assert smollm2.apply_chat_template(MESSAGES[1:]) == SMOLLM_DEFAULT_SYSTEM + expected.split("<|im_end|>\n", 1)[1]


def test_smollm2_matches_llamacpp_python_formatter(smollm2):
    chat = json.loads(FIXTURE.read_text(encoding="utf-8"))["chat"]
    assert smollm2.apply_chat_template(chat["messages"]) == chat["rendered"]
    assert smollm2.apply_chat_template(chat["messages"][1:]) == chat["rendered_no_system"]


def test_rendered_prompt_tokenizes_with_special_tokens(smollm2):
    ids = smollm2.encode(smollm2.apply_chat_template(MESSAGES), parse_special=True)
    im_start, im_end = 1, 2
    assert ids.count(im_start) == 5 and ids.count(im_end) == 4 and im_end in smollm2.eos_token_ids


def test_gemma3_without_template_is_a_clear_error():
    tok = Tokenizer.from_gguf(gemma3_path())
    with pytest.raises(ChatTemplateError, match=r"gemma-3-270m.*\.gguf: the GGUF file has no tokenizer.chat_template"):
        tok.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages.__class__.__base__ }}",
    "{{ raise_exception.__globals__ }}",
    "{% set x = messages.append({'role': 'x'}) %}",
    "{{ messages[0].update({'content': 'x'}) }}",
])
def test_sandbox_escapes_raise_a_clear_error(template):
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_template_globals_and_filters():
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}={{ m['content'] | tojson }};{% endfor %}"
        "{% if tools %}{{ tools | tojson }}{% endif %}{{ strftime_now('%Y') | length }}"
        "{% if add_generation_prompt %}>{% endif %}{{ eos_token }}"
    )
    out = render_chat_template(template, [{"role": "user", "content": "é\"x"}], True,
                               bos_token="<s>", eos_token="</s>", tools=[{"name": "f"}])
    assert out == '<s>user="é\\"x";[{"name": "f"}]4></s>'


def test_raise_exception_and_syntax_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(ChatTemplateError, match="chat template error"):
        render_chat_template("{% for %}", [])
