"""Several hosts share the similarity order: simulated processes (threads exchanging arrays)
each read only their share, get the single-process order, and only process 0 touches the
cache; its key reads a sample of the documents, not all. One slow test runs the real thing:
two jax.distributed processes with gloo collectives."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data import hosts, pipeline, similarity
from jaxlm.data.tokenizers import ByteTokenizer

from .test_similarity import corpus


class ThreadHosts:
  """`count` processes simulated by threads: allgather/broadcast through shared slots."""

  def __init__(self, index: int, count: int, shared: dict):
    self.index, self.count, self.shared = index, count, shared

  @staticmethod
  def group(count: int) -> list["ThreadHosts"]:
    shared = {"barrier": threading.Barrier(count), "slots": [None] * count}
    return [ThreadHosts(i, count, shared) for i in range(count)]

  def _exchange(self, x, send: bool) -> list:
    if send:
      self.shared["slots"][self.index] = np.array(x, copy=True)
    self.shared["barrier"].wait()
    out = list(self.shared["slots"])
    self.shared["barrier"].wait()  # all have read before anyone writes again
    return out

  def allgather(self, x):
    return self._exchange(x, True)

  def broadcast(self, x):
    return self._exchange(x, self.index == 0)[0].copy()


class Reads(list):
  """A document list that records which documents were read."""

  def __init__(self, docs):
    super().__init__(docs)
    self.read: set[int] = set()

  def __getitem__(self, i):
    self.read.add(int(i))
    return super().__getitem__(i)


def run_hosts(count, fn):
  """fn(hosts) on `count` simulated processes; their results in process order."""
  group, results, errors = ThreadHosts.group(count), [None] * count, []

  def run(h):
    try:
      results[h.index] = fn(h)
    except Exception as e:  # surface a thread's failure in the test
      errors.append(e)
      h.shared["barrier"].abort()

  threads = [threading.Thread(target=run, args=(h,)) for h in group]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  if errors:
    raise errors[0]
  return results


@pytest.mark.parametrize("method", ["exact", "lsh"])
def test_hosts_split_the_order_and_each_reads_only_its_share(tmp_path, method):
  docs, _ = corpus(200)
  single = similarity.similarity_order(docs, k=8, method=method, seed=0)
  views = [Reads(docs) for _ in range(3)]
  orders = run_hosts(3, lambda h: similarity.similarity_order(views[h.index], k=8, method=method, seed=0, cache_dir=tmp_path, hosts=h))
  for order in orders:
    np.testing.assert_array_equal(order, single)
  for i, v in enumerate(views):
    lo, hi = hosts.share(200, i, 3)
    key_sample = set(np.linspace(0, 199, similarity.KEY_SAMPLES).astype(int)) if i == 0 else set()
    assert v.read == set(range(lo, hi)) | key_sample  # its share (and process 0 the cache key's sample)
  assert len(list((tmp_path / "similarity").glob("*.npy"))) == 1  # written once, by process 0

  views = [Reads(docs) for _ in range(3)]
  cached = run_hosts(3, lambda h: similarity.similarity_order(views[h.index], k=8, method=method, seed=0, cache_dir=tmp_path, hosts=h))
  for order in cached:
    np.testing.assert_array_equal(order, single)
  assert len(views[0].read) <= similarity.KEY_SAMPLES and not views[1].read and not views[2].read  # a hit reads only the key's sample


def test_cache_key_reads_a_sample_and_follows_the_fingerprint():
  docs, _ = corpus(500)
  view = Reads(docs)
  key = similarity.cache_key(view, k=8, method="exact", seed=0, fingerprint="files v1")
  assert len(view.read) == similarity.KEY_SAMPLES
  assert key != similarity.cache_key(docs, k=8, method="exact", seed=0, fingerprint="files v2")
  assert key != similarity.cache_key(docs[:-1] + ["changed"], k=8, method="exact", seed=0, fingerprint="files v1")  # the last is sampled
  assert key == similarity.cache_key(docs, k=8, method="exact", seed=0, fingerprint="files v1")


def test_pipeline_hosts_share_the_order_and_train_on_disjoint_chain_shares(tmp_path):
  docs, _ = corpus(200)
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

  def rows(h):
    ds = pipeline.lm_dataset({f"jsonl:{path}": 1.0}, "train", ByteTokenizer(), seq_len=256, batch_size=2, seed=0, similarity="exact", cache_dir=str(tmp_path), process_index=h.index, process_count=h.count, hosts=h)
    return {tuple(r[:64]) for b in pipeline.take(ds, 3) for r in b["inputs"]}

  a, b = run_hosts(2, rows)
  assert a and b and not a & b


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


WORKER = """
import json, sys
import numpy as np
from jaxlm import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jaxlm.data import hosts, similarity
sys.path.insert(0, sys.argv[4])
from test_similarity import corpus
h = hosts.current()
docs, _ = corpus(120)
order = similarity.similarity_order(docs, k=8, method="exact", seed=0, cache_dir=sys.argv[3] + f"/cache{h.index}", hosts=h)
ragged = h.allgather(np.arange(h.index + 2, dtype=np.int64))
print(json.dumps({"order": order.tolist(), "ragged": [r.tolist() for r in ragged], "index": h.index, "count": h.count}))
"""


@pytest.mark.slow
@pytest.mark.multihost
def test_two_jax_processes_share_the_order(tmp_path):
  """~10 s: two jax.distributed CPU processes (gloo) compute one order, equal to one process's."""
  port, env = _free_port(), {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  here = str(Path(__file__).parent)
  procs = [
      subprocess.Popen([sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(i), str(tmp_path), here], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  docs, _ = corpus(120)
  single = similarity.similarity_order(docs, k=8, method="exact", seed=0)
  for o in outs:
    assert o["count"] == 2 and o["order"] == single.tolist()
    assert o["ragged"] == [[0, 1], [0, 1, 2]]
  assert (tmp_path / "cache0" / "similarity").is_dir() and not (tmp_path / "cache1").exists()  # process 0 alone caches
