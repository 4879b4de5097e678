"""Model behaviour: accuracy, determinism, early stopping, warm start, architecture choice."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.model import MLP, ConvNet, ModelConfig, Predictor, build_model, choose_device
from pipeline.train import SplitData, TrainParams, train_model


def _data(settings) -> SplitData:
    return SplitData.load(settings.processed_dir)


def test_digits_reach_95_percent_within_the_demo_budget(full_digits, settings, params):
    """A floor on one split (seed 42: 0.964 here); the quality claim and its spread over
    seeds are bench/quality.py's."""
    data = _data(settings)
    tp = TrainParams.from_params(params)  # the demo's epoch budget from params.yaml
    result = train_model(data, tp, "cpu", show_progress=False)
    predictor = Predictor(result.model, result.cfg, data.preprocessor)
    accuracy = (
        predictor.model(torch.from_numpy(data.x["test"])).argmax(1).numpy() == data.y["test"]
    ).mean()
    assert accuracy >= 0.95, f"test accuracy {accuracy:.4f}"
    assert result.cfg.kind == "cnn" and result.cfg.image_side == 8
    assert len(result.history) <= tp.epochs


def test_cpu_training_is_deterministic(prepared, settings, params):
    tp = replace(TrainParams.from_params(params), epochs=3)
    a = train_model(_data(settings), tp, "cpu", show_progress=False)
    b = train_model(_data(settings), tp, "cpu", show_progress=False)
    for (name, wa), (_, wb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(wa, wb), name
    c = train_model(_data(settings), replace(tp, seed=tp.seed + 1), "cpu", show_progress=False)
    assert not torch.equal(
        a.model.state_dict()["head.0.weight"], c.model.state_dict()["head.0.weight"]
    )


def test_weights_do_not_depend_on_what_is_displayed_or_logged(prepared, settings, params):
    """Progress bars, a callback that draws random numbers, and the caller's own use of the
    global generator leave the trained weights bit for bit the same (and training leaves the
    caller's generator as it was)."""
    tp = replace(TrainParams.from_params(params), epochs=3)
    quiet = train_model(_data(settings), tp, "cpu", show_progress=False)
    torch.manual_seed(1234)
    caller_state = torch.random.get_rng_state()
    noisy = train_model(
        _data(settings),
        tp,
        "cpu",
        on_epoch=lambda epoch, metrics: torch.rand(1000),
        show_progress=True,
    )
    assert torch.equal(torch.random.get_rng_state(), caller_state)
    for (name, a), (_, b) in zip(
        quiet.model.state_dict().items(), noisy.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in quiet.history] == [h["train_loss"] for h in noisy.history]


def test_early_stopping_keeps_the_best_accuracy_checkpoint(prepared, settings, params):
    # A constant learning rate this high makes validation accuracy wobble and fall, so
    # training must stop early, `patience` epochs after the best one, and hand back that
    # epoch's weights (not the last, and not the lowest-loss epoch's when they differ).
    tp = replace(
        TrainParams.from_params(params), epochs=30, patience=2, lr=0.05, schedule="constant"
    )
    seen = []
    result = train_model(
        _data(settings), tp, "cpu", on_epoch=lambda e, m: seen.append(m), show_progress=False
    )
    best = max(h["val_accuracy"] for h in result.history)
    assert result.best_val_accuracy == pytest.approx(best)
    first_best = next(h for h in result.history if h["val_accuracy"] == best)
    assert result.best_epoch >= first_best["epoch"]
    assert len(seen) == len(result.history)
    data = _data(settings)
    logits = result.model(torch.from_numpy(data.x["val"]))
    accuracy = (logits.argmax(1).numpy() == data.y["val"]).mean()
    assert accuracy == pytest.approx(best)
    assert len(result.history) < tp.epochs, "no early stop: the test proves nothing"
    assert len(result.history) - result.best_epoch == tp.patience


def test_an_accuracy_tie_goes_to_the_lower_loss():
    from pipeline.train import TrainResult, _better

    best = TrainResult(None, None, None, "cpu", best_epoch=3)
    best.best_val_accuracy, best.best_val_loss = 0.90, 0.40
    assert _better(0.91, 0.90, best)  # higher accuracy wins whatever the loss
    assert _better(0.90, 0.30, best)  # a tie: the lower loss
    assert not _better(0.90, 0.50, best)
    assert not _better(0.89, 0.10, best)  # a lower loss alone is not better


def test_the_cosine_schedule_decays_over_the_budget(prepared, settings, params):
    tp = replace(TrainParams.from_params(params), epochs=6, patience=10)
    result = train_model(_data(settings), tp, "cpu", show_progress=False)
    rates = [h["lr"] for h in result.history]
    assert rates == sorted(rates, reverse=True) and rates[0] < tp.lr
    assert rates[-1] == pytest.approx(tp.lr * 0.02, rel=1e-3)  # the floor at the end
    flat = train_model(
        _data(settings), replace(tp, schedule="constant"), "cpu", show_progress=False
    )
    assert {h["lr"] for h in flat.history} == {tp.lr}


def test_warm_start_begins_from_the_given_weights(prepared, settings, params):
    data = _data(settings)
    tp = replace(TrainParams.from_params(params), epochs=4)
    first = train_model(data, tp, "cpu", show_progress=False)
    zero = replace(tp, epochs=1, lr=1e-9)
    warm = train_model(data, zero, "cpu", init_state=first.model.state_dict(), show_progress=False)
    cold = train_model(data, zero, "cpu", show_progress=False)
    assert warm.warm_started and not cold.warm_started
    assert warm.history[0]["val_loss"] < cold.history[0]["val_loss"] - 0.3
    assert warm.history[0]["val_accuracy"] > cold.history[0]["val_accuracy"] + 0.3
    assert warm.history[0]["val_accuracy"] == pytest.approx(first.best_val_accuracy, abs=0.05)


def test_architecture_follows_the_features():
    cnn = build_model(
        ModelConfig(n_features=784, num_classes=10, hidden=64, dropout=0.0, image_side=28)
    )
    assert isinstance(cnn, ConvNet)
    assert cnn(torch.zeros(5, 784)).shape == (5, 10)  # (B, 784) -> (B, 1, 28, 28) inside
    mlp = build_model(ModelConfig(n_features=7, num_classes=3, hidden=64, dropout=0.0))
    assert isinstance(mlp, MLP) and mlp(torch.zeros(2, 7)).shape == (2, 3)


def test_the_default_architecture_and_its_description():
    from pipeline.model import count_parameters
    from pipeline.validate import Schema

    def schema(n: int) -> Schema:
        return Schema(tuple(f"f{i}" for i in range(n)), 10)

    cfg = ModelConfig.for_schema(schema(784), 64, 0.25)
    assert (cfg.conv_blocks, cfg.conv_filters, cfg.batch_norm) == (2, 16, True)
    model = build_model(cfg)
    assert model(torch.zeros(3, 784)).shape == (3, 10)
    text = cfg.describe(count_parameters(model))
    assert "28x28 image" in text and "16, 32 filters" in text
    assert f"{count_parameters(model):,} parameters" in text
    tiny = ModelConfig.for_schema(schema(4), 64, 0.25)  # a 2x2 "image" pools only once
    assert tiny.conv_blocks == 1 and build_model(tiny)(torch.zeros(2, 4)).shape == (2, 10)
    table = ModelConfig.for_schema(schema(13), 64, 0.25)
    assert table.kind == "mlp" and "not a square image" in table.describe()
    # A checkpoint written before these choices has none of their keys: it rebuilds as the
    # one-block CNN it was.
    old = {"n_features": 64, "num_classes": 10, "hidden": 64, "dropout": 0.25, "image_side": 8}
    legacy = ModelConfig(**old)
    assert (legacy.conv_blocks, legacy.batch_norm, legacy.conv_filters) == (1, False, 32)


def test_the_inference_max_pool_equals_torchs_own():
    """MaxPool2x2's pairs outside training: the same values as torch's 2x2 max-pool bit
    for bit (odd sides, NaN, negative maps, batches large enough to take that path);
    training and tiny maps keep torch's kernel, and its error for a map too small."""
    from pipeline.model import SMALL_POOL, MaxPool2x2

    pool = MaxPool2x2().eval()
    gen = torch.Generator().manual_seed(0)
    for shape in [(64, 16, 8, 8), (8, 16, 28, 28), (40, 32, 7, 7), (30, 3, 9, 10), (40, 2, 33, 3)]:
        x = torch.randn(shape, generator=gen) - 0.5
        x[0, 0, 1, 1] = float("nan")
        assert x.numel() >= SMALL_POOL  # the pairs, not torch's kernel
        ours, theirs = pool(x), torch.nn.functional.max_pool2d(x, 2)
        assert ours.shape == theirs.shape
        assert torch.equal(ours.isnan(), theirs.isnan()) and ours.isnan().any()
        assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    small = torch.randn(1, 16, 4, 4, generator=gen)
    assert torch.equal(pool(small), torch.nn.functional.max_pool2d(small, 2))
    with pytest.raises(RuntimeError, match="too small"):
        pool(torch.zeros(SMALL_POOL, 1, 1, 4))
    # training: torch's kernel, whose gradient of a tied window goes to one input (the
    # pairs' torch.maximum would split it in quarters)
    train = MaxPool2x2().train()
    x = torch.zeros(64, 16, 8, 8, requires_grad=True)
    train(x).sum().backward()
    assert x.grad is not None and x.grad.max() == 1 and (x.grad > 0).sum() == 64 * 16 * 4 * 4
    # a whole default ConvNet answers the same with either pool
    model = build_model(
        ModelConfig(64, 10, 64, 0.0, image_side=8, conv_filters=16, conv_blocks=2, batch_norm=True)
    ).eval()
    rows = torch.randn(256, 64, generator=gen)
    with torch.inference_mode():
        fast = model(rows)
        for layer in model.features:
            if isinstance(layer, MaxPool2x2):
                layer.forward = lambda t: torch.nn.functional.max_pool2d(t, 2)
        assert torch.equal(fast, model(rows))


def test_predictions_run_a_folded_copy_that_answers_as_the_model_does():
    """The Predictor folds each BatchNorm into its convolution and leaves Dropout out
    (inference_copy): the same probabilities to float rounding, the same labels, while the
    model that is saved and trained on keeps its layers and weights."""
    from pipeline.model import inference_copy

    gen = torch.Generator().manual_seed(1)
    cfg = ModelConfig(
        64, 10, 64, 0.3, image_side=8, conv_filters=16, conv_blocks=2, batch_norm=True
    )
    model = build_model(cfg)
    with torch.no_grad():  # statistics and affine terms far from the fresh 0/1
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-2, 2, generator=gen)
            bn.running_var.uniform_(0.1, 4, generator=gen)
            bn.weight.uniform_(0.5, 2, generator=gen)
            bn.bias.uniform_(-1, 1, generator=gen)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = inference_copy(model)
    kinds = [type(m) for m in folded.modules()]
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.Dropout not in kinds
    assert torch.nn.BatchNorm2d in map(type, model.modules())  # the model itself unchanged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    rows = torch.randn(300, 64, generator=gen) * 3
    with torch.inference_mode():
        want, got = torch.softmax(model(rows), 1), torch.softmax(folded(rows), 1)
    assert torch.equal(want.argmax(1), got.argmax(1))
    assert (want - got).abs().max() < 1e-5
    predictor = Predictor(model, cfg, None)  # the preprocessor plays no part here
    assert predictor.model is model and predictor._forward is not model
    # nothing to fold: the model itself; batch statistics in eval mode: not folded
    plain = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.ReLU()).eval()
    assert inference_copy(plain) is plain
    mlp = build_model(ModelConfig(64, 10, 32, 0.5)).eval()
    lean = inference_copy(mlp)
    assert isinstance(mlp, MLP) and torch.nn.Dropout not in map(type, lean.modules())
    with torch.inference_mode():
        assert torch.equal(mlp(rows), lean(rows))
    live = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False)
    ).eval()
    assert torch.nn.BatchNorm2d in map(type, inference_copy(live).modules())


def test_predictions_are_invariant_to_tiny_noise(prepared, settings, params):
    data = _data(settings)
    result = train_model(
        data, replace(TrainParams.from_params(params), epochs=6), "cpu", show_progress=False
    )
    x = torch.from_numpy(data.x["test"])
    base = result.model(x).argmax(1)
    noisy = result.model(
        x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    )
    assert (base == noisy.argmax(1)).float().mean() > 0.98


def test_device_choice():
    assert choose_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert choose_device("auto").type in {"cpu", "mps"}
        with pytest.raises(ValueError, match="CUDA is not available"):
            choose_device("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_training_with_bf16(prepared, settings, params):
    data = _data(settings)
    result = train_model(
        data, replace(TrainParams.from_params(params), epochs=5), "cuda", show_progress=False
    )
    assert result.device.startswith("cuda") and result.history[-1]["val_accuracy"] > 0.8
    assert np.isfinite(result.best_val_loss)


@pytest.mark.parametrize(("classes", "warned"), [(10, True), (3, False)])
def test_training_warns_when_the_labels_use_fewer_classes_than_configured(classes, warned):
    """Three-class data under the default data.num_classes (10): training says so and
    names the setting (a newcomer's model had 7 outputs it never learnt and a macro F1 of
    0.28 where 0.93 was due); data that uses every class gets no warning."""
    from pipeline.experiment import unused_classes_warning
    from pipeline.preprocess import Preprocessor
    from pipeline.validate import Schema

    rng = np.random.default_rng(0)
    schema = Schema(tuple(f"f{i}" for i in range(4)), classes)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = {name: rng.integers(0, 3, 20) for name in ("train", "val", "test")}
    for part in y.values():
        part[:3] = [0, 1, 2]
    data = SplitData(Preprocessor.fit(x, schema), {k: x[:20] for k in y}, y)
    message = unused_classes_warning(data)
    if warned:
        assert message is not None and "data.num_classes: 3" in message
        assert "none of 3, 4, 5, 6, 7, 8, 9" in message
    else:
        assert message is None
