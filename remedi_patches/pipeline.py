"""The training pipeline's logic (train_pipeline.py is its command line): the YAML schema, its validation against
each trainer's own parser and config, the hand-offs between stages, and the commands.

    config = load_config("configs/embedded.yaml", sets=["sft.max_steps=2"])   # dict, overrides applied
    plans = build_plan(config, "all")        # one StagePlan per stage to run, checked, inputs handed on
    for p in plans: print(shlex.join(p.command(sys.executable)))

The YAML: `out_dir` (root: stage S writes under <out_dir>/S unless its section sets out_dir), `model` and `data`
(flags given to every stage whose trainer has them, unless the stage sets them or takes them as a hand-off), and one
section per stage (pretrain, sft, remask_sft, rl, eval, inference) whose keys are that script's flags without the
dashes (`lr: 1e-3`, `add_ups_stream: true`, `confidence_sources: [ups, tps_prob]`) plus `enabled: false` to leave
the stage out. A stage absent from the file is not part of the pipeline. Every key is checked against the script's
own parser (build_parser(); unknown keys get the closest valid name), every value by the parser's type and choices
and then by the trainer's config check (`MDMConfig.check()`, ...), so the schema is the trainers' and never drifts.

Hand-offs: a stage's input flags (KINDS[stage].inputs) default to the Product of the nearest earlier enabled stage
that makes a model (all but eval and inference), e.g. sft.pretrained_path = <pretrain export>, rl.model_name +
rl.ups_head = the backbone and head of a head-only remask_sft, unless the stage sets one of them itself. Inputs
that do not exist yet (made by an earlier stage of this run) are checked when the stage starts; running a stage
alone needs the earlier stage's output on disk (else an error naming the command to run first).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

from remedi_patches.cli import UserError, config_from_args

REPO = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "remask_sft", "rl", "eval", "inference")
ALIASES = {"pretraining": "pretrain", "all": "all"}  # the seeds' names (llada_training_readme.md)
SHARED = ("model", "data")
TOP_LEVEL = ("out_dir", *SHARED, *STAGES)
ENABLED = "enabled"
DEFAULT_OUT = "out/pipeline"
# the seeds' training scripts' flags (llada_training_readme.md) -> the project's, for the unknown-key hint only
SEED_KEYS = {"learning_rate": "lr", "output_dir": "out_dir", "model_name_or_path": "model_name",
             "train_data_path": "dataset", "batch_size": "global_batch_size"}


@dataclass(frozen=True)
class Product:
    """What a stage hands on: a model (folder or name), with the UPS head and LoRA adapter it trained, if any."""
    model: str
    ups_head: Optional[str] = None
    lora: Optional[str] = None

    def paths(self) -> list[str]:
        return [p for p in (self.model, self.ups_head, self.lora) if p is not None]


@dataclass(frozen=True)
class StageKind:
    """A stage's script, how its flags are checked (the config dataclass in the script's module, or a function of
    the module and the parsed namespace), which flags take a Product's parts, and what it produces."""
    script: str
    config: Optional[str] = None                        # name of the config dataclass in the script's module
    check: Optional[Callable[[ModuleType, argparse.Namespace], Any]] = None
    inputs: Mapping[str, str] = dataclasses.field(default_factory=dict)  # Product field -> flag dest
    product: Optional[Callable[[Any, dict], Product]] = None  # (checked config, input dest -> value) -> Product
    results: Optional[str] = None                       # the file under out_dir that marks a finished stage


@dataclass
class StagePlan:
    """One resolved stage: the script, its flags, where it writes, what it takes and gives."""
    name: str
    script: str
    argv: list[str]
    out_dir: Optional[Path]
    product: Optional[Product]
    writes: list[str]                                   # what marks it finished: the files and folders it makes
    source: Optional[str] = None                        # the earlier stage whose output it takes
    handed: dict[str, str] = dataclasses.field(default_factory=dict)  # flag dest -> handed-on path

    def command(self, python: str = "python") -> list[str]:
        """The command line; the script relative to the working directory when it is inside the repo."""
        script = REPO / self.script
        if Path.cwd().resolve().is_relative_to(REPO):
            script = Path(os.path.relpath(script))
        return [python, str(script), *self.argv]


# ---------------------------------------------------------------- the stages


def _export(cfg, inputs: dict) -> Product:
    return Product(str(cfg.export_dir or Path(cfg.out_dir) / "final"))


def is_dual_stream(model: str) -> bool:
    """Whether `model` (a shipped name or an SMDM folder) is a dual-stream RemeDi, from its smdm_config.json."""
    from lit_gpt.model import CONFIG_FILE, load_smdm_config
    from remedi_patches.backbones import EMBEDDED_NAMES

    folder = EMBEDDED_NAMES.get(model, Path(model))
    return (folder / CONFIG_FILE).is_file() and load_smdm_config(folder).ups_positions is not None


def _remask_product(cfg, inputs: dict) -> Product:
    """train_remedi.py writes a model folder when the weights train (full mode, or a dual-stream model), else a UPS
    head (and, in joint / alternating, an adapter) for the unchanged input model."""
    model = inputs["model_name"]
    if cfg.add_ups_stream or cfg.train_mode == "full" or is_dual_stream(model):
        return Product(str(cfg.model_dir))
    return Product(model, str(cfg.head_path), None if cfg.lora_dir is None else str(cfg.lora_dir))


def _rl_product(cfg, inputs: dict) -> Product:
    """train_rl.py writes the trained model (full) or an adapter for the input model (lora), with the UPS head beside
    it when one was given (it trains too)."""
    from remedi_patches.modeling_wrappers import HEAD_FILE_NAME

    head = str(cfg.output_dir / HEAD_FILE_NAME) if inputs["ups_head"] is not None else None
    if cfg.train_weights == "full":
        return Product(str(cfg.output_dir), head)
    return Product(inputs["model_name"], head, str(cfg.output_dir))


def _check_eval(module: ModuleType, ns: argparse.Namespace) -> argparse.Namespace:
    if ns.max_samples < 0 or ns.infer_bs < 1:
        raise UserError(f"max_samples must be >= 0 and infer_bs >= 1, got {ns.max_samples}, {ns.infer_bs}")
    module.runs_and_settings(ns)
    module.model_spec_from_args(ns)
    return ns


def _check_generate(module: ModuleType, ns: argparse.Namespace) -> argparse.Namespace:
    module.check_sampler_args(ns)
    module.model_spec_from_args(ns)
    return ns


EVAL_INPUTS = {"model": "model_name", "ups_head": "ups_head_path", "lora": "lora_path"}
KINDS = {
    "pretrain": StageKind("SMDM/pretrain/train_mdm.py", config="MDMConfig", product=_export),
    "sft": StageKind("SMDM/sft/train_sft.py", config="SFTConfig", inputs={"model": "pretrained_path"},
                     product=_export),
    "remask_sft": StageKind("SMDM/pretrain/train_remedi.py", config="RemaskConfig",
                            inputs={"model": "model_name", "ups_head": "load_ups_head", "lora": "load_lora_dir"},
                            product=_remask_product),
    "rl": StageKind("SMDM/rl/train_rl.py", config="RLConfig",
                    inputs={"model": "model_name", "ups_head": "ups_head", "lora": "load_lora_dir"},
                    product=_rl_product),
    "eval": StageKind("eval_gsm_math.py", check=_check_eval, inputs=EVAL_INPUTS, results="summary.json"),
    "inference": StageKind("generate.py", check=_check_generate, inputs=EVAL_INPUTS),
}


def load_script(relpath: str) -> ModuleType:
    """The repo's script `relpath` imported as the module named by its stem (cached in sys.modules; the tests'
    trainer_helpers.load_script shares the cache)."""
    path = REPO / relpath
    module = sys.modules.get(path.stem)
    if getattr(module, "__file__", None) == str(path):
        return module
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _RaisingParser:
    """A stage script's parser whose errors raise UserError (named by the stage) instead of exiting."""

    def __init__(self, stage: str):
        self.stage = stage
        self.module = load_script(KINDS[stage].script)
        self.parser = self.module.build_parser()
        self.parser.error = self._error  # argparse calls self.error(message)

    def _error(self, message: str):
        raise UserError(f"{self.stage}: {message}")

    def actions(self) -> dict[str, argparse.Action]:
        """Every name a YAML key may use (dest and option strings without dashes) -> its action."""
        names: dict[str, argparse.Action] = {}
        for action in self.parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for name in (action.dest, *(o.lstrip("-") for o in action.option_strings)):
                names.setdefault(name, action)
        return names


# ---------------------------------------------------------------- the YAML


def closest(name: str, known: Sequence[str]) -> str:
    """'; did you mean X?' for the nearest known name (or the project's name of a seeds' key near it, SEED_KEYS),
    else '; valid keys: a, b, ...'."""
    seeds = {seed: ours for seed, ours in SEED_KEYS.items() if ours in known}
    match = difflib.get_close_matches(name, [*known, *seeds], n=1, cutoff=0.5)
    if not match:
        return f"; valid keys: {', '.join(sorted(known))}"
    return f"; did you mean {seeds.get(match[0], match[0])}?"


def parse_set(text: str) -> tuple[list[str], Any]:
    """`--set sft.max_steps=2` -> (['sft', 'max_steps'], 2): the value read as YAML (a scalar, or a flow list or
    mapping)."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"--set {text!r}: expected KEY=VALUE or STAGE.KEY=VALUE, e.g. --set sft.max_steps=2")
    try:
        return parts, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise UserError(f"--set {text!r}: the value is not YAML ({err.__class__.__name__})") from None


def apply_sets(config: dict, sets: Sequence[str]) -> dict:
    """`config` with each --set applied (sections created as needed; a mapping value is merged into the mapping
    there: `--set 'sft={max_steps: 2, limit: 16}'` keeps sft's other keys); returns it."""
    for text in sets:
        parts, value = parse_set(text)
        node = config
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UserError(f"--set {text!r}: {'.'.join(parts[:-1])} is not a mapping in the config")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return config


def read_config(path: str | Path) -> dict:
    """The YAML file as a dict (FileNotFoundError / UserError naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file; pass a pipeline YAML, e.g. --config "
                                "configs/embedded.yaml")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML: {err}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: the top level must be a mapping of {', '.join(TOP_LEVEL)}")
    return config


def load_config(path: str | Path, sets: Sequence[str] = ()) -> dict:
    """read_config + apply_sets + check_layout."""
    return check_layout(apply_sets(read_config(path), sets))


def check_layout(config: dict) -> dict:
    """Top-level keys and section types (stage keys are checked against the stages' parsers by build_plan); a
    section left empty (`sft:`) becomes {}. Returns config."""
    for key in config:
        if key not in TOP_LEVEL:
            hint = f"; did you mean {ALIASES[key]}?" if key in ALIASES else closest(str(key), TOP_LEVEL)
            raise UserError(f"{key}: unknown top-level key{hint}")
    if not isinstance(config.get("out_dir", DEFAULT_OUT), (str, Path)):
        raise UserError(f"out_dir: expected a folder path, got {config['out_dir']!r}")
    for key in (*SHARED, *STAGES):
        if key in config and config[key] is None:
            config[key] = {}
        if key in config and not isinstance(config[key], dict):
            raise UserError(f"{key}: expected a mapping of flags (key: value), got {config[key]!r}")
    for stage in STAGES:
        enabled = config.get(stage, {}).get(ENABLED, True)
        if not isinstance(enabled, bool):
            raise UserError(f"{stage}.{ENABLED}: expected true or false, got {enabled!r}")
    return config


def flag_args(action: argparse.Action, value: Any, where: str) -> list[str]:
    """The command-line words of one YAML value for `action`, its type and choices checked (UserError naming
    `where`, the key path). None: the script's default (no words)."""
    opt = action.option_strings[0]
    if value is None:
        return []
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        switches_on = isinstance(action, argparse._StoreTrueAction)
        if value == switches_on:
            return [opt]
        if action.default is None or value == action.default:
            return []
        raise UserError(f"{where}: {opt} only switches it {'on' if switches_on else 'off'}; leave the key out")
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    values = value if isinstance(value, list) and many else [value]
    words = []
    for item in values:
        if isinstance(item, (dict, list)):
            raise UserError(f"{where}: expected {'a list of values' if many else 'one value'}, got {value!r}")
        text = str(item)
        converted = text
        if action.type is not None:
            try:
                converted = action.type(text)
            except (TypeError, ValueError):
                kind = getattr(action.type, "__name__", "value")
                raise UserError(f"{where}: {item!r} is not a valid {kind}") from None
        if action.choices is not None and converted not in action.choices:
            raise UserError(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        words.append(text)
    if isinstance(action, argparse._AppendAction):
        return [w for text in words for w in (opt, text)]
    return [opt, *words]


def stage_values(config: dict, stage: str, names: Mapping[str, argparse.Action], handed: Mapping[str, str]
                 ) -> dict[str, tuple[argparse.Action, Any, str]]:
    """dest -> (action, value, key path) of one stage: its section, then the hand-offs, then the shared `model` /
    `data` values its script takes; out_dir defaults to <out_dir>/<stage> when the script has one."""
    section = {k: v for k, v in config.get(stage, {}).items() if k != ENABLED}
    values: dict[str, tuple[argparse.Action, Any, str]] = {}
    for key, value in section.items():
        if key not in names:
            raise UserError(f"{stage}.{key}: unknown key{closest(str(key), [n for n in names if '-' not in n])}")
        action = names[key]
        if action.dest in values:
            raise UserError(f"{stage}.{key}: given twice (also as {values[action.dest][2]}); keep one")
        values[action.dest] = (action, value, f"{stage}.{key}")
    for dest, path in handed.items():
        values.setdefault(dest, (names[dest], path, f"{stage}.{dest} (handed on)"))
    for block in SHARED:
        for key, value in config.get(block, {}).items():
            if key in names:
                values.setdefault(names[key].dest, (names[key], value, f"{block}.{key}"))
    if "out_dir" in names:
        root = Path(config.get("out_dir", DEFAULT_OUT))
        values.setdefault("out_dir", (names["out_dir"], str(root / stage), f"{stage}.out_dir"))
    return values


def check_shared(config: dict, names: Mapping[str, Mapping[str, argparse.Action]]) -> None:
    """A `model` / `data` key that no stage of the file takes is an error (naming the closest flag)."""
    known = {n for per_stage in names.values() for n in per_stage if "-" not in n}
    for block in SHARED:
        for key in config.get(block, {}):
            if key not in known:
                raise UserError(f"{block}.{key}: no stage takes this flag{closest(str(key), sorted(known))}")


# ---------------------------------------------------------------- the plan


def in_pipeline(config: dict) -> list[str]:
    """The stages of the file that are enabled, in order."""
    return [s for s in STAGES if s in config and config[s].get(ENABLED, True)]


def selected(config: dict, stage: str) -> list[str]:
    """The stages `--stage` runs: all enabled ones, or one (present and enabled in the file)."""
    stage = ALIASES.get(stage, stage)
    enabled = in_pipeline(config)
    if stage == "all":
        if not enabled:
            raise UserError(f"the config enables no stage; add sections among {', '.join(STAGES)}")
        return enabled
    if stage not in config:
        raise UserError(f"--stage {stage}: the config has no {stage} section; add `{stage}:` (its flags) to it")
    if stage not in enabled:
        raise UserError(f"--stage {stage}: {stage}.{ENABLED} is false in the config; set it true to run it")
    return [stage]


def _input_values(values: Mapping[str, tuple], kind: StageKind, parser: argparse.ArgumentParser) -> dict:
    """dest -> what each input flag of a stage will be: its value (set or handed on), else the script's default."""
    given = {dest: values.get(dest, (None, None))[1] for dest in kind.inputs.values()}
    return {dest: str(v) if v is not None else parser.get_default(dest) for dest, v in given.items()}


def _config_of(parser: _RaisingParser, ns: argparse.Namespace):
    """The checked config of a parsed stage (its dataclass's check(), or the stage's check function)."""
    kind = KINDS[parser.stage]
    try:
        if kind.config is not None:
            return config_from_args(getattr(parser.module, kind.config), ns).check()
        return kind.check(parser.module, ns)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        raise type(err)(f"{parser.stage}: {err}") from None


def plan_stage(config: dict, stage: str, parser: _RaisingParser, handed: Mapping[str, str]) -> StagePlan:
    """Build and check one stage's command: key names and values, then the trainer's own check, with the handed-on
    paths that do not exist yet left out of the check (the stage checks them when it starts)."""
    kind = KINDS[stage]
    values = stage_values(config, stage, parser.actions(), handed)
    argv = [w for action, value, where in values.values() for w in flag_args(action, value, where)]
    missing = {dest for dest, path in handed.items() if not Path(path).exists()}
    checked_argv = [w for dest, (action, value, where) in values.items() if dest not in missing
                    for w in flag_args(action, value, where)]
    cfg = _config_of(parser, parser.parser.parse_args(checked_argv))
    inputs = _input_values(values, kind, parser.parser)
    out_dir = values.get("out_dir", (None, None))[1]
    product = None if kind.product is None else kind.product(cfg, inputs)
    writes = [p for p in ([] if product is None else product.paths()) if p not in inputs.values()]
    if kind.results is not None and out_dir is not None:
        writes.append(str(Path(out_dir) / kind.results))
    return StagePlan(stage, kind.script, argv, None if out_dir is None else Path(out_dir), product, writes,
                     handed=dict(handed))


def handoff(product: Product, kind: StageKind, stage: str, source: str) -> dict[str, str]:
    """The flags of `kind` given the parts of `product` (UserError when a part has no flag to go to)."""
    flags = {}
    for part, path in dataclasses.asdict(product).items():
        if path is None:
            continue
        if part not in kind.inputs:
            raise UserError(f"{source} hands on a {part.replace('_', ' ')} ({path}), which {stage} cannot take; "
                            f"set {stage}'s input yourself, or change {source}'s settings")
        flags[kind.inputs[part]] = path
    return flags


def build_plan(config: dict, stage: str = "all", config_path: str = "<config>") -> list[StagePlan]:
    """The checked StagePlans of `--stage` (see the module doc), in order. Every stage of the file is parsed (so a
    bad key anywhere is reported), the selected ones are returned. config_path: named in the errors."""
    chosen = selected(config, stage)
    parsers = {s: _RaisingParser(s) for s in in_pipeline(config)}
    check_shared(config, {s: p.actions() for s, p in parsers.items()})
    plans: dict[str, StagePlan] = {}
    last: Optional[StagePlan] = None  # the nearest earlier stage that makes a model
    for name, parser in parsers.items():
        kind = KINDS[name]
        names = parser.actions()
        sets_input = any(names[key].dest in kind.inputs.values() for key in config[name] if key in names)
        handed = {} if last is None or sets_input or not kind.inputs else handoff(last.product, kind, name, last.name)
        plan = plan_stage(config, name, parser, handed)
        plan.source = None if not handed else last.name
        plans[name] = plan
        if plan.product is not None:
            last = plan
    for name in chosen:
        source = plans[name].source
        if source is not None and source not in chosen:
            absent = [p for p in plans[name].handed.values() if not Path(p).exists()]
            if absent:
                inputs = " / ".join(f"{name}.{dest}" for dest in plans[name].handed)
                raise UserError(f"--stage {name} takes {source}'s output {absent[0]}, which does not exist yet; run "
                                f"`python train_pipeline.py --config {config_path} --stage {source}` first, or set "
                                f"{inputs} in the config")
    return [plans[name] for name in chosen]
