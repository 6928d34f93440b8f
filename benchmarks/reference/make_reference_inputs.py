#!/usr/bin/env python3
"""Write the input files of the AlphaFuse reference code (Hugo-Chinn/AlphaFuse, ``train.py``) from
one of OUR run directories, so that both systems train and evaluate on identical data.

Reads (contract: docs/run-directory.md, alphafuse_dist/data/sequences.py):
  RUN/prepare/train.parquet   user_idx, items list<int32> (chronological training interactions)
  RUN/prepare/valid.parquet   user_idx, history list<int32>, target int32
  RUN/prepare/test.parquet    user_idx, history list<int32>, target int32
  RUN/prepare/items.parquet   item_idx (0..N-1)
  RUN/embed/part-*.parquet    item_idx int32, vector fixed_size_list<float32>[d_l]

Writes into OUT/ (what the reference reads from ``../ours_DiT/data/<DATA>/``):
  train_data.df   pickled DataFrame: seq (list of L ints, LEFT padded with N), len_seq, next
  val_data.df     same columns, one row per user: last L items of the valid history -> valid target
  test_data.df    same columns, one row per user: last L items of the test history  -> test target
  data_statis.df  pickled DataFrame: seq_size = L, item_num = N
  <LM>_emb.pickle pickled float32 array [N, d_l]: row i = our embedding of item_idx i (unscaled;
                  the reference multiplies by --language_embs_scale=40 itself)
  reference_inputs.json   counts and settings of this conversion

Training rows: one row per (history -> next item) transition of the training sequences, i.e. for
a user with training items i_0..i_{n-1}, rows (i_{max(0,t-L)}..i_{t-1} -> i_t) for t = 1..n-1.
That is exactly the set of transitions our trainer puts a loss on in one epoch (every training
transition is a target exactly once), so "transitions per second" is comparable on both sides.

Item ids are ours unchanged (0..N-1) and the padding id is N on both sides.

Only needs numpy, pandas and pyarrow (all present on the GPU image), not alphafuse_dist.
"""
from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq


def _lists(path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    col = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    return (np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.int64),
            np.asarray(col.offsets.to_numpy(zero_copy_only=False), dtype=np.int64))


def _left_padded(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, L: int, pad: int) -> np.ndarray:
    """Rows values[max(start, end-L):end], left padded with ``pad`` to width L (int64 [R, L])."""
    idx = ends[:, None] - L + np.arange(L)[None, :]
    ok = idx >= starts[:, None]
    return np.where(ok, values[np.clip(idx, 0, max(len(values) - 1, 0))], pad)


def read_embeddings(embed_dir: Path, n: int) -> np.ndarray:
    files = sorted(embed_dir.glob("part-*.parquet"))
    if not files:
        raise SystemExit(f"no part-*.parquet in {embed_dir}")
    table, seen = None, np.zeros(n, dtype=bool)
    for f in files:
        t = pq.read_table(f, columns=["item_idx", "vector"])
        v = t.column("vector").combine_chunks()
        X = v.flatten().to_numpy(zero_copy_only=False).reshape(len(v), v.type.list_size)
        idx = t.column("item_idx").to_numpy().astype(np.int64)
        if table is None:
            table = np.zeros((n, X.shape[1]), dtype=np.float32)
        if idx.min() < 0 or idx.max() >= n or seen[idx].any() or len(np.unique(idx)) != len(idx):
            raise SystemExit(f"{f}: item_idx outside 0..{n - 1} or repeated")
        seen[idx] = True
        table[idx] = X
    if not seen.all():
        raise SystemExit(f"{int((~seen).sum())} items have no embedding in {embed_dir}")
    return table


def frame(hist: np.ndarray, lengths: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"seq": hist.tolist(), "len_seq": lengths.tolist(), "next": targets.tolist()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path, help="our run directory (prepare/ and embed/)")
    ap.add_argument("--out", required=True, type=Path, help="folder to write the reference's files into")
    ap.add_argument("--max-len", type=int, default=50, help="history length L (reference seq_size)")
    ap.add_argument("--lm-name", default="minilm",
                    help="file prefix of the embedding pickle; pass the same to --language_model_type")
    ap.add_argument("--order", choices=["shuffled", "user"], default="shuffled",
                    help="row order of train_data.df. The reference DataLoader does NOT shuffle, so the "
                         "file order is the batch order of every epoch. 'shuffled' (default): one fixed "
                         "random permutation (seed --seed); 'user': grouped by user, chronological")
    ap.add_argument("--seed", type=int, default=22)
    args = ap.parse_args()
    t0 = time.time()
    prep, L = args.run_dir / "prepare", args.max_len
    N = pq.read_metadata(prep / "items.parquet").num_rows
    item_idx = pq.read_table(prep / "items.parquet", columns=["item_idx"]).column("item_idx").to_numpy()
    if not np.array_equal(np.sort(item_idx), np.arange(N)):
        raise SystemExit("items.parquet item_idx is not 0..N-1")
    pad = N

    # ---- training transitions (every prefix of every training sequence) ----
    values, offsets = _lists(prep / "train.parquet", "items")
    starts, ends = offsets[:-1], offsets[1:]
    n_pos = np.maximum(ends - starts - 1, 0)
    user = np.repeat(np.arange(len(starts)), n_pos)
    tpos = np.arange(n_pos.sum()) - np.repeat(np.cumsum(n_pos) - n_pos, n_pos) + starts[user] + 1
    tr_hist = _left_padded(values, starts[user], tpos, L, pad)
    tr_len = np.minimum(tpos - starts[user], L)
    tr_next = values[tpos]
    if args.order == "shuffled":
        perm = np.random.default_rng(args.seed).permutation(len(tr_next))
        tr_hist, tr_len, tr_next = tr_hist[perm], tr_len[perm], tr_next[perm]

    # ---- evaluation rows (one per user; history as stored by prepare) ----
    ev = {}
    for split in ("valid", "test"):
        hv, ho = _lists(prep / f"{split}.parquet", "history")
        tgt = pq.read_table(prep / f"{split}.parquet", columns=["target"]).column("target").to_numpy().astype(np.int64)
        hs, he = ho[:-1], ho[1:]
        if (he - hs == 0).any():
            raise SystemExit(f"{split}: a user has an empty history; the reference cannot take it")
        ev[split] = (_left_padded(hv, hs, he, L, pad), np.minimum(he - hs, L), tgt, hv, ho)

    # check the leave-one-out relation with train (informative only; any split converts)
    loo = None
    tr_users = pq.read_table(prep / "train.parquet", columns=["user_idx"]).column("user_idx").to_numpy()
    va_users = pq.read_table(prep / "valid.parquet", columns=["user_idx"]).column("user_idx").to_numpy()
    if np.array_equal(tr_users, va_users):
        vhv, vho = ev["valid"][3], ev["valid"][4]
        loo = bool(np.array_equal(vho, offsets) and np.array_equal(vhv, values))

    E = read_embeddings(args.run_dir / "embed", N)

    args.out.mkdir(parents=True, exist_ok=True)
    frame(tr_hist, tr_len, tr_next).to_pickle(args.out / "train_data.df")
    frame(*ev["valid"][:3]).to_pickle(args.out / "val_data.df")
    frame(*ev["test"][:3]).to_pickle(args.out / "test_data.df")
    pd.DataFrame({"seq_size": [L], "item_num": [N]}).to_pickle(args.out / "data_statis.df")
    with open(args.out / f"{args.lm_name}_emb.pickle", "wb") as f:
        pickle.dump(E, f, protocol=4)
    info = {"run_dir": str(args.run_dir), "items": N, "pad_id": pad, "seq_size": L, "d_l": int(E.shape[1]),
            "train_users": int(len(starts)), "train_interactions": int(len(values)),
            "train_transitions": int(len(tr_next)), "train_order": args.order, "seed": args.seed,
            "train_rows_truncated_to_L": int((tpos - starts[user] > L).sum()),
            "valid_users": int(len(ev["valid"][2])), "test_users": int(len(ev["test"][2])),
            "valid_history_equals_train": loo, "lm_file": f"{args.lm_name}_emb.pickle",
            "seconds": round(time.time() - t0, 1)}
    (args.out / "reference_inputs.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
