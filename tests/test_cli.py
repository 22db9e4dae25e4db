"""The `diredi-sim` command line: run as a user runs it (a subprocess), and its many error paths
through `main` in this process."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOC_REAL = ROOT / "tests" / "data" / "voc-real"  # see README.md there


def require_voc_real():
    """The real-VOC fixture ships with the repository: a missing one fails, it does not skip."""
    if not VOC_REAL.is_dir():
        pytest.fail(f"{VOC_REAL} is missing: it is part of the repository "
                    "(restore it with `git checkout -- tests/data/voc-real`)", pytrace=False)


@pytest.fixture
def voc_real_is_there():
    require_voc_real()


needs_voc_real = pytest.mark.usefixtures("voc_real_is_there")


def run_cli(*args, cwd=ROOT, env=None):
    """The command in its own process, as a user runs it (the entry point, exit code, no traceback)."""
    return subprocess.run([sys.executable, "-m", "experiments.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def call_cli(*args):
    """The command's ``main`` in this process (no interpreter and torch start-up: 5-8 s per call
    on CI's cores), its output captured; for the many error-path checks."""
    from experiments.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@needs_voc_real
@pytest.mark.parametrize("folder", ["voc2012-100", "tiny-voc-devkit/VOC2007", "tiny-voc-devkit/VOC2012", "labelme-voc", "icevision-voc"])
def test_check_data_passes_clean_real_folders(folder):
    result = call_cli("check-data", VOC_REAL / folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 problem(s)" in result.stderr


@needs_voc_real
def test_check_data_reports_every_problem_in_one_pass(tmp_path):
    root = tmp_path / "VOC2012"
    shutil.copytree(VOC_REAL / "voc2012-100" / "VOCdevkit" / "VOC2012", root)
    ids = (root / "ImageSets" / "Main" / "val.txt").read_text().split()
    (root / "JPEGImages" / f"{ids[0]}.jpg").unlink()  # missing image
    (root / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # unreadable image
    (root / "Annotations" / f"{ids[2]}.xml").write_text("<annotation><object>")  # malformed XML
    xml = root / "Annotations" / f"{ids[3]}.xml"
    text = xml.read_text()
    start = text.index("<name>") + len("<name>")
    xml.write_text(text[:start] + "unicorn" + text[text.index("</name>"):])  # unknown class
    result = call_cli("check-data", root)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    for image_id, what in [(ids[0], "image file is missing"), (ids[1], "corrupt or unreadable image"),
                           (ids[2], "malformed XML"), (ids[3], "unknown class 'unicorn'")]:
        assert any(image_id in line and what in line for line in lines), (image_id, lines)
    assert len(lines) == 4 and "4 problem(s) found" in result.stderr


@needs_voc_real
def test_eval_detections_prints_one_json_object():
    sample = VOC_REAL / "voc2012-100"
    result = call_cli("eval-detections", "--voc-root", sample / "VOCdevkit", "--detections", sample / "detections",
                     "--classes", sample / "detections" / "classes.txt", "--image-set", "val")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"voc", "voc07", "coco", "prf"}
    assert len(report["voc"]["per_class"]) == 20
    # the same mAP as the independent devkit port in test_evaluate.py
    assert report["voc"]["mAP"] == pytest.approx(0.61387, abs=5e-5)
    assert 0 < report["coco"]["AP"] < report["coco"]["AP50"] <= 1


def test_bad_config_is_one_clear_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[train]\nepochs = 'ten'\n")
    result = run_cli("train", config)
    assert result.returncode == 2
    assert f"{config}: train.epochs: expected an integer, got 'ten'" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_end_to_end_on_tiny_synthetic_data(tmp_path):
    result = run_cli("train", ROOT / "experiments" / "configs" / "edge.toml",
                     "--set", f'runs_dir="{tmp_path / "runs"}"', "--set", f'data.cache_dir="{tmp_path / "cache"}"',
                     "--set", "data.synthetic.num_train=16", "--set", "data.synthetic.num_val=8", "--set", "data.synthetic.num_test=8",
                     "--set", "train.epochs=1", "--set", "train.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    folder = runs[0]
    results = json.loads((folder / "results.json").read_text())
    assert results["summary"]["test_images"] == 8 and set(results["test"]) == {"voc", "voc07", "coco", "prf"}
    assert (folder / "checkpoints" / "edge.pt").is_file()
    assert json.loads((folder / "config.json").read_text())["data"]["synthetic"]["num_train"] == 16
    assert "mAP" in result.stdout and "person" in result.stdout  # the per-class table


@pytest.mark.parametrize("command", [["paper", "--experiment", "exp1"], ["compare"]])
def test_seeds_below_one_is_one_clear_line(command):
    result = call_cli(*command, "--seeds", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["diredi-sim: error: --seeds 0: must be >= 1"], result.stderr  # before any config is read or run


def test_export_public_copies_the_public_pool_once(tmp_path):
    """`diredi-sim export-public`: a VOC folder of the public pool that the manufacturer's view
    reads as it reads the source's public pool; a second export into it is one clear line."""
    settings = ["--set", f'data.cache_dir="{tmp_path / "cache"}"', "--set", "data.synthetic.num_train=16",
                "--set", "data.synthetic.num_val=8", "--set", "data.synthetic.num_test=8"]
    destination = tmp_path / "public"
    result = call_cli("export-public", *settings, destination)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data.manufacturer_root=\"{destination}\"" in result.stdout
    listed = {line for name in ("train", "val", "test") for line in (destination / "ImageSets" / "Main" / f"{name}.txt").read_text().split()}
    assert {p.stem for p in (destination / "Annotations").iterdir()} == listed and 0 < len(listed) < 32
    again = call_cli("export-public", *settings, destination)
    assert again.returncode == 2 and again.stderr.strip() == f"diredi-sim: error: {destination}: not empty; export_pool writes into a new folder"


@pytest.mark.parametrize("case", ["missing voc root", "bad image-set list", "bad detections line", "unknown split", "bad --set",
                                  "bad synthetic range"])
def test_a_users_mistake_is_one_line(tmp_path, case):
    """Each user error at the command line prints one line naming the file, key or value, exits
    2, and shows no traceback."""
    edge = ROOT / "experiments" / "configs" / "edge.toml"
    tiny = ["--set", f'data.cache_dir="{tmp_path / "cache"}"', "--set", "data.synthetic.num_train=8",
            "--set", "data.synthetic.num_val=4", "--set", "data.synthetic.num_test=4"]
    if case == "missing voc root":
        args, expected = ["train", edge, "--set", 'data.source="voc"', "--set", f'data.voc_root="{tmp_path / "nowhere"}"'], \
            f"{tmp_path / 'nowhere'}: dataset folder does not exist"
    elif case == "bad image-set list":
        require_voc_real()
        root = VOC_REAL / "tiny-voc-devkit" / "VOC2007"
        args, expected = ["train", edge, "--set", 'data.source="voc"', "--set", f'data.voc_root="{root}"',
                          "--set", 'data.train_set="nosuch"'], "image set list 'nosuch' does not exist"
    elif case == "bad detections line":
        require_voc_real()
        (tmp_path / "dets").mkdir()
        (tmp_path / "dets" / "000001.txt").write_text("0 notanumber 1 2 3 4\n")
        from diredi_sim.data import VOC_CLASSES
        (tmp_path / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
        args, expected = ["eval-detections", "--voc-root", VOC_REAL / "tiny-voc-devkit" / "VOC2007", "--detections",
                          tmp_path / "dets", "--classes", tmp_path / "classes.txt"], "000001.txt, line 1: cannot parse"
    elif case == "unknown split":
        args, expected = ["train", edge, "--set", 'split="nosuchsplit"', *tiny], "split = 'nosuchsplit': unknown split preset"
    elif case == "bad --set":
        args, expected = ["train", edge, "--set", "epochs"], "--set 'epochs': expected KEY=VALUE"
    else:
        args, expected = ["generate-data", "--set", "data.synthetic.min_objects=9", "--set", "data.synthetic.max_objects=2", *tiny], \
            "data.synthetic: min_objects = 9, max_objects = 2: need 1 <= min_objects <= max_objects"
    result = call_cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0] and lines[0].startswith("diredi-sim: error: "), \
        result.stderr[-2000:]
