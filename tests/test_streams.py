"""The residual-stream recorder against hand-computed states; its reductions against explicit computations."""

import pytest
import torch
from reference import manual_states
from tiny import tiny_model

from layerlab import Plan, apply_plan
from layerlab.streams import Gram, Recorder, TokenStore, place, record, stream_pass


def ids(seed=0, length=24):
    return torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, text", [("llama", "0-2,2,4,5; attn-skip:1; mlp-skip:4"), ("gemma3", "all")])
def test_places_equal_the_hand_computed_stream(arch, text):
    model = tiny_model(arch)
    model.config._attn_implementation = "eager"
    plan = Plan.parse(text, 6)
    recorder = record(model, ids(), plan)  # every place of every step
    states, _ = manual_states(model, ids(), plan)
    gemma = arch == "gemma3"
    for i, (step, (h_in, h_mid, h_out)) in enumerate(zip(plan.steps, states, strict=True)):
        for kind, expected in (("resid_pre", h_in), ("resid_mid", h_mid), ("resid_post", h_out)):
            torch.testing.assert_close(recorder[place(kind, i)], expected, rtol=1e-5, atol=1e-5)
        if step.mlp:
            layer = model.model.layers[step.layer]
            normed = (layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm)(h_mid)
            with torch.no_grad():
                torch.testing.assert_close(recorder[place("mlp_out", i)], layer.mlp(normed), rtol=1e-5, atol=1e-5)


def test_a_recorder_keeps_only_the_places_asked_for_and_only_the_latest_pass():
    model = tiny_model("llama")
    wanted = [place("resid_pre", 3), place("mlp_out", 1)]
    seen = []
    with apply_plan(model, Plan.identity(6)), Recorder(model, wanted) as recorder, torch.no_grad():
        for seed in (1, 2):
            model(ids(seed), use_cache=False)
            seen.append(recorder[wanted[0]].clone())
            assert set(recorder.values) == {"resid_pre.3", "mlp_out.1"}
    assert not torch.equal(seen[0], seen[1])
    with pytest.raises(ValueError, match="runs 6 steps"):
        Recorder(model, [place("resid_pre", 6)])
    with pytest.raises(ValueError, match="KIND.STEP"):
        Recorder(model, ["hook_resid_pre"])


def test_gram_sums_equal_explicit_products_over_all_windows():
    model = tiny_model("qwen2")
    windows = [ids(seed, 20) for seed in range(3)]
    gram, xs, ys = Gram(32), [], []

    def reduce(recorder):
        x, y = recorder["mlp_out.2"][0], recorder["resid_pre.4"][0] - recorder["resid_mid.2"][0]
        gram.add(x, y)
        xs.append(x.double())
        ys.append(y.double())

    stream_pass(model, windows, None, ["mlp_out.2", "resid_mid.2", "resid_pre.4"], reduce)
    x, y = torch.cat(xs), torch.cat(ys)
    assert gram.count == 60
    torch.testing.assert_close(gram.xtx, x.T @ x)
    torch.testing.assert_close(gram.xty, x.T @ y)
    m = torch.randn(32, 32, dtype=torch.float64)
    torch.testing.assert_close(gram.squared_error(m), ((x @ m - y) ** 2).sum())


def test_token_store_gives_back_every_row_and_random_batches_of_rows(tmp_path):
    rows = [torch.randn(7, 5) for _ in range(3)]
    with TokenStore(tmp_path) as store:
        for r in rows:
            store.add(x=r, y=2 * r[:, :2])
        assert store.rows == 21
        everything = torch.cat(rows)
        chunks = list(store.chunks(8))
        assert [len(c["x"]) for c in chunks] == [8, 8, 5]
        torch.testing.assert_close(torch.cat([c["x"] for c in chunks]), everything)
        batches = list(store.batches(4, 3, torch.Generator().manual_seed(0)))
        again = list(store.batches(4, 3, torch.Generator().manual_seed(0)))
        assert len(batches) == 3
        for batch, same in zip(batches, again, strict=True):
            assert torch.equal(batch["x"], same["x"])
            torch.testing.assert_close(batch["y"], 2 * batch["x"][:, :2])
            assert all(any(torch.equal(row, known) for known in everything) for row in batch["x"])
        with pytest.raises(ValueError, match="same columns, each with the same number of rows"):
            store.add(x=torch.ones(2, 5), y=torch.ones(3, 2))
        folder = next(tmp_path.iterdir())
    assert not folder.exists()  # the files go with the store
