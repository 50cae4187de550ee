"""Accuracy, macro F1 and one-vs-rest ROC AUC on the held-out rows, as metrics."""
import json
import os
import pickle

import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from common import FEATURES, TARGET

with open("/in/model/model.pkl", "rb") as f:
    model = pickle.load(f)
test = pd.read_csv("/in/split/test.csv")
predicted = model.predict(test[FEATURES])
scores = {
    "accuracy": accuracy_score(test[TARGET], predicted),
    "f1_macro": f1_score(test[TARGET], predicted, average="macro"),
    "roc_auc_ovr": roc_auc_score(test[TARGET], model.predict_proba(test[FEATURES]), multi_class="ovr"),
}
with open(os.environ["MILLRACE_METRICS"], "a") as m:
    for name, value in scores.items():
        m.write(json.dumps({"name": name, "value": value}) + "\n")
os.makedirs("/out/report", exist_ok=True)
with open("/out/report/report.json", "w") as f:
    json.dump(scores, f, indent=2)
print(json.dumps(scores))
