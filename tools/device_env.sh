# Source on the GPU machine: installs the wheels carried in .whl/ (packages its image lacks) into /tmp/site.
# Usage (from the repo root): source tools/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
