"""The federation's plain-torch side: population, config in its three forms, seeds, pyproject's
Flower section."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from diredi_sim.config import ConfigError
from diredi_sim.data.splits import SPLIT_PRESETS
from diredi_sim.seeds import Seeds, derive_seed
from diredi_sim.federation import (FederationConfig, PopulationConfig, build_population, effective_pipeline,
                                   federation_from_flat, federation_to_flat, load_federation_config, parse_customer,
                                   pick_share)

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
    config = load_federation_config(ROOT / "experiments/configs/federation.toml")
    flat = federation_to_flat(config)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())  # what run_config / ConfigRecord hold
    assert federation_from_flat(flat) == config
    changed = federation_from_flat({**flat, "simulation.num-rounds": 3, "population.customers": "exp2,dog+cat",
                                    "pipeline.verify.critical-classes": "bus,person"})
    assert changed.simulation.num_rounds == 3 and changed.population.customers == ("exp2", "dog+cat")
    assert changed.pipeline.verify.critical_classes == ("bus", "person")
    with pytest.raises(ConfigError, match=r"unknown key simulation.num_round\b"):
        federation_from_flat({**flat, "simulation.num-round": 3})
    with pytest.raises(ConfigError, match=r"simulation.merge = 'krum'"):
        federation_from_flat({**flat, "simulation.merge": "krum"})
    with pytest.raises(ConfigError, match=r"pipeline.rd.epochs: expected an integer, got 'two'"):
        load_federation_config(ROOT / "experiments/configs/federation.toml", {"pipeline.rd.epochs": "two"})
    with pytest.raises(ConfigError, match="simulation.deploy_mode"):
        replace(config, pipeline=replace(config.pipeline, distill_c_modes=("public",)))


def test_pyproject_flower_section_is_the_demo_config():
    """``flwr run .`` reads [tool.flwr.app.config]; it must hold exactly the demo config's keys
    and values (Flower only accepts --run-config overrides of keys listed there)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.server_app:app", "clientapp": "clients.client_app:app"}
    flat_pyproject = _flatten(app["config"])
    expected = federation_to_flat(load_federation_config(ROOT / "experiments/configs/demo.toml"))
    assert flat_pyproject == expected


def _flatten(table: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
