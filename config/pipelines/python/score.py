"""Score the CSVs at /in/inbox/ with the published model; one scored CSV each.

Run once per inbox file (the step's `foreach`), it sees that one file there."""
import os
import pickle

import pandas as pd

from common import FEATURES

with open("/in/model/model.pkl", "rb") as f:
    model = pickle.load(f)
os.makedirs("/out/scored", exist_ok=True)
for name in sorted(os.listdir("/in/inbox")):
    if not name.endswith(".csv"):
        continue
    batch = pd.read_csv(os.path.join("/in/inbox", name))
    batch["predicted"] = model.predict(batch[FEATURES])
    batch["confidence"] = model.predict_proba(batch[FEATURES]).max(axis=1).round(4)
    batch.to_csv(os.path.join("/out/scored", name), index=False)
    print(f"{name}: {len(batch)} rows scored")
