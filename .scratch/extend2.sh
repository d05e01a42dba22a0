cd /work/wt-kv
PYTHONPATH=$PWD/src /work/main/.venv/bin/python - <<'PY'
import sys, torch
sys.argv = ["kv.py", "--out", ".scratch/kv.json"]
sys.path.insert(0, "benchmarks")
import kv
args = kv.options(); args.budgets = [0, 0.15, 0.3, 0.5]
torch.set_num_threads(1)
import layerlab
model, tokenizer = layerlab.load("smollm2-135m")
print(kv.search(model, tokenizer, args, "loss", True, extended=True))
PY
