"""flava.configbase: the one deep merge that presets and overrides go through."""
from flava.configbase import deep_merge


def test_deep_merge_lays_nested_values_over_a_copy():
    base = {"a": {"b": 1, "c": [1]}, "d": 2}
    top = {"a": {"b": 5, "e": {"f": 1}}, "d": {"g": 3}}
    out = deep_merge(base, top)
    assert out == {"a": {"b": 5, "c": [1], "e": {"f": 1}}, "d": {"g": 3}}
    out["a"]["c"].append(2)
    out["a"]["e"]["f"] = 9
    assert base == {"a": {"b": 1, "c": [1]}, "d": 2} and top["a"]["e"] == {"f": 1}
