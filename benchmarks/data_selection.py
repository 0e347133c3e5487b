"""Scale of ``select_data``: time and peak memory when selecting 10% of 5,000 and 50,000 texts.

Embeddings and degradation scores are inputs here (``embeddings=``, ``degradation=``): the selection itself
(kNN graph, spectral clustering, budget, ranking, conflict filter) is what is timed. The embeddings are
synthetic (a mixture of 20 Gaussian groups on the 384-d unit sphere, MiniLM's shape), the texts real
(standard-library docstrings, recycled with a numeric suffix) so that RAKE and the concept graph do real work.
MiniLM's own embedding throughput is measured separately on real texts, to extrapolate the embedding time.
The kNN graph is also timed with scikit-learn's ``NearestNeighbors`` (brute force) for comparison.

Each size runs in its own subprocess, which reports its peak RSS (``ru_maxrss``) and its RSS after imports.

    python benchmarks/data_selection.py [--sizes 5000 50000] [--quick]

Prints a table and writes benchmarks/results/data_selection.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DIM, GROUPS = 384, 20


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child(n: int, clusters: int, sklearn_knn: bool) -> dict:
    import numpy as np

    from peft_alps.data import stdlib_docstrings
    from peft_alps.data_selection import select_data
    from peft_alps.data_selection.cluster import knn_graph
    from peft_alps.demo import TRAIN_MODULES

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((GROUPS, DIM))
    x = centres[rng.integers(0, GROUPS, n)] * 0.3 + rng.standard_normal((n, DIM)) * 0.1
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    pool = stdlib_docstrings(TRAIN_MODULES)
    texts = [f"{pool[i % len(pool)][:600]} ({i})" for i in range(n)]
    degradation = rng.gamma(2.0, 0.05, n)
    lengths = rng.integers(20, 256, n)
    base = rss_mb()
    row = dict(n=n, rss_after_imports_mb=base)
    t, cpu = time.perf_counter(), time.process_time()
    sel = select_data(texts, embeddings=x, degradation=degradation, lengths=lengths, budget=0.1, clusters=clusters,
                      seed=0)
    row.update(select_s=time.perf_counter() - t, select_cpu_s=time.process_time() - cpu, steps_s=sel.seconds,
               selected=len(sel.indices),
               rejected=sum(c.rejected for c in sel.clusters), cluster_sizes=[c.size for c in sel.clusters])
    t = time.perf_counter()  # the kNN graph alone: the costly step
    knn_graph(x, 15)
    row["knn_torch_s"] = time.perf_counter() - t
    if sklearn_knn:
        from sklearn.neighbors import NearestNeighbors

        t = time.perf_counter()
        NearestNeighbors(n_neighbors=16, algorithm="brute").fit(x).kneighbors(x)
        row["knn_sklearn_brute_s"] = time.perf_counter() - t
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["dense_nxn_float64_mb"] = n * n * 8 / 2**20  # what one dense affinity matrix would take
    return row


def embed_throughput(count: int) -> dict:
    from peft_alps.data import stdlib_docstrings
    from peft_alps.data_selection.embed import embed_texts
    from peft_alps.demo import TRAIN_MODULES
    from peft_alps.pretrained import load_minilm

    texts = (stdlib_docstrings(TRAIN_MODULES) * 10)[:count]
    encoder, tok = load_minilm()
    embed_texts(texts[:16], encoder, tok)  # warm-up
    t = time.perf_counter()
    embed_texts(texts, encoder, tok, progress=False)
    seconds = time.perf_counter() - t
    return dict(texts=count, seconds=seconds, texts_per_s=count / seconds,
                mean_chars=sum(map(len, texts)) / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--embed-texts", type=int, default=512, help="texts for MiniLM throughput")
    parser.add_argument("--quick", action="store_true", help="sizes 500 and 2000, 64 texts embedded")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sklearn", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_selection.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.clusters, args.sklearn)))
        return
    if args.quick:
        args.sizes, args.embed_texts = [500, 2000], 64
        args.out = args.out.replace(".json", "_quick.json")
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine, write_json

    res = dict(meta=dict(vars(args), **machine()), rows=[])
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--clusters", str(args.clusters)]
        if n <= 5000:
            cmd.append("--sklearn")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res["rows"].append(json.loads(out.strip().splitlines()[-1]))
        write_json(args.out, res)
    res["embedding"] = embed_throughput(args.embed_texts)
    write_json(args.out, res)
    print("| texts | select s | kNN s (torch blocked) | kNN s (sklearn brute) | cluster s | select step s | "
          "peak RSS MB | RSS after imports MB | dense N x N would be MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['n']:,} | {r['select_s']:.1f} | {r['knn_torch_s']:.1f} | {r.get('knn_sklearn_brute_s', '-')} | "
              f"{r['steps_s']['cluster']:.1f} | {r['steps_s']['select']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['rss_after_imports_mb']:.0f} | {r['dense_nxn_float64_mb']:,.0f} |")
    e = res["embedding"]
    print(f"MiniLM embedding: {e['texts_per_s']:.1f} texts/s ({e['texts']} docstrings, {e['mean_chars']:.0f} chars "
          f"on average): 50,000 texts ~ {50000 / e['texts_per_s'] / 60:.0f} min")


if __name__ == "__main__":
    main()
