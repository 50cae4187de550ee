import time
t0 = time.perf_counter()
import json, os
import pandas as pd
t1 = time.perf_counter()
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
t2 = time.perf_counter()
df = pd.read_csv("/in/wine/wine.csv")
x, y = df.drop(columns=["class"]), df["class"]
xt, xv, yt, yv = train_test_split(x, y, test_size=0.3, random_state=7)
m = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(xt, yt)
acc = m.score(xv, yv)
t3 = time.perf_counter()
with open(os.environ["MILLRACE_METRICS"], "a") as f:
    for k, v in [("import_pandas_s", t1 - t0), ("import_sklearn_s", t2 - t1), ("work_s", t3 - t2), ("accuracy", acc)]:
        f.write(json.dumps({"name": k, "value": v}) + "\n")
