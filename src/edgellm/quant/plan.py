"""The per-layer precision plan: which precision each unit's weights get.

A plan is the compile manual's configuration file: a Python file defining
get_layer_configuration(model_properties, layer) -> {"precision", "compile", "lora"}, or the same
as rules in JSON or TOML (no code executed): {"default": {...}, "rules": [{"match": {...}, "set": {...}}]}
where a rule applies when every key in "match" equals the layer's value; later rules win.
A bare name (-c int4) picks one of the presets shipped in quant/presets/.

Without a plan every layer gets the source's default: BF16 for a Hugging Face model (the
manual's default), SOURCE for a GGUF (its own types, "quantization already applied").

The plan speaks for the transformer layers (parts PRE, CACHE, POST), as in the manual. The
embedding table and the LM head are not layers: they follow the layers when all are FP32 or all
SOURCE, and are otherwise BF16, unless --quantize_embeddings makes them integer: int8 for both, or with
--quantize_embeddings int4 an int4 LM head (the table stays int8: a lookup reads one row, so its
width costs memory, not speed, and int4 rows would need an int4 Gather).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeLLMError
from ..graph.units import Unit
from .precision import PRECISIONS

DEFAULT_PRECISION = "BF16"  # the compile manual's default when no configuration file is given
EMBEDDING_WIDTHS = {"int8": "A_BF16_W_INT8", "int4": "A_BF16_W_INT4"}  # --quantize_embeddings [int8|int4]
LORA_MODES = ("LORA_DISABLED", "LORA_BRANCH", "LORA_MERGED")  # quant/adapters.py
PRESETS_DIR = Path(__file__).parent / "presets"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


@dataclass(frozen=True)
class LayerChoice:
    precision: str
    compile: bool = True
    lora: str = "LORA_DISABLED"


@dataclass(frozen=True)
class ResolvedPlan:
    """The plan's answer for every unit of one build, asked once (a .py plan runs once per
    build); the stages and targets read it."""
    choices: dict[str, LayerChoice]

    def choice(self, unit: Unit) -> LayerChoice:
        return self.choices[unit.name]


class PrecisionPlan:
    def __init__(self, path: Path | None = None, num_layers: int = 0, quantize_embeddings: str | None = None,
                 default: str = DEFAULT_PRECISION, vision_layers: int = 0):
        self.path = path
        self.default = default  # every layer's precision without a plan
        self.props = {"num_hidden_layers": num_layers}
        if vision_layers:
            self.props["vision_layers"] = vision_layers
        self.quantize_embeddings = quantize_embeddings
        self._float_embeddings: str | None = None  # FP32 or BF16, decided once from the layers
        self._vision: str | None = None  # the image encoder's embedding and projector, decided once
        self._answers: dict | None = None  # a .py plan's answer per layer (_run_python_plan)
        self._rules: dict | None = None
        if path is None:
            return
        path = Path(path)
        if path.name == str(path) and str(path) in presets():  # a bare preset name is the preset, whatever cwd holds
            path = self.path = PRESETS_DIR / f"{path}.json"
        if not path.is_file():
            raise EdgeLLMError(f"{path}: configuration file not found (presets: {', '.join(presets())})")
        if path.suffix in (".json", ".toml"):
            self._rules = _read_rules(path)
        elif path.suffix == ".py":
            self._answers = _run_python_plan(path, self.props, self._layers(vision_layers))
        else:
            raise EdgeLLMError(f"{path}: unsupported configuration file type '{path.suffix}' (use .py, .json or .toml)")

    def _layers(self, vision_layers: int) -> list[dict]:
        """Every layer the plan is asked about, as the manual's dicts."""
        layers = [{"part": part, "is_group": group, "index": i} for group in (True, False)
                  for part in ("PRE", "CACHE", "POST") for i in range(self.props["num_hidden_layers"])]
        return layers + [{"part": "VISION", "is_group": True, "index": i} for i in range(vision_layers)]

    def resolve(self, units: list[Unit]) -> ResolvedPlan:
        return ResolvedPlan({unit.name: self.choice(unit) for unit in units})

    def choice(self, unit: Unit) -> LayerChoice:
        if unit.part in ("VISION_EMBED", "PROJECTOR"):
            return LayerChoice(self._vision_precision())
        if unit.part not in ("PRE", "CACHE", "POST", "VISION"):
            return LayerChoice(self._embedding_precision(unit.part))
        layer = {"part": unit.part, "is_group": unit.is_group, "index": unit.index}
        if self.path is None:
            raw = {"precision": self.default}
        elif self._answers is not None:
            answer = self._answers[_layer_key(layer)]
            if "raised" in answer:
                raise EdgeLLMError(f"{self.path}: get_layer_configuration raised {answer['raised']} for layer {layer}")
            raw = answer["value"]
        else:
            raw = dict(self._rules.get("default", {}))
            for rule in self._rules.get("rules", []):
                if all(layer.get(k) == v for k, v in rule.get("match", {}).items()):
                    raw.update(rule.get("set", {}))
        return self._validate(raw, layer)

    def _embedding_precision(self, part: str) -> str:
        if self.quantize_embeddings:
            return EMBEDDING_WIDTHS[self.quantize_embeddings if part == "HEAD" else "int8"]
        if self._float_embeddings is None:  # asks the plan about every layer: once per plan
            layers = [Unit(g, p, i) for g in (True, False) for p in ("PRE", "POST") for i in range(self.props["num_hidden_layers"])]
            precisions = {self.choice(u).precision for u in layers}
            self._float_embeddings = precisions.pop() if precisions in ({"FP32"}, {"SOURCE"}) else "BF16"
        return self._float_embeddings

    def _vision_precision(self) -> str:
        """The patch embedding and the projector follow the image encoder's layers when those agree,
        and are BF16 otherwise."""
        if self._vision is None:
            precisions = {self.choice(Unit(True, "VISION", i)).precision for i in range(self.props["vision_layers"])}
            self._vision = precisions.pop() if len(precisions) == 1 else "BF16"
        return self._vision

    def _validate(self, raw, layer) -> LayerChoice:
        where = f"{self.path}: layer {layer}"
        if not isinstance(raw, dict):
            raise EdgeLLMError(f"{where}: expected a dict, got {type(raw).__name__}")
        unknown = set(raw) - {"precision", "compile", "lora"}
        if unknown:
            raise EdgeLLMError(f"{where}: unknown keys {sorted(unknown)}")
        precision = raw.get("precision", self.default)
        if precision not in PRECISIONS:
            raise EdgeLLMError(f"{where}: unknown precision {precision!r} (supported: {', '.join(PRECISIONS)})")
        compile_ = raw.get("compile", True)
        if not isinstance(compile_, bool):
            raise EdgeLLMError(f"{where}: 'compile' must be true or false")
        lora = raw.get("lora", "LORA_DISABLED")
        if lora not in LORA_MODES:
            raise EdgeLLMError(f"{where}: unsupported lora mode {lora!r} (supported: {', '.join(LORA_MODES)})")
        return LayerChoice(precision, compile_, lora)


def _layer_key(layer: dict) -> str:
    return f"{layer['part']}:{layer['is_group']}:{layer['index']}"


RULE_KEYS = {"match", "set", "_comment"}
MATCH_KEYS = {"part", "is_group", "index"}


def _read_rules(path: Path) -> dict:
    """A JSON / TOML plan, its shape checked: unknown keys are errors, not silently ignored."""
    try:
        rules = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"{path}: malformed {path.suffix[1:].upper()} ({e})") from None
    listed = rules.get("rules", []) if isinstance(rules, dict) else None
    well_formed = (
        isinstance(listed, list) and isinstance(rules.get("default", {}), dict)
        and all(isinstance(r, dict) and isinstance(r.get("match", {}), dict) and isinstance(r.get("set", {}), dict)
                for r in listed)
    )
    if not well_formed:
        raise EdgeLLMError(f"{path}: expected {{\"default\": {{...}}, \"rules\": [{{\"match\": {{...}}, \"set\": {{...}}}}]}}")
    unknown = set(rules) - {"default", "rules", "_comment"}
    if unknown:
        raise EdgeLLMError(f"{path}: unknown keys {sorted(unknown)} (a plan has \"default\" and \"rules\")")
    for k, rule in enumerate(listed):
        if set(rule) - RULE_KEYS:
            raise EdgeLLMError(f"{path}: rule {k} has unknown keys {sorted(set(rule) - RULE_KEYS)} (use \"match\" and \"set\")")
        if set(rule.get("match", {})) - MATCH_KEYS:
            raise EdgeLLMError(f"{path}: rule {k} matches unknown keys {sorted(set(rule['match']) - MATCH_KEYS)} "
                               f"(a layer has {', '.join(sorted(MATCH_KEYS))})")
    return rules


# A .py plan is the user's code: it runs in a child process, once per build, with a time and a
# memory limit, and answers for every layer at once (the answers must be plain data).
PLAN_SECONDS = 20  # (a plan answers a few hundred questions: seconds would be generous)
PLAN_MEMORY = 2 << 30
_PLAN_RUNNER = """
import json, runpy, sys
request = json.load(sys.stdin)
try:
    function = runpy.run_path(request["path"]).get("get_layer_configuration")
except BaseException as e:
    print(json.dumps({"failed": f"configuration file raised {type(e).__name__}: {e}"})); sys.exit()
if not callable(function):
    print(json.dumps({"failed": "defines no get_layer_configuration(model_properties, layer)"})); sys.exit()
answers = {}
for layer in request["layers"]:
    key = f"{layer['part']}:{layer['is_group']}:{layer['index']}"
    try:
        value = function(dict(request["props"]), dict(layer))
        json.dumps(value)
        answers[key] = {"value": value}
    except BaseException as e:
        answers[key] = {"raised": f"{type(e).__name__}: {e}"}
print(json.dumps({"answers": answers}))
"""


def _run_python_plan(path: Path, props: dict, layers: list[dict]) -> dict:
    import resource
    import subprocess
    import sys

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (PLAN_MEMORY, PLAN_MEMORY))

    request = json.dumps({"path": str(path), "props": props, "layers": layers})
    try:
        run = subprocess.run([sys.executable, "-c", _PLAN_RUNNER], input=request, capture_output=True, text=True,
                             timeout=PLAN_SECONDS, preexec_fn=limits)
    except subprocess.TimeoutExpired:
        raise EdgeLLMError(f"{path}: the configuration file did not answer within {PLAN_SECONDS} s") from None
    try:
        result = json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeLLMError(f"{path}: the configuration file ended without an answer ({last[:200]})") from None
    if "failed" in result:
        raise EdgeLLMError(f"{path}: {result['failed']}")
    return result["answers"]
