"""Hugging Face format for nl exports (written by `python -m nl.export`; transformers is optional).

Every export directory is also a transformers checkpoint:
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # any arch (nl.hf.modeling)
    PreTrainedTokenizerFast.from_pretrained(DIR)                          # no remote code, no prompt
    AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)            # the same tokenizer
AutoTokenizer needs trust_remote_code=True (or it asks, waiting up to 15 s in a terminal) although
the tokenizer has no code: it loads AutoConfig from config.json first, whose auto_map names our
config class. No file the export could write avoids that while AutoModelForCausalLM loads DIR.
config.json gains `model_type: nl`, `architectures` and `auto_map` beside nl's own keys; the shims
configuration_nl.py / modeling_nl.py import the classes from the installed `nl` package.
The tokenizer is tokenizer.json, the sentencepiece model converted to a `tokenizers` pipeline that
gives the same ids as nl.Tokenizer: no BOS or EOS is added by encode (nl never adds BOS; the data
pipeline appends EOS after each document, so EOS is the document separator and generation stops
there); literal "<s>"/"</s>" in text are plain characters (split_special_tokens), as in nl.
A Transformer++ export also gets DIR/llama/: a plain LlamaForCausalLM checkpoint (no remote code).
Our RoPE pairs dim i with i + head_dim/2, which is HF Llama's rotate_half layout: q/k are copied
unpermuted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from nl.models.layers import resolve_ffn_hidden

_CONFIG_SHIM = "from nl.hf.modeling import NLConfig  # noqa: F401  (the model code is the installed nl package)\n"
_MODELING_SHIM = ("from nl.hf.modeling import HopeState, NLConfig, NLForCausalLM  # noqa: F401  "
                  "(the model code is the installed nl package)\n")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("the Hugging Face format needs transformers: pip install 'transformers==5.23.0' "
                          "(or pip install -e .[hf])") from None
    return transformers


def hf_config_keys(model: dict, bos_id: int | None, eos_id: int) -> dict:
    """Keys added to an export's config.json so transformers can load it (nl's keys stay as they are)."""
    return {
        "model_type": "nl",
        "architectures": ["NLForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_nl.NLConfig",
                     "AutoModelForCausalLM": "modeling_nl.NLForCausalLM"},
        "vocab_size": int(model["vocab_size"]),
        "tie_word_embeddings": bool(model["tie_embeddings"]),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": "float32",
    }


def write_remote_code(output: Path) -> None:
    (output / "configuration_nl.py").write_text(_CONFIG_SHIM)
    (output / "modeling_nl.py").write_text(_MODELING_SHIM)


def write_tokenizer(sp_model: Path, output: Path) -> None:
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) of the sentencepiece model
    `sp_model` in `output`: encode gives nl.Tokenizer's ids (no BOS/EOS added), decode its text."""
    transformers = _transformers()
    from tokenizers import decoders, normalizers

    # transformers converts the sentencepiece BPE (vocab, merges, byte fallback); its Metaspace
    # pre-tokenizer would not prepend the dummy "▁" to a text that starts with a space, which
    # sentencepiece does: replace it by sentencepiece's own normalisation (prepend, then spaces -> ▁).
    tmp = output / "_sp_convert"
    tmp.mkdir(exist_ok=True)
    try:
        (tmp / "tokenizer.model").write_bytes(Path(sp_model).read_bytes())
        (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True}))
        converted = transformers.LlamaTokenizer.from_pretrained(str(tmp))
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    backend = converted.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.post_processor = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = transformers.TokenizersBackend(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>", split_special_tokens=True,
                                         clean_up_tokenization_spaces=False)  # model_max_length: unbounded
    tok.save_pretrained(str(output))


# nl Transformer++ parameter name -> LlamaForCausalLM's (per block: "layers.{i}." prefix on both sides).
_LLAMA_BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def llama_state_dict(state: dict[str, torch.Tensor], tie: bool) -> dict[str, torch.Tensor]:
    """Our Transformer++ state dict -> LlamaForCausalLM's names (q/k unpermuted: same RoPE layout)."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not tie:
        out["lm_head.weight"] = state["output.weight"]
    for name, value in state.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            out[f"model.layers.{i}.{_LLAMA_BLOCK_NAMES[rest]}"] = value
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def write_llama(model: torch.nn.Module, model_cfg: dict, seq_len: int, bos_id: int | None, eos_id: int,
                output: Path) -> None:
    """output/: config.json (model_type llama), model.safetensors and the tokenizer files."""
    output.mkdir(parents=True, exist_ok=True)
    tie = bool(model_cfg["tie_embeddings"])
    dim, heads = int(model_cfg["dim"]), int(model_cfg["n_heads"])
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(model_cfg["vocab_size"]),
        "hidden_size": dim,
        "intermediate_size": resolve_ffn_hidden(dim, int(model_cfg["ffn_hidden"]), int(model_cfg["ffn_multiple_of"])),
        "num_hidden_layers": int(model_cfg["n_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": dim // heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(seq_len),  # the training context; RoPE itself has no hard limit
        "rms_norm_eps": float(model_cfg["norm_eps"]),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model_cfg["rope_theta"])},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": "float32",
    }
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(llama_state_dict(model.state_dict(), tie), str(output / "model.safetensors"),
              metadata={"format": "pt"})
