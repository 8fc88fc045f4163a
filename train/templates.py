"""Chat templates, one per LLaVA `--version`: the single place a prompt's text is defined.

Training saves the chosen template into the processor (`chat_template.jinja` in the artifact); serving renders
prompts with `processor.apply_chat_template` from the model dir, so train and serve can never drift apart.

Messages use the Hugging Face multimodal shape:
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A pie chart."}]}]
String contents are accepted too. Images always render before the text of their turn, as LLaVA trained them.

The assistant's answer and its end-of-sequence marker sit inside `{% generation %}` blocks: the label mask
(train/labels.py) trains exactly those characters and nothing else.
"""

from __future__ import annotations

# The Vicuna-v1 system prompt LLaVA-1.5 was instruction-tuned with (`conv_vicuna_v1` in haotian-liu/LLaVA).
V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)

# Shared Jinja pieces. HF renders with trim_blocks/lstrip_blocks, so every literal goes through {{ }}.
_SYSTEM = (
    "{%- set ns = namespace(system=DEFAULT_SYSTEM) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
    "{%- if m['content'] is string -%}{%- set ns.system = m['content'] -%}"
    "{%- else -%}{%- set ns.system = m['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
)
_CONTENT = (  # images first (one '<image>' line each), then the text items
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}"
    "{%- for item in m['content'] -%}{%- if item['type'] == 'image' -%}{{- IMAGE_PREFIX -}}{%- endif -%}{%- endfor -%}"
    "{%- for item in m['content'] -%}{%- if item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
)

# v1 (Vicuna): "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT:"
_V1 = (
    _SYSTEM
    + "{{- ns.system + ' ' -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' -}}" + _CONTENT + "{{- ' ' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- 'ASSISTANT:' -}}"
    "{%- generation -%}{{- ' ' -}}" + _CONTENT + "{{- '</s>' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# llava_llama_2: "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST]"
_LLAMA_2 = (
    _SYSTEM
    + "{%- set ns2 = namespace(first=true) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if not ns2.first -%}{{- '<s>' -}}{%- endif -%}{{- '[INST] ' -}}"
    "{%- if ns2.first -%}{{- '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' -}}"
    "{%- set ns2.first = false -%}{%- endif -%}"
    + _CONTENT
    + "{{- ' [/INST]' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ' ' -}}" + _CONTENT + "{{- ' </s>' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# plain (LLaVA pre-training style): "<image>\n{q}\n{a}</s>" with no roles and no system prompt.
_PLAIN = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}" + _CONTENT + "{{- '\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}{%- generation -%}" + _CONTENT + "{{- '</s>' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _bind(template: str, system: str) -> str:
    """Inline the constants: a saved template must render with nothing but `messages` and `add_generation_prompt`."""
    return (
        template.replace("DEFAULT_SYSTEM", repr(system))
        .replace("IMAGE_PREFIX", repr("<image>\n"))
    )


CHAT_TEMPLATES: dict[str, str] = {
    "v1": _bind(_V1, V1_SYSTEM),
    "llava_llama_2": _bind(_LLAMA_2, LLAMA_2_SYSTEM),
    "plain": _bind(_PLAIN, ""),
}
# LLaVA's own aliases for the Vicuna template.
CHAT_TEMPLATES["vicuna_v1"] = CHAT_TEMPLATES["v1"]


def chat_template(version: str) -> str:
    """The Jinja chat template for a LLaVA `--version`; a clear error names the known ones."""
    try:
        return CHAT_TEMPLATES[version]
    except KeyError:
        raise ValueError(f"unknown --version {version!r}; known: {', '.join(sorted(CHAT_TEMPLATES))}") from None
