"""Tiny Hugging Face models and PEFT adapters generated in-process (nothing from a hub)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel, GPT2Config, GPT2Model
from transformers.utils import logging

logging.set_verbosity_error()
logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def bert_config(**overrides) -> BertConfig:
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def bert(seed: int = 0, **overrides) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(bert_config(**overrides)).eval()


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A 'fine-tuned' copy: every parameter moved by seeded noise."""
    import copy

    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in out.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return out


def gpt2(seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Model(config).eval()


def clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=99, max_position_embeddings=32),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=16, patch_size=8),
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    return model


def save(model: torch.nn.Module, path: Path, shard: str | None = None) -> Path:
    if shard:
        model.save_pretrained(path, max_shard_size=shard)
    else:
        model.save_pretrained(path)
    return path


def lora_adapter(model: torch.nn.Module, path: Path, seed: int = 1, **config) -> torch.nn.Module:
    """Save a PEFT LoRA adapter with random (non-zero) factors; return peft's merged model (the oracle)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**config))
    peft_model.save_pretrained(path)
    return peft_model.merge_and_unload().eval()


class WordTokenizer:
    """A stand-in tokenizer: words -> ids by a fixed hash, right padding, an attention mask."""

    def __init__(self, vocab: int = 99) -> None:
        self.vocab = vocab

    def ids(self, text: str) -> list[int]:
        return [1] + [3 + sum(map(ord, word)) % (self.vocab - 3) for word in text.split()]

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors="pt"):
        rows = [self.ids(t)[: max_length or None] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}
