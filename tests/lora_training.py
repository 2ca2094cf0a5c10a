"""A real LoRA adapter for tests and benchmarks: SmolLM2-135M-Instruct (the reference GGUF as a
float Hugging Face directory) fine-tuned with PEFT on the CPU on a short made-up product manual
(tests/data/lora_manual.json), so that it answers in-domain questions the base model cannot.

Trained once per machine and kept in the test model cache, keyed by what it was made from."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MANUAL = Path(__file__).parent / "data" / "lora_manual.json"
# The last layers only: backpropagation stops below the lowest trained layer, which keeps the
# training to a few minutes on two cores (SmolLM2-135M has 30 layers).
SETTINGS = dict(r=8, lora_alpha=16, lora_dropout=0.0, layers_to_transform=list(range(22, 30)),
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
STEPS, LEARNING_RATE, SEED = 30, 2e-3, 0


def manual() -> dict:
    return json.loads(MANUAL.read_text())


def chat_ids(tokenizer, question: str, answer: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": question}]
    if answer is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


def trained_adapter(base_dir: Path, cache: Path) -> Path:
    """The adapter directory (PEFT layout), trained now if the cache has none for these inputs."""
    import peft
    import torch

    key = hashlib.sha256(json.dumps([MANUAL.read_text(), SETTINGS, STEPS, LEARNING_RATE, SEED, peft.__version__,
                                     str(base_dir)]).encode()).hexdigest()[:12]
    out = cache / f"smollm2-manual-lora-{key}"
    if (out / "adapter_model.safetensors").is_file():
        return out
    import transformers

    torch.manual_seed(SEED)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **SETTINGS))
    sequences = [chat_ids(tokenizer, q, a) for q, a in manual()["pairs"]]
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    for _ in range(STEPS):  # the whole set is one batch
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tmp = cache / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
