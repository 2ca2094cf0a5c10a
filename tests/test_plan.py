"""The precision plan: the manual's Python function, JSON/TOML rules, presets, and bad plans."""

from __future__ import annotations

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.graph.units import Unit, plan_units
from edgellm.quant.plan import PrecisionPlan, presets

MANUAL_STYLE = '''
def get_layer_configuration(model_properties, layer):
    assert layer["part"] in ("PRE", "CACHE", "POST"), layer  # the manual's parts only
    if layer["is_group"]:
        return {"precision": "A_BF16_W_INT8"}
    last = layer["index"] == model_properties["num_hidden_layers"] - 1
    return {"precision": "BF16" if last else "A_BF16_W_INT4", "compile": True, "lora": "LORA_DISABLED"}
'''
RULES_JSON = '''{"default": {"precision": "A_BF16_W_INT4"},
 "rules": [{"match": {"is_group": true}, "set": {"precision": "A_BF16_W_INT8"}},
           {"match": {"is_group": false, "index": 2}, "set": {"precision": "BF16"}}]}'''
RULES_TOML = '''
[default]
precision = "A_BF16_W_INT4"

[[rules]]
match = {is_group = true}
set = {precision = "A_BF16_W_INT8"}

[[rules]]
match = {is_group = false, index = 2}
set = {precision = "BF16"}
'''


def _choices(plan: PrecisionPlan) -> dict[str, str]:
    return {u.name: plan.choice(u).precision for u in plan_units(3, [32])}


@pytest.fixture
def plans(tmp_path):
    files = {"py": MANUAL_STYLE, "json": RULES_JSON, "toml": RULES_TOML}
    for suffix, body in files.items():
        (tmp_path / f"plan.{suffix}").write_text(body)
    return {suffix: tmp_path / f"plan.{suffix}" for suffix in files}


def test_python_json_and_toml_plans_agree(plans):
    py, js, toml = (_choices(PrecisionPlan(plans[k], 3)) for k in ("py", "json", "toml"))
    assert py == js == toml
    assert py["group/layer002_post"] == "A_BF16_W_INT8"
    assert py["single/layer001_pre"] == "A_BF16_W_INT4" and py["single/layer002_cache_kv00032"] == "BF16"
    # embedding table and LM head are not layers: float unless --quantize_embeddings
    assert py["group/embed"] == py["single/head"] == "BF16"
    int8 = _choices(PrecisionPlan(plans["json"], 3, quantize_embeddings="int8"))
    assert int8["single/head"] == int8["group/embed"] == "A_BF16_W_INT8"
    int4 = _choices(PrecisionPlan(plans["json"], 3, quantize_embeddings="int4"))
    assert int4["single/head"] == "A_BF16_W_INT4" and int4["group/embed"] == "A_BF16_W_INT8"


def test_all_fp32_layers_keep_fp32_embeddings(tmp_path):
    (tmp_path / "fp32.json").write_text('{"default": {"precision": "FP32"}}')
    assert set(_choices(PrecisionPlan(tmp_path / "fp32.json", 3)).values()) == {"FP32"}


def test_presets_by_name():
    assert {"recommended", "int4", "int8", "fp32"} <= set(presets())
    choices = _choices(PrecisionPlan("recommended", 3))
    assert choices["group/layer000_pre"] == "A_BF16_W_INT8" and choices["single/layer000_pre"] == "A_BF16_W_INT4"
    with pytest.raises(EdgeLLMError, match="configuration file not found .presets: .*recommended"):
        PrecisionPlan("no-such-preset", 3)


@pytest.mark.parametrize("body,needle", [
    ("def get_layer_configuration(p, layer):\n    return {'precision': 'INT3'}", "unknown precision 'INT3'"),
    ("def get_layer_configuration(p, layer):\n    return 'INT4'", "expected a dict, got str"),
    ("def get_layer_configuration(p, layer):\n    return {'precision': 'BF16', 'speed': 1}", "unknown keys ['speed']"),
    ("def get_layer_configuration(p, layer):\n    return {'compile': 'yes'}", "'compile' must be true or false"),
    ("def get_layer_configuration(p, layer):\n    return {'lora': 'LORA_ON'}", "unsupported lora mode 'LORA_ON'"),
    ("def get_layer_configuration(p, layer):\n    return 1 / 0", "get_layer_configuration raised ZeroDivisionError"),
])
def test_bad_values_name_the_layer_and_the_file(tmp_path, body, needle):
    path = tmp_path / "bad.py"
    path.write_text(body)
    with pytest.raises(EdgeLLMError) as info:
        PrecisionPlan(path, 3).choice(Unit(False, "POST", 1))
    message = str(info.value)
    assert str(path) in message and needle in message
    assert "'part': 'POST'" in message and "'index': 1" in message


@pytest.mark.parametrize("name,body,needle", [
    ("plan.py", "x = (", "configuration file raised SyntaxError"),
    ("plan.py", "x = 1", "defines no get_layer_configuration"),
    ("plan.json", "{", "malformed JSON"),
    ("plan.toml", "[default", "malformed TOML"),
    ("plan.json", '{"rules": {"match": {}}}', "expected {\"default\""),
])
def test_unreadable_plans_are_user_errors(tmp_path, name, body, needle):
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(EdgeLLMError, match=None) as info:
        PrecisionPlan(path, 3)
    assert str(path) in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize("body", ['{"default": "A_BF16_W_INT4"}', '{"rules": ["x"]}', '{"rules": [{"match": "group"}]}'])
def test_malformed_rules_are_user_errors(tmp_path, body):
    path = tmp_path / "plan.json"
    path.write_text(body)
    with pytest.raises(EdgeLLMError, match="plan.json: expected"):
        PrecisionPlan(path, 3)


def test_a_python_plan_that_never_answers_is_stopped(tmp_path, monkeypatch):
    from edgellm.quant import plan

    monkeypatch.setattr(plan, "PLAN_SECONDS", 2)
    path = tmp_path / "loop.py"
    path.write_text("def get_layer_configuration(p, layer):\n    while True:\n        pass\n")
    with pytest.raises(EdgeLLMError, match=r"loop\.py: the configuration file did not answer within 2 s"):
        PrecisionPlan(path, 3)


def test_a_python_plan_that_eats_memory_is_stopped(tmp_path):
    path = tmp_path / "greedy.py"
    path.write_text("x = 'a' * (10 ** 10)\n")
    with pytest.raises(EdgeLLMError, match=r"greedy\.py: configuration file raised MemoryError"):
        PrecisionPlan(path, 3)


def test_a_python_plan_runs_once_per_build(tmp_path):
    from conftest import build
    from tiny_models import save_tiny

    count = tmp_path / "runs.txt"
    path = tmp_path / "counting.py"
    path.write_text(f"open({str(count)!r}, 'a').write('x')\n"
                    "def get_layer_configuration(p, layer):\n    return {'precision': 'FP32'}\n")
    build(save_tiny("llama", tmp_path / "model"), tmp_path / "out", path, max_num_tokens=64, language_group_size=16,
          future_token_mask_size=64)
    assert count.read_text() == "x"


@pytest.mark.parametrize("name,body,needle", [
    ("plan.txt", "def get_layer_configuration(p, l):\n    return {}", "unsupported configuration file type '.txt'"),
    ("plan.yaml", "default: {}", "unsupported configuration file type '.yaml'"),
    ("plan.json", '{"defualt": {"precision": "FP32"}}', "unknown keys ['defualt']"),
    ("plan.json", '{"rules": [{"when": {"is_group": true}, "set": {}}]}', "rule 0 has unknown keys ['when']"),
    ("plan.json", '{"rules": [{"match": {"layer": 1}, "set": {}}]}', "rule 0 matches unknown keys ['layer']"),
    ("plan.toml", '[defualt]\nprecision = "FP32"', "unknown keys ['defualt']"),
])
def test_plans_with_unknown_keys_or_types_are_refused(tmp_path, name, body, needle):
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(EdgeLLMError) as info:
        PrecisionPlan(path, 3)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_a_file_named_like_a_preset_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "int4").write_text("import os; os._exit(3)")  # would be run as Python before
    assert set(_choices(PrecisionPlan("int4", 3)).values()) >= {"A_BF16_W_INT4"}
