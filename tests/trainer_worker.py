"""The transformers ``Trainer`` on a head-mask adapter, in one process or under ``accelerate launch``
(tests/test_distributed.py runs both and compares):

    python tests/trainer_worker.py OUT_DIR                                             # one process
    accelerate launch --cpu --num_processes 2 tests/trainer_worker.py OUT_DIR          # DDP, 2 processes
    accelerate launch --cpu --num_processes 2 --use_fsdp --fsdp_version 2 \\
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \\
        tests/trainer_worker.py OUT_DIR                                                # FSDP2, 2 processes

The global batch is the same in every case (4 sequences a step, the data in order, 2 accumulated micro-batches), so
the trained adapters must agree. ``trainer.save_model`` writes the adapter to OUT_DIR.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GLOBAL_BATCH, ACCUMULATION, STEPS = 4, 2, 2


def main(out: Path) -> None:
    import transformers
    from conftest import make_inputs, make_model
    from peft import get_peft_model
    from torch.utils.data import SequentialSampler

    from peft_alps import HeadMaskConfig

    class InOrder(transformers.Trainer):  # the same samples in the same global batches, whatever the world size
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = get_peft_model(make_model("llama", dtype=torch.float64),
                           HeadMaskConfig(heads={0: [1], 2: [0, 3]}, parts=["q", "k", "v", "o"], init_weights=False))
    ids = make_inputs(seed=7, batch=GLOBAL_BATCH * ACCUMULATION * STEPS)["input_ids"]
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=GLOBAL_BATCH // world,
        gradient_accumulation_steps=ACCUMULATION, max_steps=STEPS, learning_rate=1e-2, weight_decay=0.1,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not os.environ.get("ACCELERATE_USE_FSDP"), dataloader_num_workers=0, seed=0, data_seed=0, max_grad_norm=0.0,
    )
    trainer = InOrder(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():  # how it ran, for the test to check
        sharded = any(type(p).__name__ == "DTensor" for p in trainer.model_wrapped.parameters())
        (out / "run.json").write_text(json.dumps({"world": world, "sharded": sharded,
                                                  "distributed_type": str(trainer.accelerator.distributed_type)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
