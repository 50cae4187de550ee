"""Split the wine data into a training and a test set (stratified, seeded)."""
import os

import pandas as pd
from sklearn.model_selection import train_test_split

test_size = float(os.environ["MILLRACE_PARAM_TEST_SIZE"])
df = pd.read_csv("/in/raw/wine.csv").dropna()
train, test = train_test_split(df, test_size=test_size, random_state=7, stratify=df["class"])
os.makedirs("/out/split", exist_ok=True)
train.to_csv("/out/split/train.csv", index=False)
test.to_csv("/out/split/test.csv", index=False)
print(f"{len(train)} training rows, {len(test)} test rows")
