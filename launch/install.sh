#!/usr/bin/env bash
# Installs diffjax into ./.venv on a fresh machine, with the Fashion-MNIST files of the
# embedded default (Debian's dataset-fashion-mnist). Usage, from the repository root:
#   bash launch/install.sh          # runtime only
#   bash launch/install.sh --test   # plus the test extra
#   bash launch/install.sh --reference  # plus PyTorch references for the Inception tests
#   bash launch/install.sh --bench  # plus torch + diffusers for benchmarks/vs_pytorch.py
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --reference) extras+=(reference) ;;
    --bench) extras+=(bench) ;;
    *) echo "install.sh: unknown option $arg (valid: --test, --reference, --bench)" >&2; exit 2 ;;
  esac
done
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi

fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  if command -v apt-get >/dev/null 2>&1; then
    echo "+ apt-get install dataset-fashion-mnist"
    $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
      $sudo apt-get update -qq >/dev/null
      $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
    }
  else
    echo "install.sh: no apt-get here; get Fashion-MNIST's IDX files into /usr/share/datasets/fashion-mnist" \
         "or pass --config.data.path=DIR to diffjax.main" >&2
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "+ $python -m venv .venv"
  "$python" -m venv .venv
fi
echo "+ pip install -e $spec"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e "$spec"
echo "diffjax installed in .venv ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
