"""Our own forward pass over a Hugging Face Llama-family model, reading K/V from a paged pool.

Why not `model.generate` with a per-request `DynamicCache`? Continuous batching needs one forward
pass to serve a *mixed* batch: decode tokens of many running requests (each at its own length)
plus chunks of new prompts, with requests joining and leaving between steps. HF's per-request
caches cannot be batched without padding/copying them on every step, cannot share a prefix between
requests, and cannot be evicted token by token. So we reuse the HF modules (weights, norms, MLPs,
rotary embedding) and write only the attention plumbing:

- all tokens of a step are flattened into one `[T, hidden]` matrix: projections, norms and MLPs run
  once for the whole batch (that is where the FLOPs are);
- each layer writes the new tokens' K/V into the shared `KVPool` at slots chosen by the scheduler;
- decode rows (one query each) are attended in ONE SDPA call: their keys are gathered from the pool
  through the request->slot table into a padded `[B, kv_heads, L_max, head_dim]` tensor with a
  length mask;
- each prefill chunk attends to its cached prefix plus itself, causally (one SDPA call per chunk).

Supported: Llama, Mistral, Qwen2 (incl. q/k/v bias) - the same decoder layout. Anything else is
rejected with an error that names the architecture.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from app.engines.embedded.kv_pool import KVPool, ReqToTokenPool
from app.errors import EngineError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class PrefillSpan:
    """One prompt chunk in a batch: tokens [q_start, q_start + q_len) of the flat batch."""

    q_start: int
    q_len: int
    row: int  # the request's row in the ReqToTokenPool
    prefix_len: int  # tokens of this request already in the KV pool before this chunk


@dataclass
class ForwardBatch:
    """The flat token batch of one step. Decode tokens come first, then prefill chunks."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_slots: torch.Tensor  # [T] int64 KV slots the new tokens are written to
    decode_rows: torch.Tensor  # [B] int64 request rows of the decode tokens (tokens 0..B-1)
    decode_kv_lens: torch.Tensor  # [B] int64 KV length of each decode row, incl. its new token
    prefills: list[PrefillSpan] = field(default_factory=list)
    logit_indices: torch.Tensor | None = None  # [N] token indices whose logits are wanted

    INDEX_TENSORS = ("input_ids", "positions", "out_slots", "decode_rows", "decode_kv_lens", "logit_indices")

    @property
    def num_decode(self) -> int:
        return int(self.decode_rows.numel())

    def to(self, device: torch.device) -> "ForwardBatch":
        """The batch on `device`: the scheduler builds it on the host; a GPU model needs its
        indices next to its KV pool (no-op on CPU)."""
        if self.input_ids.device == device:
            return self
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in self.INDEX_TENSORS
                 if getattr(self, name) is not None}
        return replace(self, **moved)


@dataclass
class FusedWeights:
    """One matmul for q/k/v and one for gate/up instead of five: fewer kernel launches per
    layer, which is what small decode batches pay for. The HF modules' weights become views into
    these tensors, so memory is not doubled."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor | None  # None: an MLP of another shape, called as is


def _fuse_layer(layer: Any) -> FusedWeights:
    attn = layer.self_attn
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    qkv = torch.cat([p.weight.data for p in projections])
    biases = [p.bias for p in projections]
    qkv_bias = torch.cat([b.data for b in biases]) if all(b is not None for b in biases) else None
    offset = 0
    for p in projections:
        rows = p.weight.shape[0]
        p.weight.data = qkv[offset:offset + rows]
        if qkv_bias is not None:
            p.bias.data = qkv_bias[offset:offset + rows]
        offset += rows
    mlp = layer.mlp
    gate_up = None
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
            mlp.gate_proj.bias is None and mlp.up_proj.bias is None:
        gate_up = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data])
        rows = mlp.gate_proj.weight.shape[0]
        mlp.gate_proj.weight.data = gate_up[:rows]
        mlp.up_proj.weight.data = gate_up[rows:]
    return FusedWeights(qkv, qkv_bias, gate_up)


def resolve_dtype(name: str, device: torch.device, config: Any) -> torch.dtype:
    """"auto": the checkpoint's dtype on CUDA, float32 on CPU (bf16/fp16 matmuls are slow there)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float16


class ModelRunner:
    def __init__(self, model_path: str, *, dtype: str, device: torch.device,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        model_type = getattr(config, "model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(getattr(config, "architectures", None) or [model_type])
            raise EngineError(
                f"the embedded engine supports Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                f"{model_path} is {archs} (model_type {model_type!r}). Use engine.kind=sglang for it."
            )
        self.device = device
        self.dtype = resolve_dtype(dtype, device, config)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, trust_remote_code=trust_remote_code
        ).to(device).eval()
        self.config = config
        self.num_layers: int = config.num_hidden_layers
        self.num_heads: int = config.num_attention_heads
        self.kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.vocab_size: int = config.vocab_size
        context = config.max_position_embeddings
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < context:
            context = window  # we attend to everything, so stay inside the window
        self.context_len: int = int(context)
        self.scaling = self.head_dim**-0.5
        backbone = self.model.model
        self.embed = backbone.embed_tokens
        self.layers = list(backbone.layers)
        self.final_norm = backbone.norm
        self.rotary = backbone.rotary_emb
        self.lm_head = self.model.lm_head
        self.apply_rotary: Callable = sys.modules[type(self.model).__module__].apply_rotary_pos_emb
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.fused = [_fuse_layer(layer) for layer in self.layers]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVPool, req_to_token: ReqToTokenPool) -> torch.Tensor:
        """Run one step; write the new K/V; return float32 logits for `batch.logit_indices`."""
        batch = batch.to(self.device)
        T = batch.input_ids.numel()
        hidden = self.embed(batch.input_ids)  # [T, H]
        cos, sin = self.rotary(hidden, batch.positions[None])  # [1, T, D]
        cos, sin = cos[0], sin[0]
        decode = self._decode_gather_plan(batch, req_to_token)
        prefill_plans = [self._prefill_plan(span, req_to_token) for span in batch.prefills]
        B = batch.num_decode
        nq, nkv = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        for layer_idx, (layer, fused) in enumerate(zip(self.layers, self.fused)):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            qkv = F.linear(x, fused.qkv_weight, fused.qkv_bias)
            q = qkv[:, :nq].view(T, self.num_heads, self.head_dim)
            k = qkv[:, nq:nq + nkv].view(T, self.kv_heads, self.head_dim)
            v = qkv[:, nq + nkv:].view(T, self.kv_heads, self.head_dim)
            q, k = self.apply_rotary(q, k, cos, sin, unsqueeze_dim=1)
            keys, values = kv.keys(layer_idx), kv.values(layer_idx)
            keys.index_copy_(0, batch.out_slots, k.to(keys.dtype))
            values.index_copy_(0, batch.out_slots, v.to(values.dtype))
            out = torch.empty_like(q)
            if B:
                idx, mask = decode
                kd = keys[idx].transpose(1, 2)  # [B, kvh, L, D]
                vd = values[idx].transpose(1, 2)
                qd = q[:B].unsqueeze(2)  # [B, h, 1, D]
                od = F.scaled_dot_product_attention(
                    qd, kd, vd, attn_mask=mask, scale=self.scaling, enable_gqa=True
                )
                out[:B] = od.squeeze(2)
            for span, (slots, mask) in zip(batch.prefills, prefill_plans):
                qs = q[span.q_start:span.q_start + span.q_len].transpose(0, 1)[None]  # [1,h,q,D]
                if span.prefix_len == 0:  # the chunk's own K/V are all there is
                    ks = k[span.q_start:span.q_start + span.q_len]
                    vs = v[span.q_start:span.q_start + span.q_len]
                else:
                    ks, vs = keys[slots], values[slots]
                ks = ks.transpose(0, 1)[None]
                vs = vs.transpose(0, 1)[None]
                op = F.scaled_dot_product_attention(
                    qs, ks.to(qs.dtype), vs.to(qs.dtype), attn_mask=mask,
                    is_causal=mask is None, scale=self.scaling, enable_gqa=True,
                )
                out[span.q_start:span.q_start + span.q_len] = op[0].transpose(0, 1)
            hidden = hidden + attn.o_proj(out.reshape(T, -1))
            hidden = hidden + self._mlp(layer, fused, layer.post_attention_layernorm(hidden))
        if batch.logit_indices is not None:
            hidden = hidden[batch.logit_indices]
        return self.lm_head(self.final_norm(hidden)).float()

    @staticmethod
    def _mlp(layer: Any, fused: "FusedWeights", x: torch.Tensor) -> torch.Tensor:
        if fused.gate_up_weight is None:
            return layer.mlp(x)
        gate, up = F.linear(x, fused.gate_up_weight).chunk(2, dim=-1)
        return layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def _decode_gather_plan(self, batch: ForwardBatch, req_to_token: ReqToTokenPool
                            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if batch.num_decode == 0:
            return None
        max_len = int(batch.decode_kv_lens.max())
        idx = req_to_token.table[batch.decode_rows, :max_len]  # [B, L]; padding masked below
        arange = torch.arange(max_len, device=idx.device)
        mask = (arange[None, :] < batch.decode_kv_lens[:, None])[:, None, None, :]  # [B,1,1,L]
        return idx, mask

    def _prefill_plan(self, span: PrefillSpan, req_to_token: ReqToTokenPool
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if span.prefix_len == 0:
            return None, None
        kv_len = span.prefix_len + span.q_len
        slots = req_to_token.table[span.row, :kv_len]
        q_pos = span.prefix_len + torch.arange(span.q_len, device=slots.device)
        mask = torch.arange(kv_len, device=slots.device)[None, :] <= q_pos[:, None]  # [q, L]
        return slots, mask
