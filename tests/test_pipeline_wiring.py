"""No silent drops: every pipeline parameter reaches the steps that read its setting, under its own name,
with the preset's default; and compiling has no global side effects.

``wiring_problems`` reads the compiled IR the way the KFP backend does (task inputs resolved through
the condition's sub-DAG) and names the place to fix for each problem. It is run on the real pipeline
and on broken ones, to show it would catch what it looks for.
"""

import copy
import dataclasses
import os
import sys

import pytest
import yaml

from captioning.config import PRESETS, load_config
from captioning.parameters import PARAMETERS, PRESET_PARAMETER, parameters_from_config

from components.factory import UPSTREAM_REF

NOT_SETTINGS = {UPSTREAM_REF, "claims"}  # inputs that carry no configuration (a build option)


def compile_ir(tmp_path, **options) -> dict:
    from pipeline import BuildOptions, compile_pipeline

    path = compile_pipeline(tmp_path / "p.yaml", BuildOptions(**options))
    return next(yaml.safe_load_all(path.read_text()))


def _executor_inputs(ir: dict):
    """(task, component input, root parameter feeding it or None) for every container task, and the
    root parameters that trigger conditions read."""
    components = ir["components"]
    fed, conditions = [], set()

    def walk(dag: dict, binding: dict[str, str]):
        for task_name, task in dag["tasks"].items():
            resolved = {}
            for name, source in task.get("inputs", {}).get("parameters", {}).items():
                resolved[name] = binding.get(source.get("componentInputParameter"))
            condition = task.get("triggerPolicy", {}).get("condition", "")
            conditions.update(root for name, root in resolved.items() if root and f"'{name}'" in condition)
            component = components[task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"], resolved)
                continue
            for name in component.get("inputDefinitions", {}).get("parameters", {}):
                fed.append((task_name, name, resolved.get(name)))

    walk(ir["root"]["dag"], {name: name for name in ir["root"]["inputDefinitions"]["parameters"]})
    return fed, conditions


def wiring_problems(ir: dict) -> list[str]:
    from captioning.workflow import STEPS

    problems = []
    root = ir["root"]["inputDefinitions"]["parameters"]
    expected = {PRESET_PARAMETER, *PARAMETERS}
    for name in sorted(expected - set(root)):
        problems.append(f"PARAMETERS (captioning/parameters.py) has {name}, the compiled pipeline has no such "
                        "parameter (pipeline.py builds its signature from PARAMETERS)")
    for name in sorted(set(root) - expected):
        problems.append(f"pipeline parameter {name} is not in PARAMETERS (captioning/parameters.py)")

    fed, conditions = _executor_inputs(ir)
    for task, name, source in fed:
        if name in NOT_SETTINGS:
            continue
        if name not in expected:
            problems.append(f"task {task}: input {name} maps to no setting; add it to PARAMETERS "
                            "(captioning/parameters.py)")
        elif source != name:
            problems.append(f"task {task}: input {name} ({PARAMETERS.get(name, 'the preset')}) is fed by "
                            f"{source or 'no pipeline parameter'}, not the pipeline parameter {name} (pipeline.py)")
    reached = {source for _, _, source in fed} | conditions
    for name in sorted(set(root) - reached):
        key = PARAMETERS.get(name)
        readers = [s.name for s in STEPS.values() if key and s.reads_key(key)]
        where = (f", though {', '.join(readers)} reads {key} (pipeline.py)" if readers else
                 f": no step reads {key}; list it in a step's reads (captioning/workflow.py)")
        problems.append(f"pipeline parameter {name} ({key}) reaches no component{where}")
    taken = {(task, name) for task, name, _ in fed}
    for step in STEPS.values():
        task = step.name.replace("_", "-")
        for name, key in PARAMETERS.items():
            if step.reads_key(key) and (task, name) not in taken:
                problems.append(f"task {task}: the step reads {key} but its component has no input {name} "
                                "(components/factory.py)")

    preset = root[PRESET_PARAMETER]["defaultValue"]
    defaults = parameters_from_config(load_config(preset=preset))
    for name in sorted(expected & set(root) - {PRESET_PARAMETER}):
        if root[name].get("defaultValue") != defaults[name]:
            problems.append(f"pipeline parameter {name} defaults to {root[name].get('defaultValue')!r}, the preset "
                            f"{preset} says {defaults[name]!r} (presets/{preset}.yaml over config.py)")
    return problems


@pytest.mark.parametrize("options", [{"target": "kubeflow"}, {"target": "vertex"}, {"preset": "demo"}])
def test_the_compiled_pipeline_wires_every_parameter(tmp_path, options):
    ir = compile_ir(tmp_path, **options)
    assert wiring_problems(ir) == []
    fed, conditions = _executor_inputs(ir)
    assert conditions == {"min_score"}  # the gate's floor feeds no step
    assert ("train", "epochs", "epochs") in fed and ("log-raw-data", "base_url", "base_url") in fed
    assert not any(task == "train" and name == "base_url" for task, name, _ in fed)  # steps get only what they read


def test_a_broken_wiring_is_named(tmp_path):
    ir = compile_ir(tmp_path)
    dropped = copy.deepcopy(ir)
    del dropped["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["epochs"]
    assert wiring_problems(dropped) == [
        "task train: input epochs (train.epochs) is fed by no pipeline parameter, not the pipeline parameter "
        "epochs (pipeline.py)",
        "pipeline parameter epochs (train.epochs) reaches no component, though train reads train.epochs "
        "(pipeline.py)"]

    crossed = copy.deepcopy(ir)
    crossed["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["units"] = {"componentInputParameter": "epochs"}
    assert wiring_problems(crossed) == [
        "task train: input units (train.units) is fed by epochs, not the pipeline parameter units (pipeline.py)",
        "pipeline parameter units (train.units) reaches no component, though train reads train.units (pipeline.py)"]

    inner = copy.deepcopy(ir)
    gate = next(c for c in inner["components"].values() if "dag" in c and "promote" in c["dag"]["tasks"])
    del gate["dag"]["tasks"]["promote"]["inputs"]["parameters"]["promote_margin"]
    problems = wiring_problems(inner)
    assert problems[0].startswith("task promote: input promote_margin (promote.margin) is fed by no pipeline")

    stale = copy.deepcopy(ir)
    stale["root"]["inputDefinitions"]["parameters"]["max_vocab"]["defaultValue"] = 5000
    assert wiring_problems(stale) == [
        "pipeline parameter max_vocab defaults to 5000, the preset coco2014 says 10000 "
        "(presets/coco2014.yaml over config.py)"]


@pytest.fixture
def fresh_signatures():
    from components.factory import _signature

    _signature.cache_clear()
    yield
    _signature.cache_clear()


def test_a_setting_no_step_reads_is_caught(tmp_path, monkeypatch, fresh_signatures):
    from captioning import workflow

    steps = workflow.STEPS
    monkeypatch.setitem(steps, "evaluate", dataclasses.replace(steps["evaluate"], reads=("evaluate",)))
    monkeypatch.setitem(steps, "promote", dataclasses.replace(steps["promote"], reads=("promote.margin",)))
    problems = wiring_problems(compile_ir(tmp_path))
    assert "pipeline parameter promote_metric (promote.metric) reaches no component: no step reads " \
           "promote.metric; list it in a step's reads (captioning/workflow.py)" in problems


def test_exposing_a_setting_is_one_line(tmp_path, monkeypatch, fresh_signatures):
    """A new entry in PARAMETERS becomes a pipeline parameter, a train input, and the pod's setting."""
    from captioning import parameters
    from components.factory import step_component

    monkeypatch.setitem(parameters.PARAMETERS, "patience", "train.patience")
    monkeypatch.setitem(parameters.BY_KEY, "train.patience", "patience")
    ir = compile_ir(tmp_path, preset="demo")
    assert wiring_problems(ir) == []
    assert ir["root"]["inputDefinitions"]["parameters"]["patience"]["defaultValue"] == 3
    assert ("train", "patience", "patience") in _executor_inputs(ir)[0]
    assert "patience" not in ir["components"]["comp-evaluate"]["inputDefinitions"]["parameters"]
    assert parameters.runtime_parameters("demo", ["train.patience=7"])["patience"] == 7
    assert "patience" in step_component("train").component_spec.inputs


def test_a_parameter_for_a_missing_setting_names_the_table(monkeypatch):
    from captioning import parameters
    from captioning.errors import ConfigError

    monkeypatch.setitem(parameters.PARAMETERS, "warmup", "train.warmup")
    with pytest.raises(ConfigError, match=r"captioning/parameters.py: 'train.warmup' is not a configuration key"):
        parameters.parameter_type("warmup")


@pytest.mark.parametrize("preset", PRESETS)
def test_components_default_to_the_preset(preset):
    """A component's setting inputs default to None, "as the preset says", so a pod given only the preset
    runs exactly the preset; and the pipeline's defaults reproduce it."""
    from captioning.parameters import config_from_parameters
    from captioning.workflow import STEPS
    from components.factory import step_component, step_parameters

    for name, step in STEPS.items():
        spec = step_component(name).component_spec
        for parameter in step_parameters(step):
            assert spec.inputs[parameter].default is None and spec.inputs[parameter].optional, (name, parameter)
    given_nothing = dict.fromkeys(PARAMETERS)
    assert config_from_parameters(preset, **given_nothing) == load_config(preset=preset)
    assert config_from_parameters(preset, **parameters_from_config(load_config(preset=preset))) == \
        load_config(preset=preset)


def test_compiling_twice_in_one_process_sets_each_image_without_side_effects(tmp_path):
    import components.train

    environment, modules = dict(os.environ), {k: v for k, v in sys.modules.items() if k.startswith("components")}
    first = compile_ir(tmp_path / "a", image="reg.example/one:1")
    second = compile_ir(tmp_path / "b", image="reg.example/two:2", target="vertex", accelerator_type="NVIDIA_L4")
    for ir, image in ((first, "reg.example/one:1"), (second, "reg.example/two:2")):
        images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
        assert images == {image}
    assert dict(os.environ) == environment
    assert {k: v for k, v in sys.modules.items() if k.startswith("components")} == modules
    assert sys.modules["components.train"] is components.train


class RecordingConfig:
    """A read-only view of a Config that notes every setting read through it (``section.key``)."""

    def __init__(self, model, seen: set[str], prefix: str = ""):
        self._model, self._seen, self._prefix = model, seen, prefix

    def __getattr__(self, name):
        from pydantic import BaseModel

        value = getattr(self._model, name)
        key = f"{self._prefix}.{name}" if self._prefix else name
        if isinstance(value, BaseModel):
            return RecordingConfig(value, self._seen, key)
        if not callable(value):  # model_dump() and the like serialise; they decide nothing
            self._seen.add(key)
        return value


@pytest.mark.slow
def test_each_step_reads_only_the_settings_it_declares(small_mirror, tmp_path, monkeypatch):
    """``reads`` decides which parameters a component gets; running every step on a config that records
    what is read shows the declarations cover what the code reads (else a pod would use the preset's value)."""
    from captioning import workflow
    from captioning.runners.inprocess import run_pipeline

    seen: dict[str, set[str]] = {}
    for name, step in list(workflow.STEPS.items()):
        def run(cfg, io, tracker, _name=name, _run=step.run):
            return _run(RecordingConfig(cfg, seen.setdefault(_name, set())), io, tracker)
        monkeypatch.setitem(workflow.STEPS, name, dataclasses.replace(step, run=run))
    cfg = load_config(overrides=[f"data.base_url={small_mirror['root']}", "train.epochs=1", "data.val_images=8",
                                 "data.test_images=8", "train.units=16", "train.embedding_dim=8",
                                 "evaluate.attention_samples=1", "wandb.mode=disabled",
                                 "train.scst_epochs=0"])
    summary = run_pipeline(cfg, tmp_path)
    assert summary["status"] == "ok", summary["steps"]
    for name, keys in seen.items():
        undeclared = sorted(k for k in keys if not workflow.STEPS[name].reads_key(k))
        assert not undeclared, f"{name} reads {undeclared} but does not declare them (reads in workflow.py)"
    assert "promote.metric" in seen["evaluate"] and "train.epochs" in seen["train"]  # the recorder sees reads


def test_the_image_finds_every_step_component(tmp_path):
    """kfp_config.ini (how kfp.dsl.executor_main finds a component in the image) names the module of every
    function any compiled pipeline executes, on both targets, and each loads there by that name."""
    import configparser
    import shutil
    import subprocess

    from pipeline import BuildOptions, compile_pipeline
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ini = configparser.ConfigParser()
    ini.read(root / "components" / "kfp_config.ini")
    executed = set()
    for options in (BuildOptions(), BuildOptions(pipeline="caption"), BuildOptions(target="vertex")):
        ir = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", options).read_text()).__next__()
        for executor in ir["deploymentSpec"]["executors"].values():
            args = executor["container"]["args"]
            assert "--component_module_path" not in args  # found through the ini
            executed.add(args[args.index("--function_to_execute") + 1])
    assert dict(ini["Components"]) == {name: f"components/{name}.py" for name in sorted(executed)}
    # as in the image (/app holds kfp_config.ini and components/): executor_main's own lookup and loader
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(root / "components" / "kfp_config.ini", app / "kfp_config.ini")
    (app / "components").symlink_to(root / "components")
    code = ("import sys; from kfp.dsl import kfp_config, utils; "
            "path = kfp_config.KFPConfig().get_components()[sys.argv[1]]; "
            "module = utils.load_module(module_name=path.name[:-3], module_directory=str(path.parent)); "
            "print(getattr(module, sys.argv[1]).name)")
    for name in sorted(executed):
        proc = subprocess.run([sys.executable, "-c", code, name], cwd=app, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(root)})
        assert proc.returncode == 0 and proc.stdout.strip() == name.replace("_", "-"), (name, proc.stderr[-1500:])
