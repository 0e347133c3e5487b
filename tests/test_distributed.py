"""Head-mask training in two processes (torchrun, gloo, CPU) equals training in one.

tests/distributed_worker.py trains the same tiny float64 Llama adapter under DDP and under FSDP2 (``fully_shard``),
each rank on half of every global batch, with gradient accumulation, with and without GMT. The reference is
:func:`distributed_worker.train` in this process on the whole batches: the adapters must agree to float64
reduction-order precision, the ranks with each other, GMT must choose its entries over the whole tensor (not per
shard), and ``save_pretrained`` must write the single-process file.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed_worker as worker

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def torchrun(mode: str, out: Path) -> None:
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), mode,
           str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def reference():
    """``{variant: {name: tensor}}`` of the adapters trained in this one process on the whole batches."""
    out = {}
    for variant, ratio in worker.VARIANTS.items():
        model = worker.make_peft_model(ratio)
        worker.train(model)
        out[variant] = worker.adapter_tensors(model)
    return out


def assert_trained_alike(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-10, atol=1e-12, msg=f"{what}: {name}")


def check_run(out: Path, reference: dict) -> None:
    for variant, want in reference.items():
        ranks = [load_file(out / f"{variant}.rank{r}.safetensors") for r in range(2)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), f"{variant}: ranks differ"
        assert_trained_alike(ranks[0], want, variant)
        saved = load_file(out / variant / "adapter_model.safetensors")
        single = {k.replace(".default", ""): v for k, v in want.items()}  # saved names carry no adapter name
        assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in single.items()}
        assert_trained_alike(saved, single, f"{variant} save_pretrained")
    gmt = reference["gmt"]
    for name, tensor in gmt.items():  # GMT changed the training (it is not silently off)
        assert not torch.equal(tensor, reference["plain"][name])


def test_ddp_equals_one_process(tmp_path, reference):
    torchrun("ddp", tmp_path / "ddp")
    check_run(tmp_path / "ddp", reference)
    facts = json.loads((tmp_path / "ddp" / "facts.json").read_text())
    assert facts["ddp_bucketed_bytes"] == facts["adapter_bytes"]  # only the head slices are in DDP's buckets


def test_fsdp2_equals_one_process(tmp_path, reference):
    torchrun("fsdp2", tmp_path / "fsdp2")
    check_run(tmp_path / "fsdp2", reference)
    facts = json.loads((tmp_path / "fsdp2" / "facts.json").read_text())
    assert "merge_checkpoint" in facts["merge"], facts["merge"]  # refused, pointing at the streamed file merge
    model = worker.resume(tmp_path / "fsdp2" / "plain")  # a saved adapter trains on, sharded as in one process
    worker.train(model)
    resumed = load_file(tmp_path / "fsdp2" / "resumed.rank0.safetensors")
    assert_trained_alike(resumed, worker.adapter_tensors(model), "resumed")
    assert not torch.equal(resumed[next(iter(resumed))], reference["plain"][next(iter(resumed))])


# ----- the transformers Trainer under accelerate launch -----
TRAINER = Path(__file__).resolve().parent / "trainer_worker.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
FSDP2_FLAGS = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
               "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"]


def run_trainer(launcher: list, out: Path) -> tuple[dict, dict]:
    done = subprocess.run([*launcher, str(TRAINER), str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return load_file(out / "adapter_model.safetensors"), json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def one_process_trainer(tmp_path_factory):
    return run_trainer([sys.executable], tmp_path_factory.mktemp("trainer") / "one")[0]


def test_trainer_under_accelerate_launch_equals_one_process(tmp_path, one_process_trainer):
    """``accelerate launch --multi_gpu --num_processes 2`` (on a CPU machine: two CPU processes, gloo; the launch
    command a GPU machine uses unchanged) trains and saves the adapter one process trains and saves."""
    got, run = run_trainer([*ACCELERATE, "--multi_gpu", "--num_processes", "2"], tmp_path / "ddp")
    assert run["world"] == 2 and run["distributed_type"] in ("DistributedType.MULTI_CPU", "DistributedType.MULTI_GPU")
    assert_trained_alike(got, one_process_trainer, "Trainer, 2 processes")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate's FSDP plugin needs GPUs (not MULTI_CPU)")
def test_trainer_under_accelerate_fsdp2_equals_one_process(tmp_path, one_process_trainer):
    got, run = run_trainer([*ACCELERATE, "--num_processes", "2", *FSDP2_FLAGS], tmp_path / "fsdp2")
    assert run["world"] == 2 and run["sharded"]
    assert_trained_alike(got, one_process_trainer, "Trainer, FSDP2")


# ----- DeepSpeed ZeRO-2 / ZeRO-3 (CPU accelerator, gloo) -----
@pytest.fixture(scope="module")
def reference_fp32():
    model = worker.make_peft_model(0.0, torch.float32)
    worker.train(model)
    return worker.adapter_tensors(model)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_equals_one_process(tmp_path, stage, reference_fp32):
    """deepspeed.initialize with ZeRO-2 / ZeRO-3 trains what one process trains. Float32 (DeepSpeed's ZeRO does not
    take float64): each of the 4 AdamW steps moves an entry by ~lr = 1e-2 whatever the gradient's size, so the
    reduction order's rounding can shift an entry whose gradient is near 0 by a sizeable part of a step; measured
    up to 6e-6, the bound 2e-5 is 0.1% of the ~0.02 every entry moved. GMT refuses instead of silently doing nothing, and (ZeRO-3) a base built under
    zero.Init (weights partitioned before the adapter exists) wraps, gathered for its fingerprint, and refuses to
    merge into its partitions."""
    import deepspeed  # noqa: F401  (a test dependency: missing, the test fails rather than skips)
    torchrun(f"zero{stage}", tmp_path / "ds")
    ranks = [load_file(tmp_path / "ds" / f"zero{stage}.rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert set(ranks[0]) == set(reference_fp32)
    for name, tensor in reference_fp32.items():
        torch.testing.assert_close(ranks[0][name], tensor, rtol=0, atol=2e-5, msg=name)
    facts = json.loads((tmp_path / "ds" / f"zero{stage}.json").read_text())
    assert "DeepSpeed ZeRO steps its own flat copies" in facts["gmt"]
    if stage == 3:
        assert facts["zero_init_partitioned"] and facts["zero_init_fingerprint"]
        assert "merge_checkpoint" in facts["merge"]
