"""Per-class means of a few features of the cleaned wine data (the `profile` step of
wine-profile.toml); the row count goes to the metrics."""
import json
import os

import pandas as pd

df = pd.read_csv("/in/data/data.csv")
cols = ["alcohol", "flavanoids", "color_intensity", "proline"]
profile = df.groupby("class")[cols].mean().round(3)
os.makedirs("/out/profile", exist_ok=True)
profile.to_csv("/out/profile/profile.csv")
with open(os.environ["MILLRACE_METRICS"], "a") as m:
    m.write(json.dumps({"name": "rows", "value": len(df)}) + "\n")
print(f"profiled {len(df)} rows in {profile.shape[0]} classes")
