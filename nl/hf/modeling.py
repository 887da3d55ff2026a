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
Every forward call without past_key_values starts from fresh memories (nothing is carried between
calls). A padded batch (attention_mask with zeros) runs each row's real span on its own: see forward.
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

    def __init__(self, config: NLConfig, net: nn.Module | None = None) -> None:
        """net: an nl model already in memory (e.g. the one being trained) to wrap as it is, sharing its
        parameters; None builds one from config.model."""
        super().__init__(config)
        from nl.models import build_model

        # transformers builds the model under a meta device context, then loads the weights; a plain
        # NLForCausalLM(config) gets nl's own initialisation (build_model's init_weights).
        if net is None:
            net = build_model(config.model_config(), device=torch.empty(0).device)
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
        are given, shifted inside, -100 ignored). past_key_values: a HopeState from the previous call
        (HOPE recurrent mixers only).

        attention_mask [B, T] (1 = token, 0 = padding): each row's ones must be one contiguous span
        (left or right padding). With padding, every row's span runs on its own, unpadded (rows of equal
        span length together), so a pad token never enters a memory, a position or an attention score:
        a row's logits equal its unpadded run. Pad positions get logits 0 and are left out of the loss;
        no HopeState is returned (generate() then re-reads each row's span at every step).
        Raises ValueError for a mask with holes, or padding together with past_key_values."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported by nl models: pass input_ids")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if attention_mask is not None and not bool(attention_mask.all()):
            if past_key_values is not None:
                raise ValueError("padding (attention_mask with zeros) together with past_key_values: a padded "
                                 "batch keeps no recurrent state; pass past_key_values=None")
            logits = self._padded_logits(input_ids, attention_mask)
            loss = None
            if labels is not None:  # neither a pad's prediction nor a prediction of a pad counts
                real = attention_mask.bool()
                labels = labels.masked_fill(~real, -100)
                labels[:, 1:] = labels[:, 1:].masked_fill(~real[:, :-1], -100)
                loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                   ignore_index=-100)
            return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=None)
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

    def _padded_logits(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of a padded batch: each row's contiguous span of ones run unpadded, rows with
        spans of the same length batched together; zeros at pad positions. HOPE's chunk scan cannot skip
        a token inside a chunk cheaply, and a left pad would shift Transformer++'s RoPE positions, so
        running the real span alone is the exact way for every architecture."""
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        starts = mask.int().argmax(1)  # first one of each row (0 for an all-pad row)
        positions = torch.arange(mask.shape[1], device=mask.device)
        span = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
        if not torch.equal(span, mask):
            raise ValueError("attention_mask must mark one contiguous span per row (left or right padding); "
                             "a mask with holes cannot be run exactly by nl models")
        logits = None
        for n in sorted(set(lengths.tolist())):
            if n == 0:
                continue  # an all-pad row: logits stay 0
            rows = (lengths == n).nonzero().flatten()
            index = starts[rows, None] + torch.arange(n, device=mask.device)
            out = self.net(input_ids[rows[:, None], index])
            if logits is None:
                logits = out.new_zeros(*input_ids.shape, out.shape[-1])
            logits[rows[:, None], index] = out
        if logits is None:
            raise ValueError("attention_mask is all zeros: there is no token to run")
        return logits

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: HopeState | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                                      **kwargs) -> dict:
        """With a HopeState only the tokens it has not consumed go in (one per step); otherwise all."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.seen_tokens:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}
