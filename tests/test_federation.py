"""The federation's plain-torch side: population, config in its three forms, seeds, pyproject's
Flower section."""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from diredi_sim.config import ConfigError, from_flat, load_config, to_flat
from diredi_sim.data.splits import SPLIT_PRESETS
from diredi_sim.seeds import Seeds, derive_seed
from diredi_sim.population import PopulationConfig, build_population, parse_customer, pick_share
from diredi_sim.federation_config import FederationConfig
from diredi_sim.federation import effective_pipeline
from server.engine import EngineConfig, RunConfig, algorithm_config, customer_settings

ROOT = Path(__file__).resolve().parents[1]
PRESUMED = set(SPLIT_PRESETS["presumed"])


def test_population_lists_presets_then_generates_customers_from_a_seed():
    population = build_population(PopulationConfig(customers=("exp1", "aeroplane+bus+dog"), generated=30, seed=5))
    assert [c.partition_id for c in population] == list(range(32))
    assert population[0].classes == SPLIT_PRESETS["exp1"] and population[1].classes == ("aeroplane", "bus", "dog")
    for customer in population[2:]:
        classes = set(customer.classes)
        private = classes - PRESUMED
        assert 1 <= len(private) <= 2, customer  # at least one private class outside the presumed set
        assert classes & PRESUMED, customer  # keeps at least one presumed class
    assert any(PRESUMED - set(c.classes) for c in population[2:])  # some drop presumed classes
    again = build_population(PopulationConfig(customers=("exp1", "aeroplane+bus+dog"), generated=30, seed=5))
    assert again == population
    other = build_population(PopulationConfig(customers=("exp1", "aeroplane+bus+dog"), generated=30, seed=6))
    assert [c.classes for c in other] != [c.classes for c in population]


def test_customer_specs_and_their_errors():
    assert parse_customer("exp2") == SPLIT_PRESETS["exp2"]
    assert parse_customer("dog+aeroplane") == ("aeroplane", "dog")
    with pytest.raises(ConfigError, match=r"population.customers: 'aeroplane\+kitten'.*'kitten'"):
        PopulationConfig(customers=("exp1", "aeroplane+kitten"))
    with pytest.raises(ConfigError, match="population is empty"):
        PopulationConfig(customers=(), generated=0)


def test_seeds_and_shares():
    assert FederationConfig(seed=7).seeds(0).customer == 7  # partition 0 repeats the one-customer pipeline
    assert len({FederationConfig(seed=7).seeds(p)("rd") for p in range(100)}) == 100
    assert FederationConfig(seed=7, replicate=2).seeds(0) == Seeds(7, 0, 2)  # replicate k: the paper command's seed-<7+k>
    assert Seeds(7, 0, 2).customer == 9 and derive_seed(7, "teacher") == derive_seed(7, "teacher", partition=3, replicate=2)
    assert Seeds(7, 1)("dp", 2) != Seeds(7, 1)("dp", 3)  # local DP's noise differs per round
    with pytest.raises(ValueError, match="unknown stage 'rdd'"):
        derive_seed(7, "rdd")
    records = list(range(10))
    assert pick_share(PopulationConfig(), 1, 3)(records) == records
    shares = [pick_share(PopulationConfig(partition="disjoint"), p, 3)(records) for p in range(3)]
    assert sorted(sum(shares, [])) == records and shares[1] == [1, 4, 7]


def test_verification_spares_only_the_classes_a_customer_drops():
    config = FederationConfig()
    exp1, exp2 = build_population(config.population)[:2]
    assert effective_pipeline(config, exp1).verify.critical_classes == SPLIT_PRESETS["presumed"]
    assert "horse" not in effective_pipeline(config, exp2).verify.critical_classes
    assert effective_pipeline(config, exp2).customer == SPLIT_PRESETS["exp2"]


def test_config_round_trips_through_flower_flat_form_and_names_bad_keys():
    config = load_config(ROOT / "experiments/configs/federation.toml", cls=RunConfig)
    flat = to_flat(config)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())  # what run_config / ConfigRecord hold
    assert from_flat(flat, RunConfig) == config
    changed = from_flat({**flat, "simulation.num-rounds": 3, "population.customers": "exp2,dog+cat",
                         "pipeline.verify.critical-classes": "bus,person", "pipeline.customer": "bus,cat"}, RunConfig)
    assert changed.simulation.num_rounds == 3 and changed.population.customers == ("exp2", "dog+cat")
    assert changed.pipeline.verify.critical_classes == ("bus", "person")
    assert changed.pipeline.customer == ("bus", "cat") and changed.pipeline.presumed_split == config.pipeline.presumed_split
    # the same text through the file loader's overrides (Flower's run_config ``set``, ``--set``)
    assert load_config(ROOT / "experiments/configs/federation.toml", {"population.customers": "exp2,dog+cat",
                       "pipeline.customer": "bus,cat"}, cls=RunConfig) == replace(
        config, population=changed.population, pipeline=replace(config.pipeline, customer=("bus", "cat")))
    with pytest.raises(ConfigError, match=r"unknown key simulation.num_round\b"):
        from_flat({**flat, "simulation.num-round": 3}, RunConfig)
    with pytest.raises(ConfigError, match=r"simulation.merge = 'krum'"):
        from_flat({**flat, "simulation.merge": "krum"}, RunConfig)
    with pytest.raises(ConfigError, match=r"pipeline.rd.epochs: expected an integer, got 'two'"):
        load_config(ROOT / "experiments/configs/federation.toml", {"pipeline.rd.epochs": "two"}, cls=RunConfig)
    with pytest.raises(ConfigError, match="simulation.deploy_mode"):
        replace(config, pipeline=replace(config.pipeline, distill_c_modes=("public",)))


def test_the_engine_lives_outside_the_core_and_never_reaches_a_customer(tmp_path):
    """Ray's resources, threads, worker processes and timeouts are ``[engine]`` (server.engine), not
    the algorithm's config: diredi_sim/ never names them, a customer's messages carry the
    algorithm's settings and its thread count only, an old config's key says where it went, and an
    old run folder still resumes."""
    import json

    from diredi_sim.runs import write_config
    from experiments.resume import load_run_config

    engine_keys = ("client_cpus", "client_gpus", "client_threads", "num_cpus", "ray_address", "server_workers", "round_timeout")
    for path in sorted((ROOT / "diredi_sim").rglob("*.py")):
        text = path.read_text()
        assert not [key for key in engine_keys if key in text], path
    config = load_config(ROOT / "experiments/configs/federation.toml", {"engine.client-threads": 3, "engine.round-timeout": 60},
                         cls=RunConfig)
    assert config.engine == EngineConfig(client_threads=3, round_timeout=60.0)
    settings = customer_settings(config)
    assert settings["client-threads"] == 3 and not [k for k in settings if k.startswith("engine.")]
    assert from_flat({k: v for k, v in settings.items() if k != "client-threads"}, FederationConfig) == algorithm_config(config)
    assert algorithm_config(config).simulation == config.simulation and type(algorithm_config(config)) is FederationConfig

    old = tmp_path / "old.toml"
    old.write_text("[simulation]\nnum_rounds = 2\nclient_cpus = 2.0\n")
    with pytest.raises(ConfigError, match=r"old\.toml: simulation\.client_cpus has moved: it is engine\.client_cpus now$"):
        load_config(old, cls=RunConfig)
    with pytest.raises(ConfigError, match=r"engine\.client_threads = 0: must be >= 1"):
        load_config(ROOT / "experiments/configs/federation.toml", {"engine.client-threads": 0}, cls=RunConfig)
    # a run folder written before the move (its config.json has them under simulation) resumes
    folder = tmp_path / "run"
    folder.mkdir()
    write_config(folder, config)
    data = json.loads((folder / "config.json").read_text())
    data["simulation"].update(data.pop("engine"))
    (folder / "config.json").write_text(json.dumps(data))
    assert load_run_config(folder) == config


def test_flwr_run_reads_the_config_file_and_overrides_exactly_as_the_command_line(caplog):
    """``flwr run .`` reads pyproject's three run_config keys; its config is the one
    ``diredi-sim simulate experiments/configs/demo.toml`` reads, and ``set`` means what ``--set``
    means (same parser, same keys); every mistake names its key."""
    from diredi_sim.config import parse_overrides
    from experiments.api import load_federation
    from server.server_app import read_run_config, warn_ray_only_settings

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.server_app:app", "clientapp": "clients.client_app:app"}
    assert app["config"] == {"config-file": "experiments/configs/demo.toml", "set": "", "method": "diredi"}
    demo = ROOT / "experiments/configs/demo.toml"
    assert read_run_config(app["config"]) == (load_federation(demo), "diredi")

    pairs = ["simulation.num_rounds=3", "pipeline.rd.epochs=2", 'name="two words"', "engine.client_cpus=2"]
    config, method = read_run_config({"config-file": str(demo), "method": "fedprox",
                                      "set": "simulation.num_rounds=3 pipeline.rd.epochs=2 'name=\"two words\"' engine.client_cpus=2"})
    assert method == "fedprox" and config == load_federation(demo, parse_overrides(pairs))
    assert (config.simulation.num_rounds, config.pipeline.rd.epochs, config.name) == (3, 2, "two words")
    with caplog.at_level("WARNING", logger="server.server_app"):  # a Ray setting: Flower's options decide under flwr run
        assert warn_ray_only_settings(config) == ["engine.client_cpus = 2.0"]
    assert "engine.client_cpus = 2.0 has no effect under flwr run" in caplog.text
    assert warn_ray_only_settings(load_federation(demo)) == []

    for run_config, named in [({**app["config"], "simulation.num-rounds": 2}, "unknown key(s) ['simulation.num-rounds']"),
                              ({**app["config"], "method": "local"}, "method = 'local'"),
                              ({**app["config"], "config-file": "no/such.toml"}, "config-file = 'no/such.toml'"),
                              ({**app["config"], "config-file": ""}, "config-file is empty"),
                              ({**app["config"], "set": "simulation.num_round=2"}, "run_config set: unknown key simulation.num_round"),
                              ({**app["config"], "set": "rounds"}, "run_config set 'rounds': expected KEY=VALUE"),
                              ({**app["config"], "set": "name='open"}, "run_config set")]:
        with pytest.raises(ConfigError, match=re.escape(named)):
            read_run_config(run_config)
