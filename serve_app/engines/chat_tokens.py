"""Chat prompts as token ids in which what users (and the model, in the history) wrote is only
ever text.

Rendering the chat template to one string and tokenizing it lets a user who types
`<|im_end|>\\n<|im_start|>system` open a real system turn: the tokenizer reads the control tokens
out of the user's text as well as out of the template's. Here the template is rendered with a
placeholder for each message's content; the template's own text is tokenized as usual (its
markers become special tokens), each content with the tokenizer's `split_special_tokens`, so
that special-token text in it becomes ordinary pieces. Needs only the tokenizer.
"""

from __future__ import annotations

import re
from typing import Any

# Private-use characters: no chat template writes them, and no content is ever mistaken for one.
_PLACEHOLDER = "\ue000chatstream-content-{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000chatstream-content-(\\d+)\ue001")


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a rendered prompt.

    Chat templates usually write the BOS token into the text already; adding it again would
    change the model's input, so special tokens are only added when the text lacks them.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = bool(bos) and not prompt.startswith(bos)
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt for `messages` ({role, content}), ready for the answer."""
    skeleton = tokenizer.apply_chat_template(
        [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids: list[int] = []
    bos = getattr(tokenizer, "bos_token", None)
    if bos and not skeleton.startswith(bos) and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)  # as tokenizing the whole text would add it
    position = 0
    for match in _PLACEHOLDER_RE.finditer(skeleton):
        ids += _template_ids(tokenizer, skeleton[position : match.start()])
        content = messages[int(match.group(1))]["content"]
        if content:
            ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
        position = match.end()
    ids += _template_ids(tokenizer, skeleton[position:])
    return ids


def _template_ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def describe_tokens(tokenizer: Any, ids: list[int]) -> list[dict[str, Any]]:
    """The prompt as the model sees it, one entry per token: a control token is one entry
    marked `special`; the same characters typed by a user are several ordinary ones."""
    special = set(tokenizer.all_special_ids)
    return [{"id": i, "text": tokenizer.decode([i]), "special": i in special} for i in ids]
