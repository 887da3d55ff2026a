"""Hugging Face `transformers` classes for nl exports (loaded through `trust_remote_code=True`).

An export directory carries two one-line shims, configuration_nl.py and modeling_nl.py, that
import `NLConfig` and `NLForCausalLM` from here: the modelling code is the installed `nl` package,
so an export never holds a second copy of the model that could drift from the trained one.

`NLForCausalLM` owns the very modules `nl.models.build_model` builds (registered under their own
names, so the state-dict keys are those of model.safetensors) and runs their forward:
    input_ids LongTensor[B, T] -> CausalLMOutputWithPast(logits FloatTensor[B, T, V], loss, past_key_values)
HOPE with a recurrent mixer carries its decoding state in `HopeState` (past_key_values): `generate()`
prefills the prompt once, then feeds one token per step (`Hope.prefill` / `Hope.step`), constant
memory per token. Transformer++ and Hope-Attention keep no cache: each step re-runs the sequence.
"""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from nl.config import ModelConfig

MODEL_TYPE = "nl"


class NLConfig(PreTrainedConfig):
    """config.json of an nl export: `model` is nl's ModelConfig as a dict; the export's provenance
    keys (step, seq_len, tokenizer_fingerprint, ...) are kept as plain attributes."""

    model_type = MODEL_TYPE
    model: dict | None = None
    seq_len: int = 0
    vocab_size: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def model_config(self) -> ModelConfig:
        if not self.model:
            raise ValueError("this config.json has no 'model' section: it was not written by python -m nl.export")
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), self.model)


def _map_tensors(obj, fn):
    """Apply fn to every tensor inside nested dicts / lists / tuples (None stays None)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class HopeState:
    """HOPE's decoding state as `past_key_values`: the per-block MixerStates of `Hope.prefill`/`step`
    (inner memories, momenta, conv tails; constant size in the context length) and the number of
    tokens consumed. `reorder_cache(beam_idx)` selects batch rows (beam search)."""

    def __init__(self, states: list, seen_tokens: int) -> None:
        self.states = states
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, beam_idx.to(device=t.device, dtype=torch.long))

        def pick_memory(t: torch.Tensor) -> torch.Tensor:
            # memory layers are [B, H, O, I]; an anchor still at M_0 is shared ([H, O, I] or [1, H, O, I])
            return pick(t) if t.dim() == 4 and t.shape[0] == beam_idx.numel() else t

        def pick_level(c):  # an in-context CMS level: fast weights [B, d, hidden] (or still the shared outer
            # [d, hidden]) and partial sums [B, ...]; init is the outer weight, shared
            if c is None:
                return None
            cur = pick(c.cur) if c.cur.dim() == 3 else c.cur
            return dataclasses.replace(c, cur=cur, acc=_map_tensors(c.acc, pick))

        # rec.init (the outer M_0) and rec.stats are shared by all rows: not reordered.
        self.states = [dataclasses.replace(s, conv=_map_tensors(s.conv, pick), rec=dataclasses.replace(
            s.rec, **{f: _map_tensors(getattr(s.rec, f), pick_memory) for f in ("cur", "anchor", "mom")}),
            cms=None if s.cms is None else [pick_level(c) for c in s.cms])
            for s in self.states]


class NLForCausalLM(PreTrainedModel, GenerationMixin):
    """Any nl architecture (model.arch transformer | hope, every HOPE mixer) as a transformers causal LM."""

    config_class = NLConfig
    base_model_prefix = ""
    main_input_name = "input_ids"

    def __init__(self, config: NLConfig) -> None:
        super().__init__(config)
        from nl.models import build_model

        # transformers builds the model under a meta device context, then loads the weights; a plain
        # NLForCausalLM(config) gets nl's own initialisation (build_model's init_weights).
        ambient = torch.empty(0).device
        net = build_model(config.model_config(), device=ambient)
        for name, child in net.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "net", net)  # shares the children above; not registered twice
        if net.tie_embeddings:
            self._tied_weights_keys = {"output.weight": "tok_embeddings.weight"}
        self.recurrent = getattr(net, "mixer", "attention") != "attention" and hasattr(net, "step")
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # HOPE brings its own state (HopeState); attention models re-run, no KV cache

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: build_model initialised a fresh model in __init__ and an export carries every weight."""

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.output

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                past_key_values: HopeState | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T, V] fp32 (+ mean next-token cross-entropy when labels [B, T]
        are given, shifted inside, -100 ignored). attention_mask must be all ones: nl models take no
        padding. past_key_values: a HopeState from the previous call (HOPE recurrent mixers only)."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported by nl models: pass input_ids")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("nl models take no padding (attention_mask has zeros): pass unpadded sequences "
                             "(batch size 1, or prompts of equal length)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        state = None
        if past_key_values is not None:
            if not isinstance(past_key_values, HopeState):
                raise ValueError(f"past_key_values must be the HopeState an earlier call returned, got "
                                 f"{type(past_key_values).__name__}")
            logits, states = [], past_key_values.states
            for t in range(input_ids.shape[1]):  # step: one token per sequence, no re-run of the prefix
                step_logits, states = self.net.step(input_ids[:, t], states)
                logits.append(step_logits)
            logits = torch.stack(logits, dim=1)
            state = HopeState(states, past_key_values.seen_tokens + input_ids.shape[1])
        elif use_cache and self.recurrent and labels is None and not torch.is_grad_enabled():
            logits, states = self.net.prefill(input_ids)
            state = HopeState(states, input_ids.shape[1])
        else:
            logits = self.net(input_ids)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=state)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: HopeState | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                                      **kwargs) -> dict:
        """With a HopeState only the tokens it has not consumed go in (one per step); otherwise all."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.seen_tokens:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}
