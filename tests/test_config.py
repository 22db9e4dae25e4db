from dataclasses import replace

import pytest

from diredi_sim.config import ConfigError, ExperimentConfig, from_flat, load_config, to_flat, with_overrides

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "experiments" / "configs"


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    from experiments.paper import load_paper_config

    from server.engine import RunConfig

    paths = sorted(CONFIGS.glob("*.toml"))
    assert {p.stem for p in paths} >= {"edge", "exp1", "exp2", "federation", "demo"}
    for path in paths:
        if path.stem in ("federation", "demo"):
            assert isinstance(load_config(path, cls=RunConfig), RunConfig)
            continue
        config = load_paper_config(path)[0] if path.stem.startswith("exp") else load_config(path)
        assert isinstance(config, ExperimentConfig)


def test_values_and_types(tmp_path):
    config = load_config(write(tmp_path, 'seed = 3\n[train]\nlr = 1\nepochs = 2\n[data.synthetic]\nnum_train = 10\n'))
    assert config.seed == 3 and config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.epochs == 2 and config.data.synthetic.num_train == 10


@pytest.mark.parametrize("text, fragment", [
    ("sede = 1\n", "unknown key sede"),
    ("[train]\nepoch = 1\n", "unknown key train.epoch"),
    ("[train]\nepochs = 'many'\n", "train.epochs: expected an integer, got 'many'"),
    ("[train]\nepochs = 0\n", "train.epochs = 0: must be >= 1"),
    ("[train]\nlr = -0.1\n", "train.lr = -0.1: must be > 0"),
    ("[data.synthetic]\nnum_train = true\n", "data.synthetic.num_train: expected an integer, got True"),
    ("preset = 'gpu'\n", "preset = 'gpu'"),
    ("[data]\nsource = 'voc'\n", "data.voc_root"),
    ("train = 3\n", "train: expected a table"),
    ("seed = \n", "not valid TOML"),
])
def test_bad_config_names_key_and_value(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")


def test_flat_round_trip_and_overrides(tmp_path):
    config = with_overrides(ExperimentConfig(), **{"train.batch_size": 4, "data.synthetic.seed": 9, "name": "x"})
    flat = to_flat(config)
    assert flat["train.batch-size"] == 4 and flat["data.synthetic.seed"] == 9
    assert all(isinstance(v, (int, float, str, bool, list)) for v in flat.values())
    assert from_flat(flat) == config
    overridden = load_config(write(tmp_path, "seed = 1\n"), {"train.batch-size": 2})
    assert overridden.train.batch_size == 2


def test_every_config_root_goes_through_one_loader_and_one_flat_form():
    """The three roots (an experiment, a federation, a paper experiment with its pipeline) are read
    by the same ``load_config`` and carried in Flower's scalar form by the same ``to_flat`` /
    ``from_flat``; a section's own check (VerifyConfig's) is named under its full key."""
    from experiments.paper import PaperConfig

    from server.engine import RunConfig

    for cls, name in ((ExperimentConfig, "edge"), (RunConfig, "federation"), (PaperConfig, "exp2")):
        config = load_config(CONFIGS / f"{name}.toml", cls=cls)
        flat = to_flat(config)
        assert all(isinstance(v, (int, float, str, bool)) for v in flat.values()), name
        assert from_flat(flat, cls) == config
    paper = load_config(CONFIGS / "exp2.toml", cls=PaperConfig)
    assert paper.pipeline.verify.critical_classes == ("aeroplane", "bus", "motorbike", "person")
    assert to_flat(paper)["pipeline.verify.critical-classes"] == "aeroplane,bus,motorbike,person"
    one_class = replace(paper, pipeline=replace(paper.pipeline, customer=("cat",)))  # a list of one class, not a preset
    assert from_flat(to_flat(one_class), PaperConfig).pipeline.customer == ("cat",)
    with pytest.raises(ConfigError, match=r"^--set: pipeline\.verify\.critical_classes: unknown class 'unicorn'"):
        load_config(CONFIGS / "exp2.toml", {"pipeline.verify.critical-classes": "bus,unicorn"}, cls=PaperConfig)


def test_every_number_of_a_config_must_be_finite():
    """A NaN threshold would switch its check off (every comparison with NaN is false): any
    non-finite number in a config is an error naming its key."""
    from server.engine import RunConfig

    for key in ("pipeline.verify.max-ap-drop", "engine.round-timeout", "pipeline.rd.lr", "data.public-fraction"):
        for value in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(ConfigError, match=f"{key.replace('-', '_')} = {value!r}: must be a finite number"):
                from_flat({key: value}, RunConfig)


def test_a_section_given_in_part_keeps_its_own_defaults_for_the_rest(tmp_path):
    """``[baselines.local]`` has defaults of its own (1 epoch at lr 0.001, not TrainConfig's 12
    at 0.003): setting one of its keys, in a file or with --set, keeps the others."""
    from diredi_sim.federation_config import BaselineConfig, FederationConfig
    from server.engine import RunConfig

    own = BaselineConfig().local
    path = tmp_path / "partial.toml"
    path.write_text("[baselines.local]\nmax_train_images = 7\n[pipeline.rd]\nepochs = 3\n")
    config = load_config(path, cls=FederationConfig)
    assert config.baselines.local == replace(own, max_train_images=7)
    assert config.pipeline.rd == replace(FederationConfig().pipeline.rd, epochs=3)
    overridden = load_config(CONFIGS / "federation.toml", {"baselines.local.epochs": 2}, cls=RunConfig)
    assert overridden.baselines.local == replace(load_config(CONFIGS / "federation.toml", cls=RunConfig).baselines.local, epochs=2)
    assert (overridden.baselines.local.lr, overridden.baselines.local.warmup_steps) == (own.lr, own.warmup_steps) == (0.001, 10)


def test_an_unknown_rd_customer_loss_is_rejected_by_name():
    from diredi_sim.settings import PipelineConfig

    assert PipelineConfig(rd_customer_loss="separate").rd_customer_loss == "separate"
    with pytest.raises(ConfigError, match=r"rd_customer_loss = 'split': must be one of \['joint', 'separate'\]"):
        PipelineConfig(rd_customer_loss="split")


def test_an_unknown_rd_align_is_rejected_by_name_and_edge_aligns_the_teacher():
    from diredi_sim.settings import RD_ALIGNS, PipelineConfig

    assert RD_ALIGNS[PipelineConfig(rd_align="edge").rd_align] == "teacher"  # the edge is RD's teacher
    with pytest.raises(ConfigError, match=r"rd_align = 'tutor': must be one of \['student', 'edge'\]"):
        PipelineConfig(rd_align="tutor")
