"""Similarity-based batching: the embedding groups topics, LSH finds the exact neighbours, the
chain is a permutation that keeps topics together, and the pipeline option packs neighbours."""

import json

import numpy as np
import pytest

from jaxlm.data import pipeline, similarity
from jaxlm.data.tokenizers import ByteTokenizer

TOPICS = [
    "apple banana cherry grape melon fruit juice sweet orchard harvest".split(),
    "python function class return import module lambda yield decorator".split(),
    "ocean wave ship sail harbor sea tide anchor captain voyage".split(),
    "court judge law trial jury verdict appeal legal statute counsel".split(),
]


def corpus(n=240, seed=0):
  rng = np.random.default_rng(seed)
  docs, labels = [], []
  for i in range(n):
    t = int(rng.integers(len(TOPICS)))
    words = list(rng.choice(TOPICS[t], 50)) + list(rng.choice(sum(TOPICS, []), 10))
    docs.append(" ".join(words))
    labels.append(t)
  return docs, np.asarray(labels)


def test_exact_neighbours_share_the_topic_and_lsh_finds_them():
  docs, labels = corpus()
  emb = similarity.embed(docs)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
  exact = similarity.nearest_neighbors(emb, 8, method="exact")
  assert (labels[exact] == labels[:, None]).mean() > 0.95
  assert not (exact == np.arange(len(docs))[:, None]).any()  # never its own neighbour
  lsh = similarity.nearest_neighbors(emb, 8, method="lsh")
  recall = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(exact, lsh)])
  assert recall > 0.8


def test_chain_is_a_permutation_that_keeps_topics_together():
  docs, labels = corpus()
  order = similarity.similarity_order(docs, k=8, method="exact", seed=1)
  assert sorted(order.tolist()) == list(range(len(docs)))
  assert (labels[order[1:]] == labels[order[:-1]]).mean() > 0.7  # random order: ~0.25
  np.testing.assert_array_equal(order, similarity.similarity_order(docs, k=8, method="exact", seed=1))


def test_order_is_cached(tmp_path, monkeypatch):
  docs, _ = corpus(40)
  embed, calls = similarity.embed, []

  def embed_once(*args, **kwargs):  # a second embedding means the cache was not read
    assert not calls, "the cached order was recomputed"
    calls.append(1)
    return embed(*args, **kwargs)

  monkeypatch.setattr(similarity, "embed", embed_once)
  a = similarity.similarity_order(docs, cache_dir=tmp_path)
  assert calls == [1] and len(list((tmp_path / "similarity").glob("*.npy"))) == 1
  np.testing.assert_array_equal(similarity.similarity_order(docs, cache_dir=tmp_path), a)
  monkeypatch.setattr(similarity, "embed", embed)
  np.testing.assert_array_equal(a, similarity.similarity_order(docs))  # cached or not, the same order
  similarity.similarity_order(docs[:-1] + [docs[-1] + " x"], cache_dir=tmp_path)  # other contents: another key
  assert len(list((tmp_path / "similarity").glob("*.npy"))) == 2


@pytest.mark.parametrize("method", ["exact", "lsh"])
def test_pipeline_packs_similar_documents_per_source(tmp_path, method):
  docs, labels = corpus(300)
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d, "topic": int(t)}) + "\n" for d, t in zip(docs, labels)))
  tok = ByteTokenizer()
  kw = dict(seq_len=1024, batch_size=4, seed=0, cache_dir=str(tmp_path))
  ds = pipeline.lm_dataset({f"jsonl:{path}": 1.0}, "train", tok, similarity=method, **kw)
  batches = list(pipeline.take(ds, 3))
  vocab = {w: t for t, words in enumerate(TOPICS) for w in words}
  same, total = 0, 0
  for b in batches:
    for row in range(b["inputs"].shape[0]):
      topics = []
      for s in np.unique(b["segment_ids"][row]):
        words = tok.decode(b["inputs"][row][b["segment_ids"][row] == s]).split()
        topics.append(np.bincount([vocab[w] for w in words if w in vocab], minlength=4).argmax())
      same += sum(a == c for a, c in zip(topics, topics[1:]))
      total += len(topics) - 1
  assert total > 10 and same / total > 0.7  # documents packed side by side share their topic
  again = next(iter(pipeline.lm_dataset({f"jsonl:{path}": 1.0}, "train", tok, similarity=method, **kw)))
  np.testing.assert_array_equal(again["inputs"], batches[0]["inputs"])
