"""Training with the transformers Trainer, gradient checkpointing on."""

import torch
import transformers as tf
from conftest import make_model
from peft import get_peft_model

from peft_alps import HeadMaskConfig


def test_trainer_with_gradient_checkpointing_lowers_loss(tmp_path):
    model = make_model("llama")
    model.config.use_cache = False
    pm = get_peft_model(model, HeadMaskConfig(heads={0: [0, 1], 1: [2], 2: [3]}, parts=["q", "k", "v", "o"]))
    g = torch.Generator().manual_seed(0)
    # a learnable task: four fixed sequences, seen 16 times each
    sequences = [torch.randint(2, 128, (16,), generator=g) for _ in range(4)]
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in sequences * 16]
    before = [p.detach().clone() for p in pm.parameters() if p.requires_grad]
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=4,
                                learning_rate=3e-2, weight_decay=0.1, logging_steps=1, report_to=[],
                                save_strategy="no", gradient_checkpointing=True, use_cpu=True,
                                disable_tqdm=True)
    trainer = tf.Trainer(model=pm, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 32
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.3, (first, last)  # step-to-step noise here is ~0.05
    assert pm.base_model.model.is_gradient_checkpointing
    after = [p.detach() for p in pm.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
