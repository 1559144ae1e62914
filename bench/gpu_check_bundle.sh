#!/usr/bin/env bash
# Gather what bench/gpu_check.py needs on a GPU machine that has torch, numpy,
# scikit-learn and nvidia-ml-py but neither network nor Trainyard's other dependencies:
# their wheels (CPython 3.12, manylinux x86-64) and a redis-server, into .gpucheck/ at the
# repository root (ignored by git through .git/info/exclude). Run it where pip and apt
# reach their indexes; it prints the command to run on the GPU machine.
#
#   bench/gpu_check_bundle.sh            # PYTHON_VERSION=3.11 for another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON_VERSION:-3.12}
dest=.gpucheck
mkdir -p "$dest/whl" "$dest/deb"
grep -qxF '/.gpucheck/' .git/info/exclude 2>/dev/null || echo '/.gpucheck/' >>.git/info/exclude

# The web side's dependencies (pyproject.toml), which the worker imports too (shared/),
# with their own dependencies resolved for the GPU machine's platform. torch and the
# scientific stack are left out: the GPU machine has builds of its own.
mapfile -t reqs < <(python3 - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
skip = ("torch", "numpy", "scikit-learn")
for req in project["dependencies"] + project["optional-dependencies"]["worker"]:
    if not req.startswith(skip):
        print(req)
EOF
)
python3 -m pip download -q --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$dest/whl" "${reqs[@]}"

# redis-server: Debian's is redis-check-rdb in redis-tools (redis-server links to it).
o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64)
(cd "$dest/deb" && apt-get "${o[@]}" download redis-tools libjemalloc2 liblzf1 >/dev/null)

echo "gathered $(ls "$dest/whl" | wc -l) wheels and $(ls "$dest/deb" | wc -l) packages in $dest ($(du -sh "$dest" | cut -f1))"
cat <<'EOF'
On the GPU machine, from the repository root (with .gpucheck/ beside it):

  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpucheck/whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD \
    && for f in .gpucheck/deb/*.deb; do dpkg -x "$f" /tmp/redis; done \
    && ln -sf redis-check-rdb /tmp/redis/usr/bin/redis-server \
    && export LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu \
    && python3 bench/gpu_check.py --redis-server /tmp/redis/usr/bin/redis-server --out summary.json

(Redis picks its role from its program name: the link must be called redis-server.)
EOF
