"""Short chat templates written here in the styles of three reasoning models' own, for tests.

What matters to a server is where the thinking opens and how it is switched off:

- ``qwen3``: the model writes ``<think>…</think>`` itself; ``enable_thinking=false`` (a
  template variable) puts an empty ``<think>\\n\\n</think>\\n\\n`` in the prompt instead.
- ``deepseek_r1``: the generation prompt ends with an open ``<think>\\n``: the output starts
  inside the thinking and only its ``</think>`` is written by the model.
- ``smollm3``: a ``/think`` or ``/no_think`` flag in the system prompt, and, without thinking,
  an empty think block in the prompt as Qwen3 does.

They use SmolLM2's ``<|im_start|>``/``<|im_end|>`` tokens, which the test models' tokenizer has.
"""

from __future__ import annotations

import json
from pathlib import Path

REASONING_TEMPLATES = {
    "qwen3": (
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
        "{%- endif %}{%- endif %}"
    ),
    "deepseek_r1": (
        "{%- for m in messages %}{%- if m.role == 'user' %}{{ 'User: ' + m.content + '\\n' }}"
        "{%- elif m.role == 'assistant' %}{{ 'Assistant: ' + m.content + '\\n' }}"
        "{%- else %}{{ m.content + '\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ 'Assistant: <think>\\n' }}{%- endif %}"
    ),
    "smollm3": (
        "{%- set thinking = enable_thinking is not defined or enable_thinking %}"
        "{{ '<|im_start|>system\\n' + ('/think' if thinking else '/no_think') + '<|im_end|>\\n' }}"
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{%- if not thinking %}{{ '<think>\\n\\n</think>\\n' }}{%- endif %}{%- endif %}"
    ),
}


def with_chat_template(model_dir: Path, template: str, into: Path) -> Path:
    """A copy of ``model_dir`` (links to its weights) whose tokenizer has ``template``."""
    into.mkdir(parents=True, exist_ok=True)
    for entry in model_dir.iterdir():
        target = into / entry.name
        if not target.exists():
            target.symlink_to(entry.resolve())
    config_path = into / "tokenizer_config.json"
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config_path.unlink()
    config_path.write_text(json.dumps(config))
    (into / "chat_template.jinja").unlink(missing_ok=True)
    (into / "chat_template.jinja").write_text(template)  # where transformers reads a template from
    return into
