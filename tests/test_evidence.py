"""benchmarks/evidence.py (issue 20's study) end to end in its tiny configuration, and its pieces against
independent computations: matched budgets against PEFT's own trainable counts, the chosen learning rate against the
sweep's cells, the paired interval against scipy's paired t-test, resuming without retraining, the lock files."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # a folder of scripts, not a package
import evidence  # noqa: E402

pytestmark = pytest.mark.slow  # ~1 min: trains ~150 tiny cells and decodes with SmolLM2's tokenizer


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    pytest.importorskip("reasoning_gym")
    out = tmp_path_factory.mktemp("evidence")
    evidence.main(["--tiny", "--out", str(out), "--threads", "1"])
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]


def test_every_cell_ran_and_the_report_has_every_claim(study):
    rows = _rows(study)
    tasks, seeds = list(evidence.TASKS), [0, 1]
    sweep = sum(len(evidence.LR_GRID[k]) for k in evidence.METHODS.values())
    main = len(tasks) * (len(evidence.METHODS) * len(seeds) + 1)  # + the untrained base per task
    ablations = len(tasks) * len(evidence.ABLATIONS) * len(seeds) + 3 * len(evidence.TRANSFER) * len(seeds)
    assert len(rows) == sweep + main + ablations
    assert not list((study / "runs").glob("*.lock"))
    summary = json.loads((study / "summary.json").read_text())
    assert set(summary["claims"]) == set(evidence.CLAIMS)
    assert all(summary["claims"][c]["tests"] for c in evidence.CLAIMS)  # every claim has at least one comparison
    for claim in evidence.CLAIMS:
        assert (study / f"claim_{claim}.png").stat().st_size > 0
    assert set(summary["selection_analysis"]) == set(tasks) | set(evidence.TRANSFER.values())


def test_budgets_match_alps_in_peft_trainable_counts(study):
    """``trainable`` is PEFT's own count of the built model, independent of ``selection_params``."""
    rows = [r for r in _rows(study) if r["split"] == "test"]
    count = {(r["task"], r["method"], r["seed"]): r["trainable"] for r in rows}
    for (task, method, seed), n in count.items():
        alps = count[(task, "alps", seed)]
        if method in ("random=params", "alps@basic_arithmetic"):
            assert n == alps, (task, method)
        if method in ("lora", "shira"):  # the rank closest to ALPS's count: within one rank step
            per_rank = 2 * ((64 + 64) + 2 * (64 + 32))  # 2 layers x (q: d+d, k and v: d+kv) per rank
            assert abs(n - alps) <= per_rank / 2 + 1e-9, (task, method, n, alps)
        if method == "supertuning":
            assert abs(n - alps) <= 3 * 2, (task, n, alps)  # a rounding of the sparsity per q/k/v module


def _config():
    import transformers as tf

    return tf.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)


def _layout():
    from peft_alps import HeadLayout

    return HeadLayout.from_model_config(_config())


def test_selection_params_equals_peft_count():
    from peft import get_peft_model
    import transformers as tf

    from peft_alps import HeadMaskConfig

    layout = _layout()
    for seed in range(4):
        heads = evidence.random_matched(layout, 5 * 16 * 64, seed)  # room for 5 head-slices' rows
        model = get_peft_model(tf.LlamaForCausalLM(_config()), HeadMaskConfig(heads=heads, parts=["q", "k", "v"]))
        peft_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert evidence.selection_params(layout, heads) == peft_count <= 5 * 16 * 64
        assert peft_count >= 4 * 16 * 64  # the greedy fill stops less than one q slice short at most


def test_main_runs_use_the_sweeps_best_rate(study):
    rows = _rows(study)
    sweep = [r for r in rows if r["split"] == "val"]
    for method in evidence.METHODS:
        cells = [r for r in sweep if r["method"] == method]
        best = min(cells, key=lambda r: r["loss"])["lr"]
        used = {r["lr"] for r in rows if r["split"] == "test" and r["method"] == method}
        assert used == {best}, method
    assert {r["lr"] for r in rows if r["method"] == "kl"} == {r["lr"] for r in rows if r["method"] == "alps" and
                                                                r["split"] == "test"}


def test_paired_interval_agrees_with_scipy():
    from scipy import stats

    rng = torch.Generator().manual_seed(0)
    for shift in (0.0, 0.05, 0.3):
        a = torch.rand(6, generator=rng).tolist()
        b = [x - shift + 0.1 * (torch.rand(1, generator=rng).item() - 0.5) for x in a]
        rows = [dict(method=m, task="t", seed=i, split="test", exact_match=v) for m, vals in (("a", a), ("b", b))
                for i, v in enumerate(vals)]
        got = evidence.paired(rows, "a", "b")
        ref = stats.ttest_rel(a, b)
        assert got["mean"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / 6)
        assert got["real"] == (ref.pvalue < 0.05)
        ci = ref.confidence_interval(0.95)
        assert (got["low"], got["high"]) == pytest.approx((ci.low, ci.high))


def test_a_rerun_trains_nothing(study):
    before = {p.name: p.stat().st_mtime_ns for p in (study / "runs").glob("*.json")}
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import evidence, alps_study; "
            "alps_study.train = lambda *a, **k: (_ for _ in ()).throw(AssertionError('trained')); "
            f"evidence.main(['--tiny', '--out', {str(study)!r}, '--threads', '1'])")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1],
                   capture_output=True)
    assert {p.name: p.stat().st_mtime_ns for p in (study / "runs").glob("*.json")} == before


def test_splits_are_disjoint_and_fixed(study):
    import transformers as tf

    from peft_alps.pretrained import smollm2_checkpoint_dir

    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_checkpoint_dir())
    small = evidence.splits("letter_counting", tokenizer, dict(train=8, val=4, test=4))
    large = evidence.splits("letter_counting", tokenizer, dict(train=20, val=4, test=4))
    key = [{tuple(e["prompt"]) for e in small[s]} for s in ("train", "val", "test")]
    assert not (key[0] & key[1] or key[0] & key[2] or key[1] & key[2])
    assert [e["prompt"] for e in small["test"]] == [e["prompt"] for e in large["test"]]


def test_locks(tmp_path):
    claims = evidence.Claims(tmp_path)
    assert claims.claim("x") and not claims.claim("x")  # we hold it (our pid is alive)
    claims.release("x")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "y.lock").write_text(str(dead.pid))
    assert claims.claim("y")  # its process is gone: taken over
    assert (tmp_path / "y.lock").read_text() == str(os.getpid())
    (tmp_path / "z.json").write_text("{}")
    assert not claims.claim("z") and not (tmp_path / "z.lock").exists()  # already done
    assert math.isnan(evidence.t_interval([1.0])[1])


def test_the_report_keeps_only_cells_at_the_rate_the_sweep_picks():
    val = [dict(method="alps", lr=lr, split="val", loss=loss) for lr, loss in ((1e-3, 0.5), (3e-3, 0.4))]
    test = [dict(method=m, lr=lr, split="test") for m in ("alps", "kl", "alps@x") for lr in (1e-3, 3e-3)]
    test.append(dict(method="lora", lr=1e-3, split="test"))  # no sweep for lora yet: kept
    kept = evidence.current(val + test)
    assert [r for r in kept if r["split"] == "val"] == val
    assert sorted((r["method"], r["lr"]) for r in kept if r["split"] == "test") == \
        [("alps", 3e-3), ("alps@x", 3e-3), ("kl", 3e-3), ("lora", 1e-3)]
