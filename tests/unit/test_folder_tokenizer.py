"""The llama.cpp runtime's torch-free tokenizer gives transformers' prompts and ids, token for token."""

from __future__ import annotations

import pytest

from langchain_adaptquant import pretrained
from langchain_adaptquant.assets import reference_model_path
from langchain_adaptquant.runtime.llamacpp.tokenizer import FolderTokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße aus Köln — 東京?"},
     {"role": "assistant", "content": "Hallo!"}, {"role": "user", "content": "And again."}],
]


def _folders() -> list:
    folders = [reference_model_path()]
    if pretrained.is_pulled("smollm2-135m"):
        folders.append(pretrained.model_path("smollm2-135m"))
    return folders


@pytest.mark.parametrize("folder", _folders(), ids=lambda f: f.name)
def test_prompts_ids_and_text_match_transformers(folder):
    from transformers import AutoTokenizer

    ours, theirs = FolderTokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.eos_token_id == theirs.eos_token_id and ours.chat_template == theirs.chat_template
    for chat in CONVERSATIONS:
        for tools in (None, TOOLS):
            for prompt in (True, False):
                mine = ours.apply_chat_template(chat, tools=tools, add_generation_prompt=prompt, tokenize=False)
                assert mine == theirs.apply_chat_template(chat, tools=tools, add_generation_prompt=prompt,
                                                          tokenize=False)
                assert ours(mine).input_ids == theirs(mine, add_special_tokens=False).input_ids
    ids = ours("Grüße — 東京 <|im_end|> done").input_ids
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.get_added_vocab() == theirs.get_added_vocab()


def test_a_folder_without_tokenizer_json_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        FolderTokenizer(tmp_path)
