"""Similarity-based document order: In-Context Pretraining (Shi et al. 2023, arXiv 2310.10638).

Documents are ordered so that neighbours in the order are similar, then concatenated and cut
into training sequences: a sequence holds related documents, which is what Lory's segment
routing needs (Zhong et al. 2024, Sec. 3.2: routing segment k on segment k-1 only helps when
the segments are about the same thing).

  1. embed     a cheap local embedding, no model: hashed character n-grams (3, 4, 5 bytes)
               weighted by TF-IDF, projected to `dim` dimensions by a fixed random +-1 matrix
               (a Johnson-Lindenstrauss projection of the sparse TF-IDF vector), L2-normalised.
  2. neighbours  the k most cosine-similar documents: exact (blockwise matrix products) for
               small corpora, random-hyperplane LSH (Charikar 2002) for large ones: documents
               that share a hash code in any of several tables are compared exactly.
  3. chain     ICP's greedy traversal: start at a random document, always step to the most
               similar unvisited neighbour; when none is left, jump to a random unvisited one.

`similarity_order(docs, ...)` does all three and returns a permutation of the documents.

Several hosts (`hosts`, jaxlm.data.hosts) split the work: each embeds a contiguous share of the
documents (document frequencies are summed across hosts first) and finds the neighbours of
its share; the neighbour lists are gathered, process 0 chains them and sends the order to
every host, and only process 0 reads and writes the cache. No host reads every document.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxlm.data.hosts import Hosts, Local, share

NGRAMS = (3, 4, 5)
_BITS = 17
N_BUCKETS = 1 << _BITS  # hashed n-gram features
DIM = 128  # embedding size after the random projection
MAX_BYTES = 4096  # bytes of each document read by the embedding
EXACT_LIMIT = 20_000  # "auto" search: exact up to this many documents, LSH above
KEY_SAMPLES = 64  # documents whose first bytes enter the cache key (with the source's fingerprint)
METHODS = ("exact", "lsh", "auto")

_MIX = np.uint64(0x9E3779B97F4A7C15)
_BASE = np.uint64(1099511628211)


def _ngram_buckets(data: np.ndarray) -> np.ndarray:
  """Bucket ids of every byte n-gram of a document (uint8 array)."""
  x = data.astype(np.uint64)
  out = []
  with np.errstate(over="ignore"):
    for n in NGRAMS:
      if len(x) < n:
        continue
      h = np.zeros(len(x) - n + 1, np.uint64)
      for j in range(n):
        h = h * _BASE + x[j : len(x) - n + 1 + j]
      h = (h + np.uint64(n)) * _MIX
      h ^= h >> np.uint64(29)
      out.append((h >> np.uint64(64 - _BITS)).astype(np.int64))
  return np.concatenate(out) if out else np.zeros(0, np.int64)


@functools.lru_cache(maxsize=2)
def _projection(seed: int) -> np.ndarray:
  """The fixed random +-1 projection [N_BUCKETS, DIM] (16 MiB; made once per seed, read-only)."""
  rng = np.random.default_rng(seed)
  proj = rng.choice(np.array([-1, 1], np.int8), size=(N_BUCKETS, DIM))
  proj.flags.writeable = False
  return proj


def _head(doc: str | bytes) -> bytes:
  """The bytes of a document the embedding reads: its first MAX_BYTES bytes of UTF-8."""
  return (doc if isinstance(doc, bytes) else doc.encode("utf-8", errors="replace"))[:MAX_BYTES]


def embed(docs: Sequence[str | bytes], *, seed: int = 0, hosts: Hosts | None = None) -> np.ndarray:
  """[N, DIM] float32 unit vectors: TF-IDF of hashed byte n-grams, randomly projected.

  A document is a string or its UTF-8 bytes (only the first MAX_BYTES bytes are read). With
  several `hosts`, each reads only its share of the documents; every host gets all N vectors.
  """
  hosts = hosts or Local()
  n = len(docs)
  lo, hi = share(n, hosts.index, hosts.count)
  counts = []
  df = np.zeros(N_BUCKETS, np.int64)
  for i in range(lo, hi):  # (random-access sources need not support iteration)
    data = np.frombuffer(_head(docs[i]), np.uint8)
    buckets, c = np.unique(_ngram_buckets(data), return_counts=True)
    counts.append((buckets, c))
    df[buckets] += 1
  if hosts.count > 1:
    df = np.sum(hosts.allgather(df[None]), axis=0)[0]
  idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
  proj = _projection(seed)
  out = np.zeros((hi - lo, DIM), np.float32)
  for i, (buckets, c) in enumerate(counts):
    if len(buckets) == 0:
      continue
    w = (1.0 + np.log(c)) * idf[buckets]
    w /= np.linalg.norm(w)
    out[i] = w.astype(np.float32) @ proj[buckets].astype(np.float32)
  out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
  return np.concatenate(hosts.allgather(out)) if hosts.count > 1 else out


def _merge_topk(best_idx, best_sim, rows, cand_idx, cand_sim, k):
  """Fold candidate neighbours [R, C] into the running top-k of `rows` (duplicates ignored)."""
  dup = (cand_idx[:, :, None] == best_idx[rows][:, None, :]).any(-1)
  cand_sim = np.where(dup, -np.inf, cand_sim)
  idx = np.concatenate([best_idx[rows], cand_idx], axis=1)
  sim = np.concatenate([best_sim[rows], cand_sim], axis=1)
  top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  best_idx[rows] = np.take_along_axis(idx, top, axis=1)
  best_sim[rows] = np.take_along_axis(sim, top, axis=1)


def exact_neighbors(emb: np.ndarray, k: int, *, block: int = 1024, rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The k most similar other documents of every document in `rows` ([lo, hi), default all):
  (indices [hi - lo, k], similarities)."""
  n = len(emb)
  k = min(k, n - 1)
  lo, hi = rows or (0, n)
  idx = np.zeros((hi - lo, k), np.int64)
  sim = np.zeros((hi - lo, k), np.float32)
  for start in range(lo, hi, block):
    r = np.arange(start, min(start + block, hi))
    s = emb[r] @ emb.T
    s[r - start, r] = -np.inf
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]  # k <= n - 1: never the whole row
    ps = np.take_along_axis(s, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    idx[r - lo] = np.take_along_axis(part, order, axis=1)
    sim[r - lo] = np.take_along_axis(ps, order, axis=1)
  return idx, sim


def lsh_neighbors(emb: np.ndarray, k: int, *, n_tables: int = 8, n_bits: int = 0, max_bucket: int = 1024, seed: int = 0, rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Approximate k nearest neighbours by random-hyperplane LSH (cosine similarity), for the
  documents in `rows` ([lo, hi), default all): (indices [hi - lo, k], similarities).

  Each of `n_tables` tables hashes a document to the signs of `n_bits` random projections
  (default: about 32 documents per bucket); documents sharing a bucket are compared exactly
  (buckets larger than `max_bucket` are split at random). Slots never filled keep index -1.
  """
  n, d = emb.shape
  k = min(k, n - 1)
  lo, hi = rows or (0, n)
  n_bits = n_bits or int(np.clip(np.round(np.log2(max(n, 2) / 32)), 1, 24))
  rng = np.random.default_rng(seed)
  best_idx = np.full((hi - lo, k), -1, np.int64)
  best_sim = np.full((hi - lo, k), -np.inf, np.float32)
  weights = (1 << np.arange(n_bits, dtype=np.int64))
  for _ in range(n_tables):
    planes = rng.standard_normal((d, n_bits)).astype(np.float32)
    codes = ((emb @ planes) > 0).astype(np.int64) @ weights
    perm = rng.permutation(n)
    order = perm[np.argsort(codes[perm], kind="stable")]
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for members in np.split(order, bounds):
      for start in range(0, len(members), max_bucket):
        m = members[start : start + max_bucket]
        mine = m[(m >= lo) & (m < hi)]
        if len(m) < 2 or len(mine) == 0:
          continue
        s = emb[mine] @ emb[m].T
        s[mine[:, None] == m[None, :]] = -np.inf
        _merge_topk(best_idx, best_sim, mine - lo, np.broadcast_to(m, (len(mine), len(m))), s, k)
  best_idx[~np.isfinite(best_sim)] = -1
  return best_idx, best_sim


def nearest_neighbors(emb: np.ndarray, k: int, *, method: str = "auto", seed: int = 0, rows: tuple[int, int] | None = None) -> np.ndarray:
  """[hi - lo, k] neighbour indices of the documents in `rows` (default all; most similar
  first; -1: none found)."""
  if method not in METHODS:
    raise ValueError(f"nearest_neighbors: method must be one of {METHODS}, got {method!r}")
  lo, hi = rows or (0, len(emb))
  if len(emb) < 2:
    return np.full((hi - lo, 0), -1, np.int64)
  if method == "exact" or (method == "auto" and len(emb) <= EXACT_LIMIT):
    return exact_neighbors(emb, k, rows=rows)[0]
  return lsh_neighbors(emb, k, seed=seed, rows=rows)[0]


def greedy_chain(neighbors: np.ndarray, *, seed: int = 0) -> np.ndarray:
  """A permutation visiting each document once, stepping to the nearest unvisited neighbour."""
  n = len(neighbors)
  if n == 0:
    return np.zeros(0, np.int64)
  visited = np.zeros(n, bool)
  restarts = np.random.default_rng(seed).permutation(n)
  next_restart = 0
  order = np.empty(n, np.int64)
  cur = int(restarts[0])
  for i in range(n):
    order[i] = cur
    visited[cur] = True
    if i == n - 1:
      break
    nxt = -1
    for j in neighbors[cur]:
      if j >= 0 and not visited[j]:
        nxt = int(j)
        break
    if nxt < 0:
      while visited[restarts[next_restart]]:
        next_restart += 1
      nxt = int(restarts[next_restart])
    cur = nxt
  return order


def cache_key(docs: Sequence[str], *, k: int, method: str, seed: int, fingerprint: str = "") -> str:
  """The settings, the number of documents, the source's `fingerprint` (e.g. its files' names,
  sizes and times) and the first bytes of KEY_SAMPLES documents spread over the source: a
  changed corpus gets a new key without every document being read."""
  n = len(docs)
  h = hashlib.sha256(f"{k}/{method}/{seed}/{n}/{fingerprint}".encode())
  for i in np.unique(np.linspace(0, n - 1, min(n, KEY_SAMPLES)).astype(np.int64)) if n else ():
    h.update(_head(docs[int(i)]))
  return h.hexdigest()[:24]


def similarity_order(
    docs: Sequence[str],
    *,
    k: int = 8,
    method: str = "auto",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    fingerprint: str = "",
    hosts: Hosts | None = None,
) -> np.ndarray:
  """Embed, find neighbours, chain: a permutation of range(len(docs)), the same on every host.

  With `cache_dir`, process 0 stores the order under `cache_key`, so a corpus is ordered once;
  the other hosts get it from process 0, whether it was cached or computed.
  """
  hosts = hosts or Local()
  n = len(docs)
  path = Path(cache_dir) / "similarity" / f"{cache_key(docs, k=k, method=method, seed=seed, fingerprint=fingerprint)}.npy" if cache_dir is not None and hosts.index == 0 else None
  cached = np.load(path) if path is not None and path.is_file() else None
  if hosts.count > 1 and hosts.broadcast(np.array([cached is not None]))[0]:
    return hosts.broadcast(cached if cached is not None else np.zeros(n, np.int64))
  if cached is not None:
    return cached
  emb = embed(docs, seed=seed, hosts=hosts)
  rows = share(n, hosts.index, hosts.count)
  neighbors = nearest_neighbors(emb, k, method=method, seed=seed, rows=rows)
  if hosts.count > 1:
    neighbors = np.concatenate(hosts.allgather(neighbors))
  order = greedy_chain(neighbors, seed=seed) if hosts.index == 0 else np.zeros(n, np.int64)
  if hosts.count > 1:
    order = hosts.broadcast(order)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{np.random.default_rng().integers(1 << 30)}.tmp.npy")
    np.save(tmp, order)
    tmp.replace(path)
  return order
