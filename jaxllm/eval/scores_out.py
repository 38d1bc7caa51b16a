"""A corpus ranked by a reference model's loss: `python -m jaxllm.eval --scores_out=DIR` writes
every document with its mean NLL as "difficulty" the way `python -m jaxllm.data prepare` writes
(sharded JSONL, `report.json` last), for `--config.data.order=difficulty`."""

from __future__ import annotations

import json

def write_scores(out: str, docs, texts, doc_nll, doc_tokens, report: dict, *,
                 progress: bool = True) -> None:
  """Writes each document (`corpus.DocRef`, its text) with its mean NLL as "difficulty" (0 for
  one too short to score) to OUT, made ready by `prepare.open_output`; `report` goes into
  OUT/report.json with the difficulty quantiles."""
  import numpy as np

  from jaxllm.data import prepare
  difficulty = doc_nll / np.maximum(doc_tokens, 1)

  def records():
    for doc, text, d in zip(docs, texts, difficulty):
      fields = {"source": doc.path}
      if doc.jsonl_offset >= 0:
        with open(doc.path, "rb") as f:
          f.seek(doc.jsonl_offset)
          record = json.loads(f.readline())
        fields = record if isinstance(record, dict) else {}
      yield {**fields, "text": text, "difficulty": round(float(d), 5)}

  prepare.write_shards(out, records(), len(docs), 10_000, progress)
  quantiles = np.quantile(difficulty, [0.0, 0.1, 0.5, 0.9, 1.0]).round(4).tolist()
  prepare.finish_output(out, {**report, "docs": len(docs),
                              "difficulty_quantiles_0_10_50_90_100": quantiles})
