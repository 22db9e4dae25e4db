"""Device, precision and memory-format settings, and starting weights, on small real computations."""
import pytest
import torch
import torchvision

from diredi_sim.compute import DeviceError, configure_process, current_device, on_device, resolve_device
from diredi_sim.config import ConfigError, ExperimentConfig, TrainConfig, WeightsConfig
from diredi_sim.data.synthetic import SyntheticConfig, ensure_synthetic
from diredi_sim.data.voc import load_annotations
from diredi_sim.models import WeightsError, backbone_precision, build_detector, load_initial_weights
from diredi_sim.runs import save_checkpoint
from diredi_sim.train import Reporting, build_loader, compute_task_losses, train_detector
from experiments.cli import main

TINY = SyntheticConfig(seed=3, num_train=16, num_val=8, num_test=8, min_objects=1, max_objects=2, min_object_size=40)
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    return load_annotations(ensure_synthetic(tmp_path_factory.mktemp("cache"), TINY, workers=1), "train")


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cpu" if NO_GPU else "cuda")
    for bad in ("gpu", "cuda:x", "CUDA", ""):
        with pytest.raises(ConfigError, match=f"device = {bad!r}: must be 'cpu', 'cuda', 'cuda:N' or 'auto'"):
            ExperimentConfig(device=bad)
    assert ExperimentConfig().device == "auto" and ExperimentConfig(device="cuda:1").device == "cuda:1"  # checked where it runs


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_clear_line(capsys):
    with pytest.raises(DeviceError, match="device = 'cuda': .*use 'cpu' or 'auto'"):
        resolve_device("cuda")
    # on the command line: one line, exit 2, before any data is generated or model trained
    assert main(["train", "experiments/configs/edge.toml", "--device", "cuda:0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diredi-sim: error: device = 'cuda:0': "), err
    configure_process(device="cpu")
    assert current_device() == torch.device("cpu")


def losses_of(model, images, targets, precision):
    with torch.no_grad(), backbone_precision(precision):
        return {k: v.item() for k, v in compute_task_losses(model)(images, targets).items()}


def test_bf16_and_channels_last_stay_within_tolerance_of_fp32(tiny_train):
    """The stated tolerance (README, "Device, precision, memory format and starting weights"): on
    the same weights and batch every FCOS loss term under bf16 + channels_last is within 1% of
    fp32's; over 20 training steps the training loss falls as fp32's does, the final one within
    10%. The settings leave the weights on the CPU in contiguous float32 memory, and fp32 without
    channels_last is bit-exact."""
    images, targets = next(iter(build_loader(tiny_train, batch_size=8, train=False)))
    for role in ("tutor", "edge"):
        torch.manual_seed(1)
        model = build_detector(role, "cpu").train()
        reference = losses_of(model, images, targets, "fp32")
        with on_device(model, channels_last=True):
            assert model.backbone.body.state_dict()[next(k for k, v in model.backbone.body.state_dict().items()
                                                         if v.dim() == 4)].is_contiguous(memory_format=torch.channels_last)
            mixed = losses_of(model, images, targets, "bf16")
        for term, value in reference.items():
            assert abs(mixed[term] - value) <= 0.01 * value, (role, term, value, mixed[term])

    def train(precision, channels_last):
        torch.manual_seed(1)
        model = build_detector("edge", "cpu")
        cfg = TrainConfig(epochs=5, batch_size=4, lr=0.004, warmup_steps=5, eval_every=5, hflip_prob=0.0,
                          precision=precision, channels_last=channels_last)
        train_detector(model, tiny_train, tiny_train[:4], cfg, class_indices=list(range(20)), report=Reporting(progress=False))
        return model, sum(losses_of(model.train(), images, targets, "fp32").values())

    start = sum(reference.values())
    fp32, fp32_loss = train("fp32", False)
    again, again_loss = train("fp32", False)
    mixed, mixed_loss = train("bf16", True)
    assert fp32_loss < 0.9 * start and mixed_loss < 0.9 * start  # both learn
    assert abs(mixed_loss - fp32_loss) <= 0.10 * fp32_loss, (fp32_loss, mixed_loss)
    assert again_loss == fp32_loss and all(torch.equal(a, b) for a, b in zip(fp32.state_dict().values(), again.state_dict().values()))
    for name, value in mixed.state_dict().items():
        assert value.device.type == "cpu" and value.is_contiguous(), name
        if value.is_floating_point():
            assert value.dtype == torch.float32, name


def test_nested_on_device_moves_back_only_what_it_moved():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    with on_device(model, channels_last=True):
        with on_device(model, channels_last=True):
            pass
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)  # the inner block did not undo the outer
    assert model[0].weight.is_contiguous()


def test_weights_from_a_local_file(tmp_path):
    """weights.<role>: a torchvision classification model's file starts the trunk (its
    classifier ignored); a whole detector's checkpoint starts every weight; files that do not fit
    are refused naming the key, the file and the weight."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    tutor = build_detector("tutor", "cpu", weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(tutor.backbone.body.conv1.weight, resnet.conv1.weight)
    assert torch.equal(tutor.backbone.body.layer4[1].bn2.running_var, resnet.layer4[1].bn2.running_var)

    mobilenet = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5)
    torch.save(mobilenet.state_dict(), tmp_path / "mobilenet.pth")
    edge = build_detector("edge", "cpu", weights=str(tmp_path / "mobilenet.pth"))
    assert torch.equal(edge.backbone.body["17"].conv[0][0].weight, mobilenet.features[17].conv[0][0].weight)

    save_checkpoint(tmp_path / "edge.pt", edge, config={"what": "test"})
    copy = build_detector("edge", "cpu", weights=str(tmp_path / "edge.pt"))
    assert all(torch.equal(a, b) for a, b in zip(edge.state_dict().values(), copy.state_dict().values()))

    with pytest.raises(WeightsError, match=r"weights.teacher = '.*resnet18.pth': layer1.0.conv1.weight|"
                                           r"weights.teacher = '.*resnet18.pth': \d+ of the teacher backbone"):
        build_detector("teacher", "cpu", weights=str(tmp_path / "resnet18.pth"))  # resnet34's trunk has more blocks
    with pytest.raises(WeightsError, match=r"weights.tutor = '.*mobilenet.pth': .* missing .* resnet18 checkpoint"):
        build_detector("tutor", "cpu", weights=str(tmp_path / "mobilenet.pth"))
    with pytest.raises(WeightsError, match="no such file"):
        load_initial_weights(build_detector("edge", "cpu"), str(tmp_path / "nowhere.pt"), key="pipeline.weights.edge")
    (tmp_path / "junk.pt").write_text("not weights")
    with pytest.raises(WeightsError, match="junk.pt': not a torch weights file"):
        build_detector("edge", "cpu", weights=str(tmp_path / "junk.pt"))
    with pytest.raises(WeightsError, match="torchvision has no weights named 'NoSuch_Weights.X'"):
        build_detector("edge", "cpu", weights="torchvision:NoSuch_Weights.X")
    assert WeightsConfig().teacher == ""


def test_a_repeated_evaluation_is_remembered_and_identical(tiny_train):
    """The same model on the same images is predicted once (a round evaluates the manufacturer's
    current models before every customer's update); a changed weight is a new pass."""
    from diredi_sim import train as train_module

    torch.manual_seed(2)
    edge = build_detector("edge", "cpu")
    calls = []
    real = train_module.predict
    train_module.predict = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        first = train_module.evaluate_detector(edge, tiny_train, list(range(20)), batch_size=8)
        second = train_module.evaluate_detector(edge, tiny_train, list(range(20)), batch_size=8)
        assert len(calls) == 1 and first == second
        with torch.no_grad():
            edge.head.classification_head.cls_logits.bias += 1.0
        train_module.evaluate_detector(edge, tiny_train, list(range(20)), batch_size=8)
        train_module.evaluate_detector(edge, tiny_train[:8], list(range(20)), batch_size=8)
        assert len(calls) == 3
    finally:
        train_module.predict = real


def test_a_weights_file_that_does_not_fit_is_one_line_on_the_command_line(tmp_path, capsys):
    (tmp_path / "junk.pt").write_text("not weights")
    tiny = ["--set", f'data.cache_dir="{tmp_path / "cache"}"', "--set", f'runs_dir="{tmp_path / "runs"}"',
            "--set", "data.synthetic.num_train=8", "--set", "data.synthetic.num_val=4", "--set", "data.synthetic.num_test=4"]
    assert main(["train", "experiments/configs/edge.toml", "--device", "cpu", *tiny,
                 "--set", f'weights.edge="{tmp_path / "junk.pt"}"']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diredi-sim: error: weights.edge = ") and "not a torch weights file" in err[-1], err
    assert "Traceback" not in "\n".join(err)
