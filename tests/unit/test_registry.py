"""The algorithm registry is the one source of algorithm names: registration rules, lookups, the README."""

from pathlib import Path

import pytest

from lightning_firecaffe.comm.schedules import (
    algorithm_names,
    auto_candidates,
    get_algorithm,
    markdown_table,
    register_algorithm,
    whole_buffer,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_algorithm_table_is_the_registry():
    assert markdown_table() in README.read_text(), "regenerate with: python -m lightning_firecaffe.comm.schedules"


@pytest.mark.parametrize("name", ["auto", "Tree", "two-level", ""])
def test_names_must_be_lower_case_identifiers_other_than_auto(name):
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_algorithm(name, chunking=whole_buffer, summary="")


def test_a_taken_name_needs_override():
    existing = get_algorithm(algorithm_names()[0])
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm(existing.name, chunking=whole_buffer, summary="")(existing.build)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError) as err:
        get_algorithm("butterfly")
    assert all(name in str(err.value) for name in algorithm_names())


def test_auto_weighs_what_each_algorithm_declares():
    for world_size, ranks_per_node in ((8, 1), (8, 2)):
        expected = {a for a in algorithm_names() if get_algorithm(a).considered_by_auto(world_size, ranks_per_node)}
        assert set(auto_candidates(world_size, ranks_per_node)) == expected
    assert set(auto_candidates(8, 1)) < set(auto_candidates(8, 2)), "some algorithm needs several ranks per node"
    assert set(auto_candidates(8, 2)) < set(algorithm_names()), "some algorithm is never weighed by auto"


def test_unregistering_an_algorithm_removes_its_strategy_name_and_a_plugin_sorts_after_the_builtins():
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_firecaffe.comm.schedules import (
        algorithm_names,
        get_algorithm,
        register_algorithm,
        unregister_algorithm,
        whole_buffer,
    )

    builtins = algorithm_names()
    register_algorithm("aaa_plugin", chunking=whole_buffer, summary="a plugin")(get_algorithm("tree").build)
    try:
        assert algorithm_names() == (*builtins, "aaa_plugin")  # order 100 > every built-in, whatever its name
        assert "firecaffe_aaa_plugin" in StrategyRegistry
    finally:
        unregister_algorithm("aaa_plugin")
    assert "firecaffe_aaa_plugin" not in StrategyRegistry and algorithm_names() == builtins
    assert builtins[:3] == ("tree", "pipelined_tree", "double_tree") and builtins[-1] == "native"
