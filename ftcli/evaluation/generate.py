"""Greedy, length-bounded answers for causal-LM test prompts, batched with left padding."""

from __future__ import annotations


def generate_answers(model, tokenizer, prompts: list[str], add_special_tokens: bool, max_new_tokens: int,
                     batch_size: int, device, max_prompt_tokens: int) -> list[dict]:
    """One answer per prompt: {"answer", "stopped" (ended with EOS), "tokens" (answer length)}.

    Prompts longer than ``max_prompt_tokens`` keep their end (where the answer starts); an empty
    prompt starts from the BOS (or EOS) token, so the model always has something to continue.
    """
    import torch

    eos = tokenizer.eos_token_id
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    encoded = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] if p else []
        ids = ids[-max_prompt_tokens:] if len(ids) > max_prompt_tokens else ids
        encoded.append(ids or [start])
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list = [None] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every prompt ends where generation begins
                k = len(encoded[i])
                ids[r, width - k :] = torch.tensor(encoded[i])
                mask[r, width - k :] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
            for r, i in enumerate(idx):
                new = gen[r, width:].tolist()
                stopped = eos in new
                answer = new[: new.index(eos)] if stopped else new
                out[i] = {"answer": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                          "stopped": stopped, "tokens": len(answer)}
    return out
