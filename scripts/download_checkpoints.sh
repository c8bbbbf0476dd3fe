#!/usr/bin/env bash
# Download official SAM2 / SAM2.1 / MedSAM2 checkpoints. This is the ONE place
# where their URLs live; everything else refers to checkpoints by name.
#
# Usage:
#   scripts/download_checkpoints.sh [DEST_DIR] [NAME...]   download (default: bundle/models sam2.1_hiera_tiny)
#   scripts/download_checkpoints.sh --list                 print name, preset, image size, URL (tab-separated)
#   scripts/download_checkpoints.sh --help
#
# The preset column is the model_core preset (build_icl_sam2(preset=...)) whose
# architecture the checkpoint loads into; the image size column is the input size
# the weights were trained at (they load strictly at any multiple of 32).
# Files already present are skipped; downloads go to a temporary file in DEST_DIR
# and are renamed into place only when complete.
set -euo pipefail

readonly META_SAM2="https://dl.fbaipublicfiles.com/segment_anything_2/072824"
readonly META_SAM21="https://dl.fbaipublicfiles.com/segment_anything_2/092824"

# name <TAB> preset <TAB> image size <TAB> url
readonly CATALOG="\
sam2_hiera_tiny	sam2_hiera_tiny	1024	${META_SAM2}/sam2_hiera_tiny.pt
sam2_hiera_small	sam2_hiera_small	1024	${META_SAM2}/sam2_hiera_small.pt
sam2_hiera_base_plus	sam2_hiera_base_plus	1024	${META_SAM2}/sam2_hiera_base_plus.pt
sam2_hiera_large	sam2_hiera_large	1024	${META_SAM2}/sam2_hiera_large.pt
sam2.1_hiera_tiny	sam2.1_hiera_tiny	1024	${META_SAM21}/sam2.1_hiera_tiny.pt
sam2.1_hiera_small	sam2.1_hiera_small	1024	${META_SAM21}/sam2.1_hiera_small.pt
sam2.1_hiera_base_plus	sam2.1_hiera_base_plus	1024	${META_SAM21}/sam2.1_hiera_base_plus.pt
sam2.1_hiera_large	sam2.1_hiera_large	1024	${META_SAM21}/sam2.1_hiera_large.pt
MedSAM2_latest	sam2.1_hiera_tiny	512	https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt
MedSAM2_pretrain	sam2_hiera_tiny	1024	https://huggingface.co/jiayuanz3/MedSAM2_pretrain/resolve/main/MedSAM2_pretrain.pth"

readonly DEFAULT_DEST="bundle/models"
readonly DEFAULT_NAMES=(sam2.1_hiera_tiny)

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}

valid_names() {
  cut -f1 <<<"$CATALOG" | paste -sd' ' -
}

# lookup NAME FIELD -> prints the field (2 preset, 3 size, 4 url); fails for unknown names
lookup() {
  awk -F'\t' -v n="$1" -v f="$2" '$1 == n { print $f; found = 1 } END { exit !found }' <<<"$CATALOG"
}

TMP_FILE=""
cleanup() {
  if [[ -n "$TMP_FILE" ]]; then rm -f "$TMP_FILE"; fi
}
# never leave a half-written file behind: not on failure, not on Ctrl-C
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

download() {  # download URL DEST_FILE (set -e does not apply here when called from `if`: check each step)
  local url=$1 dest=$2
  TMP_FILE=$(mktemp "${dest}.part.XXXXXX") || return 1
  local ok=0
  if command -v curl >/dev/null 2>&1; then
    curl -fL --retry 3 --connect-timeout 30 -o "$TMP_FILE" "$url" || ok=1
  elif command -v wget >/dev/null 2>&1; then
    wget -O "$TMP_FILE" "$url" || ok=1
  else
    echo "error: neither curl nor wget is installed." >&2
    ok=1
  fi
  if ((ok == 0)) && [[ ! -s "$TMP_FILE" ]]; then
    echo "error: empty download from $url" >&2
    ok=1
  fi
  if ((ok == 0)); then
    chmod 644 "$TMP_FILE" && mv -f "$TMP_FILE" "$dest" || ok=1
  fi
  cleanup
  TMP_FILE=""
  return "$ok"
}

main() {
  case "${1:-}" in
    --list)
      printf '%s\n' "$CATALOG"
      return 0
      ;;
    -h | --help)
      usage
      return 0
      ;;
    -*)
      echo "error: unknown option '$1'." >&2
      usage >&2
      return 2
      ;;
  esac

  local dest=${1:-$DEFAULT_DEST}
  (($# > 0)) && shift
  local names=("$@")
  ((${#names[@]} > 0)) || names=("${DEFAULT_NAMES[@]}")

  # validate every name before downloading anything
  local name bad=()
  for name in "${names[@]}"; do
    lookup "$name" 1 >/dev/null || bad+=("$name")
  done
  if ((${#bad[@]} > 0)); then
    echo "error: unknown checkpoint name(s): ${bad[*]}" >&2
    echo "valid names: $(valid_names)" >&2
    if [[ -e "$dest" && ! -d "$dest" ]] || lookup "$dest" 1 >/dev/null; then
      echo "(the first argument is DEST_DIR; usage: $0 [DEST_DIR] [NAME...])" >&2
    fi
    return 2
  fi

  mkdir -p "$dest"
  local url file failed=0
  for name in "${names[@]}"; do
    url=$(lookup "$name" 4)
    file="$dest/${url##*/}"
    if [[ -s "$file" ]]; then
      echo "skip $name: $file exists"
      continue
    fi
    echo "download $name -> $file"
    if ! download "$url" "$file"; then
      echo "error: failed to download $name from $url" >&2
      failed=1
    fi
  done
  return "$failed"
}

main "$@"
