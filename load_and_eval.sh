#!/bin/sh
# Fetch a published DDPM checkpoint, verify its SHA-256, install it, and sample from it.
#
#   sh load_and_eval.sh                          # the repo's published copy (checkpoints/)
#   sh load_and_eval.sh URL                      # download it (or set DDPM_CHECKPOINT_URL)
#   sh load_and_eval.sh [URL] -- --n_samples 100 # arguments after -- go to evaluate.py
#   sh load_and_eval.sh -- --sampler dpm++2m-sde --sampling_steps 50 --n_samples 100
#                                                # the fast sampler: 50 network evaluations, not 1000
#   DDPM_CHECKPOINT=ddpm_cond.pt sh load_and_eval.sh -- --digits 3 --guidance_scale 1
#                                                # the class-conditional one instead
#   DDPM_CHECKPOINT=ddpm_paper.pt sh load_and_eval.sh -- --sampler ddim --eta 1
#                                                # the paper's model, trained on a GPU (docs/gpu.md)
#
# The file is fetched (curl, else wget) into a temporary file, checked against the repo's
# checkpoints/$DDPM_CHECKPOINT.sha256, and only then moved (one rename) to ./ddpm_trained_published.pt
# (the name with _published) in the current folder, beside your own ./ddpm_trained.pt from run.py,
# which it never touches. A failed download or a wrong hash leaves no checkpoint behind and exits
# non-zero. A different file already at the destination is never replaced: the script stops and says so.
# Environment: DDPM_CHECKPOINT (which published checkpoint: ddpm_trained.pt, the default,
# ddpm_cond.pt or ddpm_paper.pt); DDPM_CHECKPOINT_URL; DDPM_CHECKPOINT_DEST (default: the DDPM_CHECKPOINT
# name with _published before .pt);
# PYTHON (default python, else python3).
set -eu

die() { echo "load_and_eval.sh: error: $*" >&2; exit 1; }

REPO=$(cd "$(dirname "$0")" && pwd)
NAME=${DDPM_CHECKPOINT:-ddpm_trained.pt}
case "$NAME" in
    mnist_judge.pt) die "mnist_judge.pt is the metrics' judge, not a DDPM checkpoint; choose ddpm_trained.pt, ddpm_cond.pt or ddpm_paper.pt" ;;
    */*|"") die "DDPM_CHECKPOINT must be a file name in checkpoints/ (ddpm_trained.pt, ddpm_cond.pt or ddpm_paper.pt), got '$NAME'" ;;
esac
SUM_FILE=$REPO/checkpoints/$NAME.sha256
PUBLISHED=$REPO/checkpoints/$NAME
DEST=${DDPM_CHECKPOINT_DEST:-${NAME%.pt}_published.pt}

URL=${DDPM_CHECKPOINT_URL:-}
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    URL=${1:-$URL}  # an empty argument leaves DDPM_CHECKPOINT_URL in force
    shift
fi
[ $# -eq 0 ] || [ "$1" = "--" ] \
    || die "unexpected argument '$1'; usage: sh load_and_eval.sh [URL] [-- evaluate.py arguments]"
[ $# -eq 0 ] || shift

PY=${PYTHON:-$(command -v python || command -v python3 || true)}
[ -n "$PY" ] || die "no python or python3 on PATH; install Python 3 and 'pip install -r requirements.txt'"

if [ ! -f "$SUM_FILE" ]; then
    [ -n "${DDPM_CHECKPOINT:-}" ] && die "no published checkpoint '$NAME': $SUM_FILE is missing; choose one of: $(cd "$REPO/checkpoints" && ls ddpm_*.sha256 2>/dev/null | sed 's/\.sha256$//' | tr '\n' ' ')"
    die "$SUM_FILE is missing; it holds the published checksum (is this a complete clone?)"
fi
# the first word of the first line, if it is 64 hex digits (else empty)
EXPECTED=$(awk 'NR == 1 && length($1) == 64 && $1 !~ /[^0-9a-f]/ { print $1 }' "$SUM_FILE")
[ -n "$EXPECTED" ] || die "$SUM_FILE does not start with a SHA-256 hex digest"

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | awk '{ print $1 }'
    elif command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1" | awk '{ print $1 }'
    else "$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
    fi
}

if [ -e "$DEST" ] && [ "$(sha256_of "$DEST")" != "$EXPECTED" ]; then
    die "$DEST exists and is not the published checkpoint; move it away, or set DDPM_CHECKPOINT_DEST to another file name"
fi
DEST_DIR=$(dirname "$DEST")
TMP=$(mktemp "$DEST_DIR/.$NAME.XXXXXX") || die "cannot create a temporary file in $DEST_DIR"
trap 'rm -f "$TMP"' EXIT
trap 'rm -f "$TMP"; exit 130' INT
trap 'rm -f "$TMP"; exit 143' TERM

if [ -n "$URL" ]; then
    echo "downloading $URL"
    if command -v curl >/dev/null 2>&1; then
        # fail on HTTP errors; give up on a stalled transfer (under 1 kB/s for a minute)
        curl -fL --retry 2 --connect-timeout 20 --speed-limit 1024 --speed-time 60 -sS -o "$TMP" --url "$URL" \
            || die "download failed: $URL"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -T 60 -t 3 -O "$TMP" -- "$URL" || die "download failed: $URL"
    else
        die "neither curl nor wget is installed; install one, or run without a URL to use $PUBLISHED"
    fi
else
    [ -f "$PUBLISHED" ] || die "no URL given (argument or DDPM_CHECKPOINT_URL) and $PUBLISHED is missing"
    echo "using the published copy $PUBLISHED"
    cp "$PUBLISHED" "$TMP"
fi

ACTUAL=$(sha256_of "$TMP")
[ "$ACTUAL" = "$EXPECTED" ] || die "SHA-256 mismatch: got $ACTUAL, expected $EXPECTED ($SUM_FILE); nothing was installed"
echo "SHA-256 verified ($EXPECTED)"

chmod 644 "$TMP"
sync
mv -f "$TMP" "$DEST"
trap - EXIT INT TERM
echo "installed $DEST"

exec "$PY" "$REPO/evaluate.py" --checkpoint "$DEST" "$@"
