"""Short greedy generations, used to show what a teacher and its converted student answer."""

from __future__ import annotations

import torch


def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to ``prompt``, through the chat template when the tokenizer has one."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
