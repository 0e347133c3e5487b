"""Head-mask training in several processes, launched by tests/test_distributed.py with
``torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py MODE OUT_DIR`` (gloo, CPU).

MODE ``ddp`` wraps the PEFT model in ``DistributedDataParallel``; ``fsdp2`` shards each decoder layer and the root
with ``fully_shard``. Both train :func:`train` (the same function the test runs in one process as the reference)
for every variant of :data:`VARIANTS`, each rank on its half of every global batch, and write to OUT_DIR:

* ``{variant}.rank{r}.safetensors``: the adapter's tensors after training, gathered whole (FSDP2: every rank
  gathers; DDP: each rank's own copy, so the test can see that ranks agree);
* ``{variant}/``: ``save_pretrained`` of the adapter from rank 0, given the gathered state dict;
* ``facts.json``: what DDP put in its buckets, and what merge_and_unload does on the sharded model;
* FSDP2 only, ``resumed.rank{r}.safetensors``: the ``plain`` adapter loaded back from its folder
  (``PeftModel.from_pretrained(..., is_trainable=True)``), sharded and trained on (:func:`resume`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADS = {0: [1], 2: [0, 3]}
PARTS = ["q", "k", "v", "o"]
VARIANTS = {"plain": 0.0, "gmt": 0.5}  # name -> grad_mask_ratio
STEPS, ACCUMULATION, GLOBAL_BATCH = 2, 2, 4


def make_peft_model(ratio: float, dtype=torch.float64):
    """The tiny float64 Llama of tests/conftest.py with a head-mask adapter (float64: the comparison with one process
    then shows the reduction order only, ~1e-15, and GMT's choice of entries cannot flip on rounding; DeepSpeed
    trains float32)."""
    from conftest import make_model
    from peft import get_peft_model

    from peft_alps import HeadMaskConfig

    model = make_model("llama", dtype=dtype)
    return get_peft_model(model, HeadMaskConfig(heads=HEADS, parts=PARTS, grad_mask_ratio=ratio, init_weights=False))


def batches():
    """``STEPS * ACCUMULATION`` global micro-batches of ``GLOBAL_BATCH`` sequences (same length: every sample
    weighs the same in a mean over tokens, so averaging the ranks' gradients equals the global mean)."""
    from conftest import make_inputs

    return [make_inputs(seed=100 + i, batch=GLOBAL_BATCH)["input_ids"] for i in range(STEPS * ACCUMULATION)]


def train(model, step_model=None, rank: int = 0, world: int = 1, no_sync=None) -> None:
    """AdamW over :func:`batches`, ``ACCUMULATION`` micro-batches per step; rank ``rank`` of ``world`` takes its
    contiguous share of each global batch. ``step_model``: what to call (the DDP / FSDP wrapper; default
    ``model``); ``no_sync(is_last)``: a context for each micro-batch's backward (gradient sync on the last only)."""
    import contextlib

    step_model = step_model or model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    share = GLOBAL_BATCH // world
    data = batches()
    for step in range(STEPS):
        for micro in range(ACCUMULATION):
            ids = data[step * ACCUMULATION + micro][rank * share:(rank + 1) * share]
            last = micro == ACCUMULATION - 1
            with no_sync(last) if no_sync else contextlib.nullcontext():
                loss = step_model(input_ids=ids, labels=ids).loss / ACCUMULATION
                loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def resume(folder):
    """The saved adapter in ``folder`` loaded onto a fresh base, trainable (to train on from it)."""
    from conftest import make_model
    from peft import PeftModel

    return PeftModel.from_pretrained(make_model("llama", dtype=torch.float64), folder, is_trainable=True)


def shard(model) -> None:
    """FSDP2: each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """``{name: full tensor}`` of the trainable tensors (DTensor shards gathered: a collective)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().cpu().clone().contiguous()
    return out


def deepspeed_config(stage: int, world: int) -> dict:
    """The DeepSpeed config of :func:`train`'s recipe: the same global batch, accumulation and AdamW."""
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": ACCUMULATION,
            "gradient_clipping": 0.0, "zero_optimization": {"stage": stage,
                                                            "stage3_gather_16bit_weights_on_model_save": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}}}


def deepspeed_main(stage: int, out_dir: Path) -> None:
    """ZeRO-``stage`` (2 or 3) through ``deepspeed.initialize``: float32 training of :func:`train`'s recipe, the
    adapter gathered and written per rank; then GMT must refuse (DeepSpeed steps its own flat copies of the slices);
    then, for ZeRO-3, a model built under ``zero.Init`` (weights partitioned before the adapter exists) wraps."""
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    facts = {}
    model = make_peft_model(0.0, torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=deepspeed_config(stage, world))
    share, data = GLOBAL_BATCH // world, batches()
    for ids in data:
        ids = ids[rank * share:(rank + 1) * share]
        engine.backward(engine(input_ids=ids, labels=ids).loss)  # DeepSpeed divides by the accumulation steps
        engine.step()
    with deepspeed.zero.GatheredParameters(params):
        save_file({n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(out_dir / f"zero{stage}.rank{rank}.safetensors"))
    gmt = make_peft_model(0.5, torch.float32)
    engine, *_ = deepspeed.initialize(model=gmt, model_parameters=[p for p in gmt.parameters() if p.requires_grad],
                                      config=deepspeed_config(stage, world))
    try:
        for micro in range(ACCUMULATION):
            ids = data[micro][rank * share:(rank + 1) * share]
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        facts["gmt"] = "trained"
    except RuntimeError as e:
        facts["gmt"] = str(e)
    if stage == 3:
        import transformers
        from conftest import ARCHS
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(deepspeed_config(3, world))  # noqa: F841 - zero.Init while it is alive
        base = transformers.AutoModelForCausalLM.from_config(ARCHS["llama"][0]())
        facts["zero_init_partitioned"] = hasattr(base.model.layers[0].self_attn.q_proj.weight, "ds_numel")
        from peft import get_peft_model

        from peft_alps import HeadMaskConfig

        wrapped = get_peft_model(base, HeadMaskConfig(heads=HEADS, parts=PARTS))
        facts["zero_init_fingerprint"] = wrapped.peft_config["default"].base_fingerprint is not None
        try:
            wrapped.merge_and_unload()
            facts["merge"] = "merged"
        except RuntimeError as e:
            facts["merge"] = str(e)
    if rank == 0:
        (out_dir / f"zero{stage}.json").write_text(json.dumps(facts))
    dist.barrier()


def main(mode: str, out_dir: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    if mode in ("zero2", "zero3"):
        return deepspeed_main(int(mode[-1]), out_dir)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    facts = {}
    for variant, ratio in VARIANTS.items():
        model = make_peft_model(ratio)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
            facts["ddp_bucketed_bytes"] = wrapped._get_ddp_logging_data().get("total_parameter_size_bytes")
            facts["adapter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            train(model, wrapped, rank, world, no_sync=lambda last: wrapped.no_sync() if not last else _null())
        else:
            shard(model)
            train(model, model, rank, world, no_sync=_fsdp_sync(model))
        tensors = adapter_tensors(model)
        save_file(tensors, str(out_dir / f"{variant}.rank{rank}.safetensors"))
        if mode == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                model.save_pretrained(out_dir / variant, state_dict=state)
            if variant == "plain":
                try:
                    model.merge_and_unload()
                    facts["merge"] = "merged"
                except Exception as e:  # noqa: BLE001 - recorded for the test to check
                    facts["merge"] = f"{type(e).__name__}: {e}"
        elif rank == 0:
            model.save_pretrained(out_dir / variant)
        dist.barrier()
    if mode == "fsdp2":
        model = resume(out_dir / "plain")
        shard(model)
        train(model, model, rank, world, no_sync=_fsdp_sync(model))
        save_file(adapter_tensors(model), str(out_dir / f"resumed.rank{rank}.safetensors"))
    if rank == 0:
        (out_dir / "facts.json").write_text(json.dumps(facts))
    dist.destroy_process_group()


def _fsdp_sync(model):
    """FSDP2's gradient accumulation: reduce-scatter on the last micro-batch only."""
    def sync(last):
        model.set_requires_gradient_sync(last)
        return _null()
    return sync


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1], Path(sys.argv[2]))
