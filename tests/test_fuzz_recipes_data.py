"""Adversarial inputs to the real-data loaders and the recipe entry points (recipes.data, denoise, digits, engine,
cli): every bad argument is a TypeError (wrong type) or ValueError (wrong value) naming it, raised before any
training, and edge inputs give the documented answer instead of an obscure error or a silently wrong one."""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import pytest
import torch

from dsc_kernels import recipes
from dsc_kernels.recipes import cli, data, denoise, digits, engine

pytest.importorskip("sklearn")

IMAGE = torch.rand(20, 30, generator=torch.Generator().manual_seed(0))
CLEAN = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def cpu_only(monkeypatch):
    """No CUDA, a plain Triton setup and no backend or torchrun environment, wherever the tests run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("TRITON_INTERPRET", "DSC_KERNELS_BACKEND", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_training(monkeypatch):
    """A bad argument must be rejected before the first epoch: reaching engine.fit is a failure."""

    def fit(*args, **kwargs):
        raise AssertionError("training started despite a bad argument")

    monkeypatch.setattr(engine, "fit", fit)


# --------------------------------------------------------------------------------------------------- recipes.data
@pytest.mark.parametrize(
    "seed, error",
    [(-1, ValueError), (2**32, ValueError), (1.5, TypeError), (True, TypeError), (None, TypeError), ("0", TypeError)],
)
def test_digits_seed_is_checked(seed, error):
    # scikit-learn's message named random_state; True silently split with seed 1 and None unreproducibly
    with pytest.raises(error, match="seed"):
        data.digits(seed)


@pytest.mark.parametrize("name", [None, ["china"], b"china"])
def test_photo_name_of_the_wrong_type_is_a_type_error(name):
    with pytest.raises(TypeError, match="name must be one of"):
        data.photo(name)


BAD_PATCHES = {
    "n-zero": (dict(n=0), ValueError, "n must be >= 1"),  # torch.stack of an empty list
    "n-negative": (dict(n=-1), ValueError, "n must be >= 1"),
    "n-float": (dict(n=1.5), TypeError, "n must be an int"),
    "n-bool": (dict(n=True), TypeError, "n must be an int"),
    "size-zero": (dict(size=0), ValueError, "size must be >= 1"),  # returned (n, 1, 0, 0)
    "size-negative": (dict(size=-3), ValueError, "size must be >= 1"),
    "size-float": (dict(size=2.0), TypeError, "size must be an int"),
    "size-bool": (dict(size=True), TypeError, "size must be an int"),
    "size-wider-than-image": (dict(size=31), ValueError, "larger than the image"),
    "image-3d": (dict(image=IMAGE[None]), ValueError, "image must have 2 dimensions"),
    "image-1d": (dict(image=IMAGE[0]), ValueError, "image must have 2 dimensions"),
    "image-numpy": (dict(image=IMAGE.numpy()), TypeError, "image must be a torch.Tensor"),
    "image-int": (dict(image=(IMAGE * 9).long()), TypeError, "image must have a floating-point dtype"),
    "image-empty": (dict(image=torch.rand(0, 5), size=1), ValueError, "larger than the image"),
    "generator-int": (dict(generator=0), TypeError, "generator must be a torch.Generator"),
}


@pytest.mark.parametrize("case", BAD_PATCHES)
def test_random_patches_rejects_bad_arguments(case):
    changes, error, message = BAD_PATCHES[case]
    kwargs = dict(image=IMAGE, n=3, size=4, generator=_generator()) | changes
    with pytest.raises(error, match=message):
        data.random_patches(**kwargs)


def test_random_patches_fit_up_to_the_short_side_of_the_image():
    patches = data.random_patches(IMAGE, 3, 20, _generator())
    assert patches.shape == (3, 1, 20, 20)
    crops = [IMAGE[:, c : c + 20] for c in range(11)]
    assert all(any(torch.equal(p[0], crop) for crop in crops) for p in patches)
    with pytest.raises(ValueError, match="size 21 is larger than the image, 20x30"):
        data.random_patches(IMAGE, 3, 21, _generator())  # used to be torch's "random_ expects 'from' < 'to'"


# -------------------------------------------------------------------------------------------------------- denoise
def test_psnr_of_a_perfect_estimate_is_inf():
    assert denoise.psnr(CLEAN, CLEAN.clone()) == math.inf  # was ZeroDivisionError
    assert denoise.psnr(CLEAN, CLEAN + 2) == denoise.psnr(CLEAN, torch.ones_like(CLEAN))  # the estimate is clipped


BAD_PSNR = {
    "broadcastable-shape": ((CLEAN, CLEAN[..., :1, :]), ValueError, "one non-empty shape"),  # was a number
    "other-shape": ((CLEAN, CLEAN[..., :15, :]), ValueError, "one non-empty shape"),
    "empty": ((CLEAN[:0], CLEAN[:0]), ValueError, "one non-empty shape"),  # was NaN
    "integer": (((CLEAN * 255).long(), (CLEAN * 255).long() + 1), TypeError, "clean must have a floating"),
    "numpy": ((CLEAN, CLEAN.numpy()), TypeError, "estimate must be a torch.Tensor"),
}


@pytest.mark.parametrize("scale, shift", [(255.0, 0.0), (1.0, -0.5), (1.0, 1e-3)])
def test_psnr_refuses_a_clean_image_outside_0_1(scale, shift):
    # only the estimate is clipped: an exact estimate of CLEAN * 255 scored about -38 dB instead of inf
    clean = CLEAN * scale + shift
    with pytest.raises(ValueError, match=r"clean must lie in \[0, 1\]"):
        denoise.psnr(clean, clean.clone())


def test_psnr_of_a_nan_clean_image_is_nan():
    clean = CLEAN.clone()
    clean[0, 0, 0, 0] = math.nan
    assert math.isnan(denoise.psnr(clean, CLEAN))


@pytest.mark.parametrize("case", BAD_PSNR)
def test_psnr_rejects_mismatched_or_empty_images(case):
    args, error, message = BAD_PSNR[case]
    with pytest.raises(error, match=message):
        denoise.psnr(*args)


@pytest.mark.parametrize("fn", [denoise.test_images, denoise.tuning_image, denoise.training_patches])
@pytest.mark.parametrize("seed, error", [(1.5, TypeError), (None, TypeError), (-1, ValueError), (2**32, ValueError)])
def test_denoise_data_seeds_are_checked(fn, seed, error):
    # the recipe seeds its test noise with seed + 1000: a seed near 2**64 overflowed only after training
    with pytest.raises(error, match="seed"):
        fn(seed)


def test_noisy_copy_checks_its_seed_and_image():
    with pytest.raises(TypeError, match="seed must be an int"):
        denoise.noisy_copy(CLEAN, 1.5)
    with pytest.raises(ValueError, match="seed must be < 2\\*\\*64"):
        denoise.noisy_copy(CLEAN, 2**64)
    with pytest.raises(TypeError, match="clean must be a torch.Tensor"):
        denoise.noisy_copy(CLEAN.numpy(), 0)


BAD_BASELINES = {
    "wavelet-batch": (lambda: denoise.wavelet(torch.rand(2, 1, 16, 16)), ValueError, "one gray image"),  # dropped 1
    "wavelet-3d": (lambda: denoise.wavelet(torch.rand(1, 16, 16)), ValueError, "noisy must have 4 dimensions"),
    "tv-batch": (lambda: denoise.tv(torch.rand(2, 1, 16, 16), 0.1), ValueError, "one gray image"),
    "tv-2d": (lambda: denoise.tv(torch.rand(16, 16), 0.1), ValueError, "noisy must have 4 dimensions"),
    "tv-weight-zero": (lambda: denoise.tv(CLEAN, 0.0), ValueError, "weight must be finite and > 0"),
    "tv-weight-negative": (lambda: denoise.tv(CLEAN, -1.0), ValueError, "weight must be finite and > 0"),
    "tv-weight-nan": (lambda: denoise.tv(CLEAN, math.nan), ValueError, "weight must be finite and > 0"),
    "tv-weight-inf": (lambda: denoise.tv(CLEAN, math.inf), ValueError, "weight must be finite and > 0"),
    "tv-weight-str": (lambda: denoise.tv(CLEAN, "0.1"), TypeError, "weight must be a real number"),
}


@pytest.mark.parametrize("case", BAD_BASELINES)
def test_skimage_baselines_reject_bad_arguments(case):
    call, error, message = BAD_BASELINES[case]
    with pytest.raises(error, match=message):
        call()


def test_denoiser_stride_is_one_int_and_images_must_exceed_it():
    with pytest.raises(TypeError, match="stride must be an int"):
        denoise.CSCDenoiser(4, 5, 2, (2, 2), backend="reference")  # built, then forward failed in F.pad
    model = denoise.CSCDenoiser(4, 5, 2, 2, backend="reference").eval()
    assert model(torch.rand(1, 1, 3, 3)).shape == (1, 1, 3, 3)
    with pytest.raises(ValueError, match="larger than stride 2"):
        model(torch.rand(1, 1, 2, 9))  # was the reflect padding's RuntimeError
    with pytest.raises(ValueError, match="y must have 4 dimensions"):
        model(torch.rand(9, 9))  # was an IndexError


# --------------------------------------------------------------------------------------------------------- digits
def test_digits_net_checks_strategy_backend_and_input_shape():
    with pytest.raises(TypeError, match="strategy must be one of"):
        digits.DigitsNet(None)
    with pytest.raises(ValueError, match="backend must be one of"):
        digits.DigitsNet("baseline", backend="bogus")  # ignored by the conv strategies, but saved in the spec
    for strategy in ("baseline", "dsc"):
        with pytest.raises(ValueError, match="x must be \\(B, 1, 8, 8\\)"):
            digits.DigitsNet(strategy, backend="reference")(torch.rand(2, 1, 16, 16))  # was a matmul error


X, Y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
BAD_EVALUATE = {
    "one-label": (X, Y[:1]),  # broadcast against five predictions: a wrong accuracy
    "fewer-labels": (X, Y[:3]),
    "column-of-labels": (X, Y[:, None]),  # broadcast to 5x5: a wrong accuracy
    "empty": (X[:0], Y[:0]),  # accuracy and sparsity NaN
}


@pytest.mark.parametrize("case", BAD_EVALUATE)
def test_digits_evaluate_needs_one_label_per_sample(case):
    x, y = BAD_EVALUATE[case]
    with pytest.raises(ValueError, match="y their B labels"):
        digits.evaluate(digits.DigitsNet("baseline", backend="reference"), x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_digits_evaluate_needs_integer_labels(dtype):
    with pytest.raises(TypeError, match="integer class labels"):  # 1.5 matched no class: a silently lower accuracy
        digits.evaluate(digits.DigitsNet("baseline", backend="reference"), X, (Y + 0.5).to(dtype))


# ---------------------------------------------------------------------------------------- train(), both recipes
BAD_TRAIN = {
    "strategy-none": (dict(strategy=None), TypeError, "strategy must be one of"),
    "strategy-unknown": (dict(strategy="bogus"), ValueError, "strategy must be one of"),
    "epochs-zero": (dict(epochs=0), ValueError, "epochs must be >= 1"),
    "epochs-negative": (dict(epochs=-1), ValueError, "epochs must be >= 1"),
    "epochs-float": (dict(epochs=1.5), TypeError, "epochs must be an int"),
    "seed-negative": (dict(seed=-1), ValueError, "seed must be >= 0"),
    "seed-near-2**64": (dict(seed=2**64 - 500), ValueError, "seed must be in"),
    "seed-bool": (dict(seed=True), TypeError, "seed must be an int"),
    "subset-zero": (dict(subset=0), ValueError, "subset must be >= 1"),
    "subset-negative": (dict(subset=-5), ValueError, "subset must be >= 1"),  # [:-5] dropped the last five
    "subset-too-large": (dict(subset=10**6), ValueError, "subset must be at most"),  # silently capped
    "subset-float": (dict(subset=1.5), TypeError, "subset must be an int"),
    "out-is-a-file": (dict(out="FILE"), ValueError, "out: .* exists and is not a folder"),  # failed after training
    "out-int": (dict(out=5), TypeError, "out must be a str or a path"),
    "run-str": (dict(run="cpu"), TypeError, "run must be an engine.Run"),
    "backend-unknown": (dict(backend="bogus"), ValueError, "backend must be one of"),
    "backend-unavailable": (dict(backend="triton"), ValueError, "backend: triton cannot run on cpu"),
}
# the conv strategy for digits: it ignores the backend, which went unchecked into metrics.json and the spec
STRATEGY = {"digits": "baseline", "denoise": "cscnet"}
ALREADY_CHECKED = {("digits", "strategy-unknown"), ("denoise", "backend-unknown")}  # by DigitsNet, by the layer
TRAIN_CASES = [(recipe, case) for recipe in STRATEGY for case in BAD_TRAIN if (recipe, case) not in ALREADY_CHECKED]


@pytest.mark.parametrize("recipe, case", TRAIN_CASES)
def test_train_rejects_bad_arguments_before_training(recipe, case, cpu_only, no_training, tmp_path):
    changes, error, message = BAD_TRAIN[case]
    module = recipes.recipe(recipe)
    run = engine.start(False, "cpu")
    kwargs = dict(strategy=STRATEGY[recipe], epochs=1, seed=0, out=None, backend="reference", run=run) | changes
    if kwargs.get("out") == "FILE":
        kwargs["out"] = tmp_path / "metrics.txt"
        kwargs["out"].write_text("keep me\n")
    subset = kwargs.pop("subset", 8)
    with pytest.raises(error, match=message):
        module.train(**kwargs, subset=subset)


def test_train_accepts_out_as_a_string(tmp_path):
    out = tmp_path / "run"
    metrics = digits.train("baseline", 1, 0, str(out), "reference", engine.start(False, "cpu"), subset=16)
    assert (out / "model.pt").is_file() and (out / "metrics.json").is_file()  # was an AttributeError after training
    assert recipes.load(str(out)).strategy == "baseline" and metrics["strategy"] == "baseline"


# --------------------------------------------------------------------------------------------------------- engine
RUN = engine.Run(torch.device("cpu"))
BAD_LOADER = {
    "batch-size-float": (dict(batch_size=1.5), TypeError, "batch_size must be an int"),
    "batch-size-bool": (dict(batch_size=True), TypeError, "batch_size must be an int"),
    "empty": (dict(x=X[:0], y=Y[:0]), ValueError, "x must hold at least one sample"),
    "length-mismatch": (dict(y=Y[:3]), ValueError, "x and y must hold the same number of samples"),  # AssertionError
    "y-not-a-tensor": (dict(y=Y.tolist()), TypeError, "y must be a torch.Tensor"),
    "seed-float": (dict(seed=1.5), TypeError, "seed must be an int"),
    "seed-none": (dict(seed=None), TypeError, "seed must be an int"),
    "seed-too-large": (dict(seed=2**64), ValueError, "seed must be < 2\\*\\*64"),
}


@pytest.mark.parametrize("case", BAD_LOADER)
def test_train_loader_rejects_bad_arguments(case):
    changes, error, message = BAD_LOADER[case]
    kwargs = dict(x=X, y=Y, batch_size=2, seed=0, run=RUN) | changes
    with pytest.raises(error, match=message):
        engine.train_loader(**kwargs)


def _fit(loader, epochs):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = lambda net, x, y: torch.nn.functional.cross_entropy(net(x), y)  # noqa: E731
    return engine.fit(model, loader, loss, optimizer, epochs, RUN, desc="test")


@pytest.mark.parametrize(
    "epochs, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)]
)
def test_fit_epochs_is_an_int_of_at_least_one(epochs, error):
    # 0 and negative epochs returned an empty history, True trained one epoch
    with pytest.raises(error, match="epochs must be"):
        _fit(engine.train_loader(X, Y, 2, 0, RUN), epochs)


def test_fit_rejects_a_loader_without_batches():
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:0], Y[:0]), batch_size=2)
    with pytest.raises(ValueError, match="at least one batch"):
        _fit(empty, 1)  # recorded a loss of 0.0 without a single step


BAD_START = {
    "unknown-device": (dict(device="bogus"), ValueError, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    "meta-device": (dict(device="meta"), ValueError, "the recipes run on no other"),
    "int-device": (dict(device=3), TypeError, "device must be a str or a torch.device"),  # torch read it as cuda:3
    "cuda-without-cuda": (dict(device="cuda"), ValueError, "CUDA is not available"),
    "cuda-index-without-cuda": (dict(device=torch.device("cuda", 0)), ValueError, "CUDA is not available"),
    "distributed-str": (dict(distributed="no"), TypeError, "distributed must be True or False"),  # was SystemExit
}


@pytest.mark.parametrize("case", BAD_START)
def test_start_checks_the_device_and_the_flag(case, cpu_only):
    changes, error, message = BAD_START[case]
    kwargs = dict(distributed=False, device="cpu") | changes
    with pytest.raises(error, match=message):
        engine.start(**kwargs)


def test_start_rejects_a_gpu_index_beyond_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert engine.start(False, "cuda:0").device == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="has 1 GPU"):
        engine.start(False, "cuda:7")  # was accepted, to fail at the first .to()


def test_save_accepts_out_as_a_string(tmp_path):
    out = tmp_path / "saved"
    engine.save(str(out), "digits", {"strategy": "baseline"}, digits.DigitsNet("baseline"), {"accuracy": 0.5})
    assert isinstance(recipes.load(out), digits.DigitsNet)  # was an AttributeError in out.mkdir


def test_an_interrupted_save_leaves_no_earlier_metrics_beside_the_new_model(tmp_path, monkeypatch):
    # metrics.json was written after model.pt was renamed into place: interrupted there, a save into an earlier
    # run's folder left the new model beside the old run's metrics, which the report reads as this run's
    engine.save(tmp_path, "digits", {"strategy": "baseline"}, digits.DigitsNet("baseline"), {"accuracy": 0.25})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.json, "dumps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.save(
            tmp_path, "digits", {"strategy": "baseline", "run": 2}, digits.DigitsNet("baseline"), {"accuracy": 0.5}
        )
    assert engine.read_checkpoint(tmp_path)["spec"]["run"] == 2  # the new model is in place
    assert not (tmp_path / engine.METRICS_FILE).exists()
    monkeypatch.undo()
    engine.save(tmp_path, "digits", {"strategy": "baseline"}, digits.DigitsNet("baseline"), {"accuracy": 0.5})
    assert json.loads((tmp_path / engine.METRICS_FILE).read_text()) == {"accuracy": 0.5}
    assert not list(tmp_path.glob("*.partial"))


def test_load_rejects_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / engine.MODEL_FILE).write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        recipes.load(tmp_path)  # was torch's UnpicklingError
    torch.save({"state_dict": {}}, tmp_path / engine.MODEL_FILE)
    with pytest.raises(ValueError, match="lacks recipe, spec or state_dict"):
        recipes.load(tmp_path)  # was KeyError: 'recipe'
    # cut short (an interrupted copy: a bare OSError before) anywhere in the file
    engine.save(tmp_path, "digits", {"strategy": "baseline"}, digits.DigitsNet("baseline"), {"accuracy": 0.5})
    whole = (tmp_path / engine.MODEL_FILE).read_bytes()
    for cut in (len(whole) // 2, len(whole) - 10, 100):
        (tmp_path / engine.MODEL_FILE).write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="is not a checkpoint"):
            recipes.load(tmp_path)
    assert not list(tmp_path.glob("*.partial"))  # save renames its file into place
    with pytest.raises(TypeError, match="out must be a str or a path"):
        recipes.load(None)
    with pytest.raises(TypeError, match="recipe must be one of"):
        recipes.recipe(None)


# ------------------------------------------------------------------------------------------------------------ cli
def _namespace(tmp_path, **changes) -> argparse.Namespace:
    values = dict(
        recipe="digits",
        strategy="baseline",
        epochs=1,
        seed=0,
        out=str(tmp_path / "out"),
        backend="auto",
        device="cpu",
        distributed=False,
    )
    return argparse.Namespace(**(values | changes))


BAD_NAMESPACE = {
    "recipe-unknown": (dict(recipe="bogus"), "--recipe"),  # was a ValueError traceback
    "recipe-none": (dict(recipe=None), "--recipe"),
    "device-unknown": (dict(device="bogus"), "--device"),  # was torch's RuntimeError
    "device-meta": (dict(device="meta"), "--device"),  # was accepted
    "device-int": (dict(device=0), "--device"),
    "distributed-str": (dict(distributed="yes"), "--distributed: must be True or False"),
    "out-int": (dict(out=5), "--out"),  # was a TypeError traceback
    "strategy-empty": (dict(strategy=""), "--strategy"),  # silently became the default strategy
}


@pytest.mark.parametrize("case", BAD_NAMESPACE)
def test_cli_validate_rejects_a_bad_namespace_with_a_usage_error(case, cpu_only, tmp_path, capsys):
    changes, option = BAD_NAMESPACE[case]
    with pytest.raises(SystemExit) as excinfo:
        cli.validate(_namespace(tmp_path, **changes), cli.parser())
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and f"argument {option}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_an_empty_strategy_on_the_command_line(cpu_only, tmp_path, capsys):
    p = cli.parser()
    args = p.parse_args(["--recipe", "digits", "--strategy", "", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as excinfo:
        cli.validate(args, p)
    assert excinfo.value.code == 2 and "argument --strategy" in capsys.readouterr().err


def test_digits_seed_accepts_numpy_integers_and_rejects_numpy_floats():
    torch.testing.assert_close(data.digits(np.int64(3))[2], data.digits(3)[2])
    with pytest.raises(TypeError, match="seed must be an int"):
        data.digits(np.float64(3.0))  # scikit-learn took it; torch.manual_seed did not


def test_fit_stops_with_a_clear_error_when_the_loss_diverges():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=math.inf)  # the first step sends the weights to inf/NaN
    loss = lambda net, x, y: torch.nn.functional.cross_entropy(net(x), y)  # noqa: E731
    loader = engine.train_loader(X, Y, 2, 0, RUN)
    with pytest.raises(FloatingPointError, match="test: the training loss of epoch 1 is nan: training diverged"):
        engine.fit(model, loader, loss, optimizer, 5, RUN, desc="test")  # trained all 5 epochs on NaN weights


def test_dct_ista_denoises_each_image_of_a_batch_on_its_own():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 24, 24, generator=g) + torch.tensor([0.0, 5.0]).reshape(2, 1, 1, 1)
    batch = denoise.dct_ista(images, 0.04, n_iter=5)
    alone = torch.cat([denoise.dct_ista(images[i : i + 1], 0.04, n_iter=5) for i in range(2)])
    torch.testing.assert_close(batch, alone)  # one mean over the batch shifted each image by the other's
    with pytest.raises(ValueError, match=r"noisy must be gray images \(B, 1, H, W\)"):
        denoise.dct_ista(torch.rand(1, 3, 24, 24), 0.04)


@pytest.mark.parametrize("loader", [lambda: data.digits(0), lambda: data.photo("china")])
def test_real_data_loaders_name_the_extra_when_scikit_learn_is_missing(loader, monkeypatch):
    # digits imported sklearn.model_selection before the check that names the extra: a bare "No module named"
    monkeypatch.setitem(sys.modules, "sklearn", None)  # what an import of a package that is not installed meets
    with pytest.raises(ImportError, match=r"pip install 'dsc_kernels\[train\]'"):
        loader()


def test_subset_may_be_every_sample_but_not_one_more():
    """subset == the samples there are takes them all; one more is refused (a slice would silently cap it)."""
    from dsc_kernels.recipes import _args

    assert _args.subset(10, 10) == 10
    with pytest.raises(ValueError, match="subset must be at most the 10 training samples"):
        _args.subset(11, 10)


def test_cli_integer_checks_refuse_bools_and_take_both_ends():
    """A Namespace built in Python skips argparse: True is no --threads or --seed (it would run 1 thread, seed 1)."""
    from dsc_kernels import _cli_args

    assert _cli_args.threads_problem(True) is not None
    assert _cli_args.int_problem("--seed", False, 0, 10) is not None
    assert _cli_args.threads_problem(_cli_args.MAX_THREADS) is None
    assert _cli_args.threads_problem(_cli_args.MAX_THREADS + 1) is not None
