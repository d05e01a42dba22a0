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
