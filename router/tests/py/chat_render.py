"""Renders chat cases with transformers' own apply_chat_template, the way
vLLM renders a chat request: reads a JSON list of cases on stdin, writes a
JSON list of {"text", "ids"} or {"error"} on stdout.

A case: {"tokenizer": path to tokenizer.json, "config": tokenizer_config.json
path, "messages", "tools", "add_generation_prompt", "kwargs"}.
"""

import json
import sys

from transformers import PreTrainedTokenizerFast


def render(case):
    cfg = json.load(open(case["config"]))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=case["tokenizer"],
        bos_token=cfg.get("bos_token") or None,
        eos_token=cfg.get("eos_token") or None,
    )
    tok.chat_template = cfg["chat_template"]
    args = dict(
        tools=case.get("tools"),
        add_generation_prompt=case.get("add_generation_prompt", True),
        **case.get("kwargs", {}),
    )
    text = tok.apply_chat_template(case["messages"], tokenize=False, **args)
    ids = tok.encode(text, add_special_tokens=False)
    return {"text": text, "ids": ids}


def main():
    out = []
    for case in json.load(sys.stdin):
        try:
            out.append(render(case))
        except Exception as e:  # noqa: BLE001 - the error is the answer
            out.append({"error": f"{type(e).__name__}: {e}"})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
