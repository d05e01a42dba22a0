import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm2():
    import layerlab

    return layerlab.load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    import layerlab

    return layerlab.load("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from layerlab.models import EMBEDDED, convert_gguf

    return AutoTokenizer.from_pretrained(str(convert_gguf(EMBEDDED["smollm2-135m"].locate())))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smollm2_tokenizer):
    """A random 6-layer Llama with SmolLM2's tokenizer, saved as a model folder (for command-line tests)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("tiny")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU every op waits at the thread barrier."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A short text file (the start of WikiText-2 test) to calibrate or train on."""
    from test_evaluate import TEXT

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return str(path)
