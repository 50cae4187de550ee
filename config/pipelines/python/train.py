"""Fit a scaled logistic regression; C comes from the pipeline's params."""
import json
import os
import pickle

import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common import FEATURES, TARGET

c = float(os.environ["MILLRACE_PARAM_C"])
train = pd.read_csv("/in/split/train.csv")
model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
model.fit(train[FEATURES], train[TARGET])
os.makedirs("/out/model", exist_ok=True)
with open("/out/model/model.pkl", "wb") as f:
    pickle.dump(model, f)
with open("/out/model/model.json", "w") as f:
    json.dump({"kind": "logistic-regression", "C": c, "features": FEATURES}, f, indent=2)
with open(os.environ["MILLRACE_METRICS"], "a") as m:
    m.write(json.dumps({"name": "train_accuracy", "value": model.score(train[FEATURES], train[TARGET])}) + "\n")
print(f"trained with C={c} on {len(train)} rows")
