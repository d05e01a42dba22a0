import torch
import layerlab
from layerlab.corpora import read_text
from layerlab.kv_search import KVSearchSettings, search_kv
torch.set_num_threads(1)
model, tokenizer = layerlab.load("smollm2-135m")
settings = KVSearchSettings(budget=0.5, tolerance=0.5, order="loss", ctx=256, windows=2)
search_kv(model, tokenizer, read_text("wikitext2-valid"), settings, state_path=".scratch/kv.json.search-loss-extended.json", resume=True)
