"""Compare the prepare, embed and decompose outputs of two or more ML-1M run folders.

Usage: python benchmarks/ml1m/tablecheck/compare_stages.py REF_RUN OTHER_RUN [OTHER_RUN ...]

Prints Markdown: prepare's tables compared column by column after sorting by their key; the embed
vectors aligned by item_idx; the semantic tables (as stored and after aligning column signs);
the bases' means, eigenvalues and the principal angles between the semantic (first d - d_n) and
null-space (last d_n, D_N below) spans of the kept eigenvectors.
"""
import glob
import sys

import numpy as np
import pyarrow.parquet as pq
from safetensors.numpy import load_file

D_N = 64  # model.id_dims of the runs compared (the ml-1m preset)
KEYS = {"items": "item_idx", "train": "user_idx", "valid": "user_idx", "test": "user_idx", "users": "user_idx"}


def table(run, name):
    t = pq.read_table(f"{run}/prepare/{name}.parquet")
    return t.sort_by(KEYS[name]).to_pydict()


def prepare_cmp(a, b):
    out = []
    for name in KEYS:
        ta, tb = table(a, name), table(b, name)
        cols = sorted(set(ta) | set(tb))
        diff = {c: (sum(x != y for x, y in zip(ta[c], tb[c])) + abs(len(ta[c]) - len(tb[c])))
                if c in ta and c in tb else "missing" for c in cols}
        rows = (len(next(iter(ta.values()))), len(next(iter(tb.values()))))
        out.append(f"| {name} | {rows[0]} / {rows[1]} | " + (
            "equal" if all(v == 0 for v in diff.values())
            else ", ".join(f"{c}: {v} rows differ" for c, v in diff.items() if v != 0)) + " |")
    return out


def embed(run):
    t = pq.read_table(glob.glob(f"{run}/embed/part-*.parquet"))
    idx = t.column("item_idx").to_numpy()
    vec = np.asarray(t.column("vector").combine_chunks().flatten().to_numpy(), dtype=np.float32)
    vec = vec.reshape(len(idx), -1)
    return vec[np.argsort(idx)], np.sort(idx)


def dec(run):
    s = load_file(f"{run}/decompose/semantic.safetensors")["semantic"]
    b = load_file(f"{run}/decompose/basis.safetensors")
    return s, b


def principal_sines(u, v):
    """sin of the largest principal angle between span(u) and span(v) (orthonormal columns)."""
    sv = np.linalg.svd(u.T @ v, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - sv.min() ** 2)))


def main(ref, others):
    ea, ia = embed(ref)
    sa, ba = dec(ref)
    d, d_n = sa.shape[1], D_N
    for other in others:
        print(f"\n### {ref} vs {other}\n")
        print("prepare (rows ref / other, contents after sorting by the key column):\n")
        print("| file | rows | contents |\n|---|---|---|")
        print("\n".join(prepare_cmp(ref, other)))
        eb, ib = embed(other)
        assert np.array_equal(ia, ib)
        de = np.abs(ea.astype(np.float64) - eb)
        print(f"\nembed vectors [{ea.shape[0]} x {ea.shape[1]}] aligned by item_idx: max |diff| {de.max():.3e}, "
              f"mean |diff| {de.mean():.3e}, max |value| {np.abs(ea).max():.3f}, "
              f"rows bit-identical {int((de == 0).all(1).sum())}/{len(de)}, "
              f"elements bit-identical {int((de == 0).sum())}/{de.size}, "
              f"relative Frobenius ||a-b||/||a|| {np.linalg.norm(de) / np.linalg.norm(ea):.3e}")
        sb, bb = dec(other)
        ds = np.abs(sa.astype(np.float64) - sb)
        dot = np.einsum("ij,ij->j", sa.astype(np.float64), sb)
        flipped = np.flatnonzero(dot < 0)
        sb_aligned = sb * np.where(dot < 0, -1.0, 1.0)
        dsa = np.abs(sa.astype(np.float64) - sb_aligned)
        colrel = np.linalg.norm(sa - sb_aligned, axis=0) / np.linalg.norm(sa, axis=0)
        print(f"\nsemantic table [{sa.shape[0]} x {d}] float32: max |diff| as stored {ds.max():.3e} "
              f"(max |value| {np.abs(sa).max():.3f}); columns with opposite sign (dot < 0): {len(flipped)}"
              f"{' ' + str(flipped.tolist()) if len(flipped) else ''}; elements of equal sign "
              f"{float((np.sign(sa) == np.sign(sb)).mean()):.6f}; elements bit-identical "
              f"{int((ds == 0).sum())}/{ds.size}")
        print(f"after aligning column signs: max |diff| {dsa.max():.3e}, relative Frobenius "
              f"{np.linalg.norm(sa - sb_aligned) / np.linalg.norm(sa):.3e}; per-column relative L2 diff: "
              f"max {colrel.max():.3e} (column {int(colrel.argmax())}), median {np.median(colrel):.3e}; "
              f"first d_s={d - d_n} columns max rel {colrel[:d - d_n].max():.3e}, "
              f"last d_n={d_n} columns max rel {colrel[d - d_n:].max():.3e}")
        la, lb = ba["eigenvalues"], bb["eigenvalues"]
        order_a, order_b = np.argsort(-la), np.argsort(-lb)
        la, lb = la[order_a], lb[order_b]
        ua, ub = ba["eigenvectors"][:, order_a], bb["eigenvectors"][:, order_b]
        rel = np.abs(la[:d] - lb[:d]) / np.abs(la[:d])
        print(f"\nbasis: mean max |diff| {np.abs(ba['mean'] - bb['mean']).max():.3e}; top-{d} eigenvalues "
              f"max relative diff {rel.max():.3e} (eigenvalue #{int(rel.argmax())}, "
              f"{la[int(rel.argmax())]:.3e}); smallest kept eigenvalue {la[d - 1]:.3e}")
        cos = np.abs(np.einsum("ij,ij->j", ua[:, :d], ub[:, :d]))
        print(f"kept eigenvectors (columns 0..{d - 1}, sign-free): min |cos| {cos.min():.10f} "
              f"(column {int(cos.argmin())}), 1 - min |cos| {1 - cos.min():.3e}")
        print(f"semantic space span(U[:, :{d - d_n}]): sin of the largest principal angle "
              f"{principal_sines(ua[:, :d - d_n], ub[:, :d - d_n]):.3e}; null-space basis "
              f"span(U[:, {d - d_n}:{d}]): {principal_sines(ua[:, d - d_n:d], ub[:, d - d_n:d]):.3e}; "
              f"span(U[:, :{d}]): {principal_sines(ua[:, :d], ub[:, :d]):.3e}")
        gaps = la[:d] - la[1:d + 1]
        print(f"smallest relative gap between neighbouring kept eigenvalues: {np.min(gaps / la[:d]):.3e} "
              f"(at #{int(np.argmin(gaps / la[:d]))})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
