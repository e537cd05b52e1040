"""The categorizer's TEST tier-1 accuracy with and without test rows that have a near-duplicate in the train split
(session 8): ShareGPT holds one conversation under several chat ids, so the split by chat does not keep duplicates
apart, and the kNN vote can read a duplicate's label. Reads the TEST split: a check of a shipped figure, not a choice.

    CHAT_AD_AUDIT_CACHE=... OMP_NUM_THREADS=1 .venv/bin/python bench/mapping_test_duplicates.py
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data" / "labels"))
sys.path.insert(0, str(ROOT))
import fit_categorizer as fc  # noqa: E402
import numpy as np  # noqa: E402

from analysis.mapping.accuracy import tier1_accuracy  # noqa: E402
from analysis.mapping.categorizer import ConversationCategorizer, conversation_features, default_model_path  # noqa: E402

df = fc.load_gold()
dte = df[df.split == "test"].reset_index(drop=True)
d = fc.load_documents(dte["conversation_id"].tolist())
f = conversation_features(d["document"].tolist(), "minilm", replies=d["first_reply"].tolist())
m = ConversationCategorizer.load(default_model_path())
p = m.predict_proba(f.X)
pt = p.columns.to_numpy()[p.to_numpy().argmax(1)]
ms = fc.scored(dte)
mx = (m._knn_part(f.X) @ m.knn_vectors.T).max(1)  # cosine to the nearest train row the kNN vote reads
yt = dte["tier1"].to_numpy()
for thr in (None, 0.99, 0.95, 0.90):
    keep = ms if thr is None else ms & (mx < thr)
    r = tier1_accuracy(np.where(pt[keep] == fc.NONE, None, pt[keep]), yt[keep], dte.loc[keep, "chat"])
    print(("all scored test rows" if thr is None else f"without the {int((ms & (mx >= thr)).sum())} rows with a train row at cosine >= {thr}")
          + f": n {r['n']}, accuracy {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
dups = ms & (mx >= 0.95)
print(f"the {int(dups.sum())} rows with a near-duplicate (>= 0.95): accuracy {float((pt[dups] == yt[dups]).mean()):.3f}")
