"""The chat templates render LLaVA's exact prompt strings, and the tiny artifact carries its template."""

import json
from pathlib import Path

import pytest

from train.templates import CHAT_TEMPLATES, V1_SYSTEM, chat_template

TWO_TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A pie."}]},
    {"role": "user", "content": [{"type": "text", "text": "Title?"}]},
]


def render(template: str, messages, add_generation_prompt=True) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


def test_v1_is_the_vicuna_prompt_llava_1_5_was_tuned_with():
    assert render(CHAT_TEMPLATES["v1"], TWO_TURNS) == (
        V1_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: A pie.</s>USER: Title? ASSISTANT:")


def test_llama_2_and_plain_templates():
    assert render(CHAT_TEMPLATES["llava_llama_2"], TWO_TURNS).endswith(
        "<</SYS>>\n\n<image>\nWhat is shown? [/INST] A pie. </s><s>[INST] Title? [/INST]")
    assert render(CHAT_TEMPLATES["plain"], TWO_TURNS) == "<image>\nWhat is shown?\nA pie.</s>Title?\n"


def test_system_message_overrides_default_and_string_content_works():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render(CHAT_TEMPLATES["v1"], msgs) == "Be brief. USER: Hi ASSISTANT:"


def test_unknown_version_names_the_known_ones():
    with pytest.raises(ValueError, match="known: llava_llama_2, plain, v1"):
        chat_template("mistral")


def test_tiny_artifact_has_the_full_layout(tiny_artifact):
    files = {p.name for p in Path(tiny_artifact).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja",
            "generation_config.json", "training_config.json"} <= files
    assert (Path(tiny_artifact) / "chat_template.jinja").read_text() == CHAT_TEMPLATES["v1"]
    image_processor = json.loads((Path(tiny_artifact) / "processor_config.json").read_text())["image_processor"]
    assert image_processor["do_pad"] is True
