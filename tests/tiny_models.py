"""Tiny random-weight Hugging Face models built from transformers config classes (no download)."""

from __future__ import annotations

from pathlib import Path

VOCAB = 96


def _tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def save_tiny(model_type: str, path: Path, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if model_type == "llama":
        config = transformers.LlamaConfig(**{**common, "tie_word_embeddings": False, **overrides})
        model = transformers.LlamaForCausalLM(config)
    elif model_type == "gemma3":
        cfg = {**common, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 24,
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], **overrides}
        config = transformers.Gemma3TextConfig(**cfg)
        model = transformers.Gemma3ForCausalLM(config)
        with torch.no_grad():  # norms default to zero offsets; give them some spread
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    else:
        raise ValueError(model_type)
    model = model.float().eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer_json(path)
    return path


def round_embeddings_to_bf16(model) -> None:
    """What edgellm does to the embedding table and LM head of a build whose layers are not all
    FP32 (quant/plan.py): store them as bfloat16. References round them the same way."""
    import numpy as np
    import torch

    from edgellm.quant.precision import to_bfloat16_bits

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                bits = to_bfloat16_bits(p.numpy()).astype(np.uint32) << 16
                p.copy_(torch.from_numpy(bits.view(np.float32).copy()))
