"""Tiny random models of every supported architecture, and an independent
reference for which weight entries belong to a head (built with tensor views,
not with peft_alps' index arithmetic)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

VOCAB = 128

# arch -> (config factory, model class, module path per part inside block, blocks attr, fused kind)
_SEP = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_BERT = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
         "o": "attention.output.dense"}
_DEC = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
ARCHS = {
    "llama": (lambda: tf.LlamaConfig(**_DEC, num_key_value_heads=2), tf.LlamaForCausalLM, _SEP, "layers", None),
    "mistral": (lambda: tf.MistralConfig(**_DEC, num_key_value_heads=2), tf.MistralForCausalLM, _SEP, "layers", None),
    "qwen2": (lambda: tf.Qwen2Config(**_DEC, num_key_value_heads=2), tf.Qwen2ForCausalLM, _SEP, "layers", None),
    "phi3": (lambda: tf.Phi3Config(**_DEC, num_key_value_heads=2, pad_token_id=0), tf.Phi3ForCausalLM,
             {"q": "self_attn.qkv_proj", "k": "self_attn.qkv_proj", "v": "self_attn.qkv_proj",
              "o": "self_attn.o_proj"}, "layers", "blocks"),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64),
             tf.GPT2LMHeadModel, {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj"},
             "h", "blocks"),
    "gpt_neox": (lambda: tf.GPTNeoXConfig(**_DEC), tf.GPTNeoXForCausalLM,
                 {"q": "attention.query_key_value", "k": "attention.query_key_value",
                  "v": "attention.query_key_value", "o": "attention.dense"}, "layers", "interleaved"),
    "bert": (lambda: tf.BertConfig(**_DEC, max_position_embeddings=64), tf.BertModel, _BERT, "layer", None),
    "roberta": (lambda: tf.RobertaConfig(**_DEC, max_position_embeddings=64), tf.RobertaModel, _BERT, "layer", None),
}
ARCH_NAMES = list(ARCHS)
_GQA = dict(_DEC, num_key_value_heads=2)
_FALCON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, bias=True)
_BIGCODE = dict(vocab_size=VOCAB, n_embd=64, n_inner=96, n_layer=3, n_head=4, n_positions=64, bos_token_id=1,
                eos_token_id=1)
_DEBERTA = dict(_DEC, max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"],
                position_buckets=16, max_relative_positions=32)
# more built-in architectures, run by the shared contract in test_delta_kinds.py (not by the whole matrix above).
# Keys are test case names (several cases may share a model_type): case -> (config factory, model class[, stack]),
# the stack naming the attention stack of a model with several (T5); arch_stack / arch_layout read it.
MORE_ARCHS = {
    "mixtral": (lambda: tf.MixtralConfig(**_GQA, num_local_experts=2, num_experts_per_tok=1), tf.MixtralForCausalLM),
    "qwen2_moe": (lambda: tf.Qwen2MoeConfig(**_GQA, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=32), tf.Qwen2MoeForCausalLM),
    "qwen3": (lambda: tf.Qwen3Config(**_GQA, head_dim=32), tf.Qwen3ForCausalLM),  # head_dim != hidden / heads
    "qwen3_moe": (lambda: tf.Qwen3MoeConfig(**_GQA, head_dim=32, num_experts=2, num_experts_per_tok=1,
                                            moe_intermediate_size=32), tf.Qwen3MoeForCausalLM),
    "gemma2": (lambda: tf.Gemma2Config(**_GQA, head_dim=32), tf.Gemma2ForCausalLM),
    "gemma3_text": (lambda: tf.Gemma3TextConfig(**_GQA, head_dim=32), tf.Gemma3ForCausalLM),
    "phi": (lambda: tf.PhiConfig(**_DEC), tf.PhiForCausalLM),
    "gptj": (lambda: tf.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, rotary_dim=8,
                                   bos_token_id=1, eos_token_id=1), tf.GPTJForCausalLM),
    "stablelm": (lambda: tf.StableLmConfig(**_GQA, eos_token_id=1, bos_token_id=1), tf.StableLmForCausalLM),
    "olmo": (lambda: tf.OlmoConfig(**_GQA), tf.OlmoForCausalLM),
    "olmo2": (lambda: tf.Olmo2Config(**_GQA), tf.Olmo2ForCausalLM),
    "xlm-roberta": (lambda: tf.XLMRobertaConfig(**_DEC, max_position_embeddings=64), tf.XLMRobertaModel),
    "distilbert": (lambda: tf.DistilBertConfig(vocab_size=VOCAB, dim=64, hidden_dim=96, n_layers=3, n_heads=4,
                                               max_position_embeddings=64), tf.DistilBertModel),
    "gemma": (lambda: tf.GemmaConfig(**_GQA, head_dim=32), tf.GemmaForCausalLM),  # head_dim != hidden / heads
    "opt": (lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64),
            tf.OPTForCausalLM),
    # Falcon's three attention layouts, chosen by the config's flags (bias on: the fused q/k/v bias slices)
    "falcon_new": (lambda: tf.FalconConfig(**_FALCON, new_decoder_architecture=True, num_kv_heads=2),
                   tf.FalconForCausalLM),  # grouped interleaved [q q k v | q q k v]
    "falcon_mq": (lambda: tf.FalconConfig(**_FALCON, new_decoder_architecture=False, multi_query=True),
                  tf.FalconForCausalLM),  # [Q | k | v], one kv head
    "falcon_mha": (lambda: tf.FalconConfig(**_FALCON, new_decoder_architecture=False, multi_query=False),
                   tf.FalconForCausalLM),  # [q k v] per head
    "gpt_bigcode_mq": (lambda: tf.GPTBigCodeConfig(**_BIGCODE, multi_query=True), tf.GPTBigCodeForCausalLM),
    "gpt_bigcode_mha": (lambda: tf.GPTBigCodeConfig(**_BIGCODE, multi_query=False), tf.GPTBigCodeForCausalLM),
    "modernbert": (lambda: tf.ModernBertConfig(**_DEC, max_position_embeddings=64, attention_bias=True,
                                               pad_token_id=0, bos_token_id=1, eos_token_id=1, cls_token_id=1,
                                               sep_token_id=1), tf.ModernBertModel),
    # relative attention (c2p and p2c): shared with the content projections (DeBERTa-v3 checkpoints), or its own
    "deberta-v2": (lambda: tf.DebertaV2Config(**_DEBERTA, share_att_key=True), tf.DebertaV2Model),
    "deberta-v2_unshared": (lambda: tf.DebertaV2Config(**_DEBERTA), tf.DebertaV2Model),  # share_att_key default
    # T5: three attention stacks, each its own layout (the case's third entry); d_kv != d_model / num_heads and
    # a decoder shallower than the encoder
    **{f"t5_{stack}": (lambda: tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=8, d_ff=96, num_layers=3,
                                           num_decoder_layers=2, num_heads=4, decoder_start_token_id=0),
                       tf.T5ForConditionalGeneration, stack) for stack in ("encoder", "decoder", "cross")},
    # mT5: T5's modules (gated-GELU feed-forward); one stack is enough to show the entry is wired
    "mt5_cross": (lambda: tf.MT5Config(vocab_size=VOCAB, d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=4,
                                       decoder_start_token_id=0), tf.MT5ForConditionalGeneration, "cross"),
}


def arch_stack(arch: str) -> str | None:
    """The attention stack a test case trains (T5's ``"encoder"``, ``"decoder"`` or ``"cross"``), else None."""
    if arch in ARCHS:
        return None
    entry = MORE_ARCHS[arch]
    return entry[2] if len(entry) > 2 else None


def arch_layout(arch: str, config):
    """The ``layout=`` a test passes to HeadMaskConfig / score_heads for ``arch``: None (derived from the config)
    for a model with one attention stack, ``HeadLayout.from_model_config(config, stack=...)`` for the others."""
    from peft_alps import HeadLayout

    stack = arch_stack(arch)
    return None if stack is None else HeadLayout.from_model_config(config, stack=stack)


def make_model(arch: str, seed: int = 0, dtype=torch.float32):
    """A tiny random model of ``arch`` (3 layers, hidden 64, 4 heads; GQA with 2 kv heads where supported)."""
    config_fn, cls, *_ = ARCHS[arch] if arch in ARCHS else MORE_ARCHS[arch]
    torch.manual_seed(seed)
    config = config_fn()
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # MoE: a plain loop over experts (the grouped matmul has no float64)
    model = cls(config).to(dtype)
    # random biases: the default zero init would hide bias-slice bugs
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "bias", None), torch.Tensor) and m.bias.is_floating_point():  # not a mask buffer
                m.bias.normal_(0, 0.02)
    return model.eval()


def make_inputs(seed: int = 1, batch: int = 2, seq: int = 12, decoder_seq: int | None = None):
    """Random token ids; ``decoder_seq``: also ``decoder_input_ids`` of that length (encoder-decoder models;
    :func:`output_of` adds default ones when they are missing)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(2, VOCAB, (batch, seq), generator=g)}
    if decoder_seq is not None:
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, decoder_seq), generator=g)
    return inputs


def decoder_input_ids(input_ids):
    """Default decoder tokens of an encoder-decoder model: the inputs reversed, cut to two thirds of their length
    (a decoder length unlike the encoder's, so cross-attention shape mix-ups cannot pass)."""
    return input_ids.flip(-1)[:, : max(1, 2 * input_ids.shape[-1] // 3)]


def output_of(model, inputs):
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and "decoder_input_ids" not in inputs:
        inputs = {**inputs, "decoder_input_ids": decoder_input_ids(inputs["input_ids"])}
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def backward_with_merged_reference(pm, inputs):
    """Backpropagate one random probe of the output through ``pm`` and through its merged copy (plain modules, the
    independent reference); return the merged copy, whose weights now hold the full gradients."""
    import copy

    ref = copy.deepcopy(pm).merge_and_unload()
    ref.requires_grad_(True)
    probe = torch.randn_like(output_of(ref, inputs))
    (output_of(pm, inputs) * probe).sum().backward()
    (output_of(ref, inputs) * probe).sum().backward()
    return ref


def block_module(model, arch, layer, part):
    """The (unwrapped) projection holding ``part`` in block ``layer``."""
    _, _, modules, blocks, _ = ARCHS[arch]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, module in base.named_modules():
        if name.endswith(f"{blocks}.{layer}.{modules[part]}"):
            return module.get_base_layer() if hasattr(module, "get_base_layer") else module
    raise KeyError((arch, layer, part))


def linear_frame(weight, module):
    """Weight as ``[out, in]`` (transposes GPT-2 Conv1D)."""
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def head_mask(arch, part, head, out_features, in_features, config):
    """Bool ``[out, in]`` mask of the entries of ``part`` owned by query head ``head``."""
    nh = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    d = config.hidden_size // nh
    group = head * nkv // nh
    fused = ARCHS[arch][4]
    m = torch.zeros(out_features, in_features, dtype=torch.bool)
    if part == "o":
        m.view(out_features, nh, d)[:, head] = True
    elif fused is None:
        m.view(-1, d, in_features)[head if part == "q" else group] = True
    elif fused == "blocks":
        q, k, v = torch.split(m, [nh * d, nkv * d, nkv * d])
        block = {"q": q, "k": k, "v": v}[part]
        block.view(-1, d, in_features)[head if part == "q" else group] = True
    else:  # interleaved per head: [q_h k_h v_h]
        m.view(nh, 3, d, in_features)[head, "qkv".index(part)] = True
    return m


def expected_masks(model, arch, heads, parts):
    """{(layer, module path): bool [out, in] mask} of every trainable weight entry, built independently."""
    modules = ARCHS[arch][2]
    masks = {}
    for layer, hs in heads.items():
        for part in parts:
            mod = block_module(model, arch, layer, part)
            w = linear_frame(mod.weight, mod)
            key = (layer, modules[part])
            m = masks.get(key, torch.zeros_like(w, dtype=torch.bool))
            for h in hs:
                m |= head_mask(arch, part, h, w.shape[0], w.shape[1], model.config)
            masks[key] = m
    return masks


@pytest.fixture(params=ARCH_NAMES)
def arch(request):
    return request.param
